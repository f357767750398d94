"""The packed runtime: int4 (tinygemm), int8 and FP8 Linears built from a saved checkpoint compute what the
dequantized checkpoint computes, hold their weights in fewer bytes, and settings without a kernel say so."""

from __future__ import annotations

import pytest
import torch

import compress
from compress.checkpoint import save_model
from compress.errors import CompressError
from compress.models import load_model
from compress.quantize.packed import packed_kernels, weight_bytes


def _saved(tiny_model_dir, tmp_path, config):
    model, tokenizer = load_model(str(tiny_model_dir))
    compress.quantize(model, config, show_progress=False)
    save_model(model, tokenizer, tmp_path / "q")
    return tmp_path / "q"


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("config,kernel,dtype,tolerance", [
    # the int kernels compute in bf16: compared with the dequantized model in bf16 (accumulation order differs)
    (compress.RTN(bits=4, group_size=32), "int4 tinygemm", "bfloat16", 2e-2),
    (compress.RTN(bits=4, group_size=32, sym=False), "int4 tinygemm", "bfloat16", 2e-2),  # zero points -> offsets
    (compress.RTN(bits=8, group_size=-1), "int8 weight-only", "bfloat16", 2e-2),
    (compress.FP8(), "fp8 (simulated matmul)", "float32", 1e-5),
])
def test_packed_logits_equal_the_dequantized_checkpoints(tiny_model_dir, tmp_path, config, kernel, dtype, tolerance):
    folder = _saved(tiny_model_dir, tmp_path, config)
    dense, _ = compress.load(folder, dtype=dtype)
    packed, _ = compress.load(folder, dtype=dtype, runtime="packed")
    assert packed_kernels(packed) == {kernel: 14}  # every decoder Linear of the 2 layers
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.model.layers.modules())
    ids = torch.randint(0, dense.config.vocab_size, (2, 24))
    expected, got = _logits(dense, ids).float(), _logits(packed, ids).float()
    assert (got - expected).abs().max() <= tolerance * expected.abs().max()
    decoder = lambda m: sum(weight_bytes(layer) for layer in m.model.layers)  # noqa: E731
    limit = {"int4 tinygemm": 0.4, "int8 weight-only": 0.6}.get(kernel, 0.3)  # against bf16, or against float32
    assert decoder(packed) < limit * decoder(dense)


def test_settings_without_a_kernel_stay_dequantized_and_say_so(tiny_model_dir, tmp_path):
    folder = _saved(tiny_model_dir, tmp_path, compress.RTN(bits=3, group_size=32))
    with pytest.warns(UserWarning, match=r"no packed kernel for int3 g32: 14 Linear\(s\) run dequantized"):
        packed, _ = compress.load(folder, runtime="packed")
    assert packed_kernels(packed) == {}


def test_a_packed_model_is_for_inference_only(tiny_model_dir, tmp_path):
    folder = _saved(tiny_model_dir, tmp_path, compress.RTN(bits=4, group_size=32))
    packed, tokenizer = compress.load(folder, runtime="packed")
    with pytest.raises(CompressError, match="packed kernels .* inference only"):
        save_model(packed, tokenizer, tmp_path / "again")
    with pytest.raises(CompressError, match="on a quantized model"):
        compress.finetune(packed, compress.LoRARecovery(steps=1), torch.zeros(4, 8, dtype=torch.long))
    with pytest.raises(CompressError, match="unknown runtime 'fast'; allowed: dequantized, packed"):
        compress.load(folder, runtime="fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("config", [compress.RTN(bits=4, group_size=32, sym=False), compress.RTN(bits=4, group_size=64),
                                    compress.FP8()])
def test_packed_on_gpu_equals_dequantized(tiny_model_dir, tmp_path, config):
    from compress.quantize.packed import DEQUANTIZE_ABOVE_ROWS, int4_backend

    folder = _saved(tiny_model_dir, tmp_path, config)
    dense, _ = compress.load(folder, dtype="bfloat16", device="cuda")
    packed, _ = compress.load(folder, dtype="bfloat16", device="cuda", runtime="packed")
    if isinstance(config, compress.FP8):
        fast = "fp8 _scaled_mm"
    else:  # every Linear of the tiny model has inputs and outputs in multiples of 64: the group decides
        fast = f"int4 {int4_backend(torch.device('cuda'), (64, 64, config.group_size))}"
    assert packed_kernels(packed) == {fast: 14}
    # decode at batch 1 and 16, a short prompt (the low-bit kernels) and a long one (dequantize + GEMM / _scaled_mm)
    for shape in ((1, 1), (2, 8), (2, 24), (1, DEQUANTIZE_ABOVE_ROWS + 72)):
        ids = torch.randint(0, dense.config.vocab_size, shape, device="cuda")
        expected, got = _logits(dense, ids).float(), _logits(packed, ids).float()
        assert (got - expected).abs().max() <= 0.03 * expected.abs().max()  # bf16 accumulation order


@pytest.mark.parametrize("out_features,in_features", [(64, 32), (128, 96), (96, 64), (1536, 576), (80, 128), (16, 32)])
def test_tinygemm_cpu_layout_unpacks_to_the_exact_codes(out_features, in_features):
    from compress.quantize.packed import unpack_tinygemm_cpu

    codes = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    assert torch.equal(unpack_tinygemm_cpu(packed, out_features, in_features), codes.to(torch.uint8))


@pytest.mark.parametrize("out_features,in_features", [(208, 128), (64 * 3, 96), (528, 64)])
def test_tinygemm_cpu_packing_in_slices_of_rows_is_the_whole_packing(out_features, in_features):
    """The CPU packer takes int32 codes; packing 64 rows at a time (the last slice shorter, a block of fewer than 64
    rows at the end) gives the bytes of packing the whole at once."""
    from compress.quantize.packed import _inner_k_tiles, pack_tinygemm_cpu

    codes = torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8)
    tiles = _inner_k_tiles(in_features)
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), tiles)
    assert torch.equal(pack_tinygemm_cpu(codes, tiles, rows=64), whole)


def test_gemlite_layout_is_compressed_tensors_packing_transposed():
    """The dequantize kernel of the CUDA path reads gemlite's words ([in/8, out] int32, code i at bits 4i): packed here
    by compressed-tensors' own packer, it gives back the grid's weights exactly."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from compress.quantize.packed import dequantize_gemlite_reference

    signed = torch.randint(-8, 8, (48, 128), dtype=torch.int8)
    scale, zero = torch.rand(48, 4) + 0.1, torch.randint(-8, 8, (48, 4))
    words = pack_to_int32(signed, num_bits=4)  # [out, in/8], signed codes offset by 8 as compressed-tensors stores
    weight = dequantize_gemlite_reference(words.T.contiguous(), scale.T.contiguous(),
                                          (zero + 8).float().T.contiguous(), 32).T
    expected = (signed.float() - zero.float().repeat_interleave(32, 1)) * scale.repeat_interleave(32, 1)
    assert torch.equal(weight, expected)


def test_long_inputs_on_cpu_dequantize_and_equal_the_short_path(tiny_model_dir, tmp_path):
    from compress.quantize.packed import CPU_DEQUANTIZE_ABOVE_ROWS

    folder = _saved(tiny_model_dir, tmp_path, compress.RTN(bits=4, group_size=32, sym=False))
    packed, _ = compress.load(folder, dtype="bfloat16", runtime="packed")
    linear = packed.model.layers[0].mlp.down_proj
    assert linear.cpu_dequantize  # the unpacking rule holds on this CPU
    x = torch.randn(CPU_DEQUANTIZE_ABOVE_ROWS + 1, linear.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        long, short = linear(x), torch.cat([linear(x[i:i + 64]) for i in range(0, len(x), 64)])
    assert (long.float() - short.float()).abs().max() <= 0.02 * short.float().abs().max()


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device,config", [
    ("cpu", compress.RTN(bits=4, group_size=32, sym=False)),
    pytest.param("cuda", compress.RTN(bits=4, group_size=64), marks=_CUDA),
    pytest.param("cuda", compress.FP8(), marks=_CUDA),
])
def test_a_fused_groups_long_input_gives_each_projection_its_own_memory(tiny_model_dir, tmp_path, device, config,
                                                                         monkeypatch):
    """gate/up packed as one Linear: a long input's two outputs are separate contiguous tensors (the element-wise
    kernels after them vectorize), equal to the one GEMM's slices; a short input's are slices of one launch's output,
    and so are a long input's where COMPRESS_SLICED_OUTPUTS=0 asked for that."""
    from compress.quantize.packed import (
        CPU_DEQUANTIZE_ABOVE_ROWS,
        DEQUANTIZE_ABOVE_ROWS,
        SLICED_OUTPUTS_VARIABLE,
        FusedPart,
    )

    monkeypatch.delenv(SLICED_OUTPUTS_VARIABLE, raising=False)  # the default
    saved = _saved(tiny_model_dir, tmp_path, config)
    packed, _ = compress.load(saved, dtype="bfloat16", device=device, runtime="packed")
    mlp = packed.model.layers[0].mlp
    assert isinstance(mlp.gate_proj, FusedPart) and isinstance(mlp.up_proj, FusedPart)
    fused = mlp.gate_proj.fused
    long = (CPU_DEQUANTIZE_ABOVE_ROWS if device == "cpu" else DEQUANTIZE_ABOVE_ROWS) + 8
    for rows in (8, long):
        x = torch.randn(1, rows, fused.linear.in_features, dtype=torch.bfloat16, device=device)
        with torch.no_grad():
            gate, up = mlp.gate_proj(x), mlp.up_proj(x)
            whole = fused.linear(x)
        assert gate.shape == (1, rows, fused.widths[0]) and up.shape == (1, rows, fused.widths[1])
        assert gate.is_contiguous() == up.is_contiguous() == (rows == long)
        for part, expected in zip((gate, up), whole.split(fused.widths, -1)):
            assert (part.float() - expected.float()).abs().max() <= 0.01 * expected.float().abs().max()
    monkeypatch.setenv(SLICED_OUTPUTS_VARIABLE, "0")
    unsliced, _ = compress.load(saved, dtype="bfloat16", device=device, runtime="packed")
    with torch.no_grad():
        gate = unsliced.model.layers[0].mlp.gate_proj(x)
    assert not gate.is_contiguous()


def _int4_kernel_g32() -> str:
    """The kernel the tiny model's int4 g32 Linears run on where the benchmark runs (a GPU when there is one)."""
    from compress.quantize.packed import int4_backend

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return f"int4 {int4_backend(device, (64, 64, 32))}"


def test_bench_measures_every_step_of_a_run(tiny_model_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from compress.cli import app

    run = tmp_path / "run"
    base, tokenizer = load_model(str(tiny_model_dir))
    save_model(base, tokenizer, run / "00-base")
    compress.quantize(base, compress.RTN(bits=4, group_size=32), show_progress=False)
    save_model(base, tokenizer, run / "01-quantize")
    for step in ("00-base", "01-quantize"):
        (run / step / "step.json").write_text("{}")
    (run / "02-prune.partial").mkdir()  # an unfinished step is not measured
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", str(run), "--batch", "1,2", "--prompt", "8", "--new", "4",
                                      "--prefill", "32", "--repeats", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    steps = json.loads(out.read_text())["steps"]
    assert [s["step"] for s in steps] == ["00-base", "01-quantize"]
    assert steps[0]["kernels"] == {"dense": 0} and steps[1]["kernels"] == {_int4_kernel_g32(): 14}
    assert steps[1]["weight_bytes"] < steps[0]["weight_bytes"]
    for step in steps:
        assert [d["batch"] for d in step["decode"]] == [1, 2]
        assert step["decode_tokens_per_s"] > 0 and step["prefill_ms"] > 0 and step["peak_bytes"] > 0

    bad = CliRunner().invoke(app, ["bench", str(tmp_path), "--new", "4"])
    assert bad.exit_code == 2 and "neither a model folder" in bad.output


def test_bench_compiles_on_a_gpu_by_default_and_times_eagerly_what_the_compiler_refuses(tiny_model_dir, monkeypatch):
    from compress import bench
    from compress.config.evals import SpeedBench

    assert bench.compiled_by_default(None, "cuda") and bench.compiled_by_default(None, torch.device("cuda", 1))
    assert not bench.compiled_by_default(None, "cpu") and SpeedBench().compile is None
    assert bench.compiled_by_default(True, "cpu") and not bench.compiled_by_default(False, "cuda")
    model, _ = load_model(str(tiny_model_dir))
    # the static-cache loop with the step uncompiled (compiling on the CPU would cost the suite ~40 s)
    monkeypatch.setattr(bench, "_compiled_decode_one", lambda: bench._decode_one)
    row = bench.bench_model(model, (1,), prompt=8, new=4, prefill=16, repeats=1, compile=True)
    assert row["decode_compiled"] is True and "compile_error" not in row and row["decode_tokens_per_s"] > 0

    def refused():
        def step(*args, **kwargs):
            raise RuntimeError("graph break in the decode step\nthe rest of the trace")
        return step

    monkeypatch.setattr(bench, "_compiled_decode_one", refused)
    row = bench.bench_model(model, (1, 2), prompt=8, new=4, prefill=16, repeats=1, compile=True)
    assert row["decode_compiled"] is False and row["compile_error"] == "RuntimeError: graph break in the decode step"
    assert [d["batch"] for d in row["decode"]] == [1, 2] and all(d["decode_tokens_per_s"] > 0 for d in row["decode"])

    # compile_prefill: each length timed compiled too (uncompiled here, as above); a refused compile keeps the eager
    # time
    monkeypatch.setattr(bench, "_compiled_prefill", lambda: bench._prefill)
    row = bench.bench_model(model, (), prefill=(16, 24), repeats=1, compile_prefill=True)
    assert [p["tokens"] for p in row["prefill"]] == [16, 24]
    assert all(p["ms"] > 0 and p["compiled_ms"] > 0 for p in row["prefill"])

    def refused_prefill():
        def forward(*args, **kwargs):
            raise RuntimeError("unsupported op in the prefill\nthe rest of the trace")
        return forward

    monkeypatch.setattr(bench, "_compiled_prefill", refused_prefill)
    row = bench.bench_model(model, (), prefill=16, repeats=1, compile_prefill=True)
    assert row["prefill"][0]["ms"] > 0 and "compiled_ms" not in row["prefill"][0]
    assert row["prefill"][0]["compiled_error"] == "RuntimeError: unsupported op in the prefill"


def test_a_recipe_with_eval_speed_times_each_step_folder_packed(tiny_recipe):
    import json
    import os

    from rich.console import Console

    recipe = tiny_recipe("  - quantize: {method: rtn, bits: 4, group_size: 32}")
    text = recipe.read_text().replace("eval:\n", "eval:\n  speed: {batches: [1, 2], prompt: 8, new: 4, prefill: 16, "
                                                "repeats: 1}\n")
    recipe.write_text(text)
    report = compress.run(recipe, console=Console(file=open(os.devnull, "w")), show_progress=False)
    out = recipe.parent / "runs" / "tiny"
    base, quant = (json.loads((out / step / "step.json").read_text())["speed"] for step in ("00-base", "01-quantize"))
    assert base["kernels"] == {"dense": 0} and quant["kernels"] == {_int4_kernel_g32(): 14}
    assert quant["weight_bytes"] < base["weight_bytes"] and quant["decode_tokens_per_s"] > 0
    assert quant["protocol"]["batches"] == [1, 2] and quant["protocol"]["runtime"] == "packed"
    assert report["steps"][1]["speed"]["weight_bytes"] == quant["weight_bytes"]
    markdown = (out / "report.md").read_text()
    assert "## When it runs" in markdown and f"| 01-quantize | {_int4_kernel_g32()} ×14 |" in markdown


@pytest.mark.parametrize("config", [compress.RTN(bits=4, group_size=32, sym=False), compress.RTN(bits=8, group_size=-1),
                                    compress.FP8()])
def test_packed_load_never_builds_the_dense_model(tmp_path, monkeypatch, config):
    """A qwen2 (q/k/v biases, untied head) step folder loads packed straight from its tensors: the dense loader is never
    called, and the logits equal those of the dense model packed afterwards, exactly."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import compress.models
    from compress.quantize.packed import pack_model

    architecture = AutoConfig.for_model("qwen2", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(architecture).eval()
    compress.quantize(model, config, show_progress=False)

    class NoTokenizer:
        def save_pretrained(self, folder):
            pass

    save_model(model, NoTokenizer(), tmp_path / "q")
    monkeypatch.setattr(compress.models, "load_tokenizer", lambda source: None)
    monkeypatch.setattr(compress.models, "load_model", lambda *a, **k: pytest.fail("the dense model was built"))
    packed, _ = compress.load(tmp_path / "q", runtime="packed")
    pack_model(model)
    assert packed_kernels(packed) == packed_kernels(model) and len(packed_kernels(packed)) == 1
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert torch.equal(packed(input_ids=ids).logits, model(input_ids=ids).logits)
    # the loader runs with the target device as the default (a GPU load: torch.device("cuda")); the buffer a tensor is
    # read into from the file must stay on the host whatever that default is
    from compress.quantize.packed_load import _Tensors

    tensors = _Tensors(tmp_path / "q", "cpu")
    key = next(k for k in tensors.where if k.endswith("weight_scale"))
    on_host = tensors.get(key, torch.float64)  # converted: read through the buffer
    with torch.device("meta"):
        assert torch.equal(tensors.get(key, torch.float64), on_host)


def test_gemlite_loads_our_tuned_table_on_the_gpu_it_was_tuned_for(monkeypatch):
    """gemlite picks its shipped tables by the device's name and has none for an H200: ours, in gemlite's own cache
    format (kernel -> str((rows, out, in, group, codes per word, dtype id)) -> setting), is loaded there only."""
    import json
    import sys
    import types

    from compress.quantize import packed

    loaded = []
    monkeypatch.setitem(sys.modules, "gemlite", types.SimpleNamespace(load_config=loaded.append))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for device, expected in (("NVIDIA H200", ["h200.json"]), ("NVIDIA A100-SXM4-80GB", [])):
        packed.gemlite_module.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=device: device)
        loaded.clear()
        assert packed.gemlite_module() is sys.modules["gemlite"]
        assert [p.rsplit("/", 1)[-1] for p in loaded] == expected
    packed.gemlite_module.cache_clear()
    table = json.loads((packed.GEMLITE_SETTINGS / "h200.json").read_text())
    assert set(table) <= {"GEMV", "GEMV_REVSPLITK", "GEMV_SPLITK", "GEMM_SPLITK", "GEMM"} and table
    for settings in table.values():
        for signature, setting in settings.items():
            rows, out_features, in_features, group, per_word, _ = eval(signature)  # noqa: S307 -- gemlite's format
            assert per_word == 8 and in_features % group == 0 and rows >= 1 and out_features % 128 == 0
            assert {"num_warps", "num_stages"} <= set(setting)


def test_int4_kernel_variable_picks_a_kernel_or_names_the_choices(monkeypatch, recwarn):
    """COMPRESS_INT4_KERNEL (for same-run comparisons) chooses the CUDA int4 kernel; an unknown value is refused with
    the valid ones before anything is packed, and the CPU keeps tinygemm whatever it says."""
    from compress.quantize import packed

    cuda = torch.device("cuda")
    monkeypatch.setenv(packed.INT4_KERNEL_VARIABLE, "marlin")
    with pytest.raises(ValueError, match="mma, gemlite or tinygemm"):
        packed.int4_backend(cuda)
    assert packed.int4_backend(torch.device("cpu")) == "tinygemm"
    monkeypatch.setenv(packed.INT4_KERNEL_VARIABLE, "tinygemm")
    assert packed.int4_backend(cuda) == "tinygemm"
    monkeypatch.setattr(packed, "gemlite_module", lambda: object())
    monkeypatch.setenv(packed.INT4_KERNEL_VARIABLE, "gemlite")
    assert packed.int4_backend(cuda) == "gemlite"
    monkeypatch.setattr(packed, "gemlite_module", lambda: None)
    monkeypatch.setattr(packed, "_mma_unavailable", lambda device: "no NVRTC here")
    assert packed.int4_backend(cuda) == "tinygemm"   # named but missing: the next available one, with a warning
    assert any("gemlite is not installed" in str(w.message) for w in recwarn)
    monkeypatch.setattr(packed, "gemlite_module", lambda: object())
    monkeypatch.setattr(packed, "_mma_unavailable", lambda device: None)
    monkeypatch.setenv(packed.INT4_KERNEL_VARIABLE, "mma")
    assert packed.int4_backend(cuda, (576, 1536, 64)) == "mma"
    # a shape its layout cannot hold (groups of 32) runs on the next kernel in INT4_CUDA_KERNELS, named in a warning
    assert packed.int4_backend(cuda, (576, 1536, 32)) == "gemlite"
    assert any("cannot hold 576 inputs x 1536 outputs in groups of 32" in str(w.message) for w in recwarn)


def test_gemlite_scales_have_zeros_after_them_for_the_split_k_kernel():
    """gemlite's split-K kernel loads the scales of blocks past the last input unmasked: the scales it is given are a
    view of a tensor that goes on with zero rows to the next multiple of the kernel's largest span."""
    from compress.quantize.packed import GEMLITE_MAX_SPAN, _zeros_after

    scales = torch.rand(11008 // 32, 96) + 0.5
    padded = _zeros_after(scales, 11008, 32)
    assert torch.equal(padded, scales) and padded.stride() == scales.stride()
    # the whole allocation behind the view (float32: 4 bytes a value)
    whole = torch.tensor([], dtype=padded.dtype).set_(padded.untyped_storage(), 0,
                                                      (padded.untyped_storage().nbytes() // 4 // 96, 96))
    assert whole.shape[0] * 32 == 2 * GEMLITE_MAX_SPAN  # 11008 inputs: two spans of 8192
    assert torch.equal(whole[:len(scales)], scales) and not whole[len(scales):].any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_fp8_input_rounding_equals_the_pytorch_rounding():
    """An eager FP8 Linear rounds its input with gemlite's fused kernel: the same scales and e4m3 codes as the
    PyTorch form that the simulation and the compiled decode step use, for token magnitudes from 1e-3 to 1e2."""
    from compress.quantize.packed import _fused_fp8_activation, _quantize_activation

    if (fused := _fused_fp8_activation()) is None:
        pytest.skip("needs gemlite (the cuda extra)")
    x = torch.randn(300, 4096, device="cuda", dtype=torch.bfloat16)
    x = x * torch.logspace(-3, 2, 300, device="cuda", dtype=torch.bfloat16)[:, None]
    codes, scales = fused(x, w_dtype=torch.float8_e4m3fn)
    expected_codes, expected_scales = _quantize_activation(x)
    assert torch.equal(scales, expected_scales)
    assert torch.equal(codes.view(torch.uint8), expected_codes.view(torch.uint8))

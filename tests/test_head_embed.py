"""The head and the embeddings on integer grids inside a weight-only step (`lm_head: {bits: 8, group_size: 128}`,
`embeddings: {bits: 8}`): a tied head is untied with its cost said and recorded; the checkpoint loads in stock
transformers, compress.load and the packed runtime with the same logits; GPTQ solves the head against the final
norm's output; step.json, the report and `compress estimate` count the saved bytes; bad grids are refused before any
work, naming the recipe line."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig
from rich.console import Console
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import compress
from compress.checkpoint import save_model
from compress.errors import CompressError, RecipeError
from compress.estimate import EstimateConfig, estimate, linear_bytes
from compress.modules import QUANT_ATTR, quantized_modules
from compress.pipeline import run
from compress.quantize.gptq import add_gram
from compress.quantize.grid import fake_quantize, minmax_qparams, weight_args
from compress.recipe import load_recipe
from stock_load import stock_logits

HEAD_8 = {"bits": 8, "group_size": 32}


class _NoTokenizer:
    def save_pretrained(self, folder):
        pass


def _tiny(kind: str) -> torch.nn.Module:
    """A tiny random Llama with a tied head, or a tiny random Qwen2 (q/k/v biases, GQA) with an untied one."""
    torch.manual_seed(0)
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    if kind == "llama-tied":
        return LlamaForCausalLM(LlamaConfig(**common, head_dim=16, tie_word_embeddings=True)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False)).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("kind", ["llama-tied", "qwen2"])
def test_head_and_embeddings_load_in_stock_transformers_compress_and_packed(kind, tmp_path):
    model = _tiny(kind)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    before = _logits(model, ids)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compress.quantize(model, compress.RTN(bits=4, group_size=32, lm_head=HEAD_8, embeddings={"bits": 8}),
                          show_progress=False)
    untie = [str(w.message) for w in caught if "unties" in str(w.message)]
    head_bytes = linear_bytes(512, 64, 8, 32, True, 4)
    assert untie == ([f"quantize (rtn): lm_head was tied to model.embed_tokens; quantizing the head unties them, and "
                      f"the checkpoint holds the head apart as its own copy on W8 g32 sym: "
                      f"{head_bytes / 2**20:,.1f} MiB more than the tied model's one tensor"] if tied else [])
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    grids = {name: (q.args.num_bits, q.args.group_size) for name, _, q in quantized_modules(model)}
    assert grids["lm_head"] == (8, 32) and grids["model.embed_tokens"] == (8, None) and len(grids) == 16
    # each row of the embedding is on its own int8 grid: at most half a step from the float value
    embedding, quant = model.model.embed_tokens, model.model.embed_tokens.weight_quant
    codes = embedding.weight / quant.scale
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.round().abs().max() <= 128
    in_memory = _logits(model, ids)
    assert not torch.allclose(in_memory, before)

    save_model(model, _NoTokenizer(), tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    parsed = QuantizationConfig.model_validate(config["quantization_config"])  # compressed-tensors' own parser
    formats = {tuple(group.targets): group.format for group in parsed.config_groups.values()}
    assert parsed.format == "mixed-precision" and formats[("model.embed_tokens",)] == "int-quantized"
    assert formats[("lm_head",)] == "pack-quantized" and parsed.ignore == []
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as tensors:
        assert tensors.get_tensor("model.embed_tokens.weight").dtype == torch.int8

    torch.testing.assert_close(stock_logits(tmp_path / "q", ids), in_memory, rtol=0, atol=1e-4)
    from compress.quantized_load import load_state

    reloaded = load_state(tmp_path / "q", config, torch.float32)
    torch.testing.assert_close(_logits(reloaded, ids), in_memory, rtol=0, atol=1e-5)
    assert {name for name, _, _ in quantized_modules(reloaded)} == set(grids)
    from compress.quantize.packed import pack_model
    from compress.quantize.packed_load import load_packed

    # W8 in groups has no packed kernel, so compress.load(runtime="packed") loads dense and packs what it can
    assert load_packed(tmp_path / "q", torch.float32, "cpu") is None
    packed = load_state(tmp_path / "q", config, torch.float32)
    notes = pack_model(packed)
    assert notes == ["no packed kernel for int8 g32: 1 Linear(s) run dequantized",
                     "model.embed_tokens is int8 on disk and runs dequantized (a lookup table; the packed kernels are "
                     "for Linears)"]
    # the packed kernels compute in bfloat16: close, not equal
    assert (_logits(packed, ids) - in_memory).abs().max() < 0.02 * in_memory.abs().max()


def test_a_packable_head_runs_as_a_packed_linear_beside_the_dequantized_embedding(tmp_path):
    model = _tiny("qwen2")
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    compress.quantize(model, compress.RTN(bits=4, group_size=32, lm_head={"bits": 4, "group_size": 32},
                                          embeddings={}), show_progress=False)
    in_memory = _logits(model, ids)
    save_model(model, _NoTokenizer(), tmp_path / "q")
    from compress.quantize.packed_load import load_packed

    with pytest.warns(UserWarning, match="model.embed_tokens is int8 on disk"):
        packed = load_packed(tmp_path / "q", torch.float32, "cpu")  # never dense: every Linear has a kernel
    assert packed is not None and hasattr(packed.lm_head, "packed_kernel")
    assert isinstance(packed.model.embed_tokens, torch.nn.Embedding)
    assert hasattr(packed.model.embed_tokens, QUANT_ATTR)
    assert (_logits(packed, ids) - in_memory).abs().max() < 0.02 * in_memory.abs().max()


def test_an_8_bit_head_without_a_group_size_takes_one_scale_per_row_and_runs_packed(tmp_path):
    from compress.config.quantize import HeadGrid

    assert HeadGrid().group_size == -1 and HeadGrid(bits=8).group_size == -1 and HeadGrid(bits=4).group_size == 128
    assert HeadGrid(bits=8, group_size=128).group_size == 128 and HeadGrid(bits=4, group_size=64).group_size == 64
    model = _tiny("qwen2")
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    compress.quantize(model, compress.RTN(bits=4, group_size=32, lm_head={"bits": 8}), show_progress=False)
    in_memory = _logits(model, ids)
    save_model(model, _NoTokenizer(), tmp_path / "q")
    from compress.quantize.packed_load import load_packed

    packed = load_packed(tmp_path / "q", torch.float32, "cpu")  # never dense: the per-row int8 head has a kernel
    assert packed is not None and "int8" in packed.lm_head.packed_kernel
    assert (_logits(packed, ids) - in_memory).abs().max() < 0.02 * in_memory.abs().max()


def test_gptq_solves_the_head_on_the_final_norm_output_and_beats_rounding():
    """The head's Hessian is the final norm's output over the calibration set through the quantized decoder: GPTQ's
    head changes the head's output on those inputs less than round-to-nearest on the same grid."""
    model = _tiny("qwen2")
    calibration = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    float_head = model.lm_head.weight.detach().clone()
    inputs = {}
    model.lm_head.register_forward_pre_hook(lambda module, args: inputs.setdefault("x", args[0].detach()))
    compress.quantize(model, compress.GPTQ(bits=4, group_size=32, lm_head={"bits": 4, "group_size": 32}),
                      calibration, show_progress=False)
    quant = model.lm_head.weight_quant
    assert quant.args.actorder == "weight" and quant.output_error is not None
    codes = model.lm_head.weight.reshape(512, 2, 32) / quant.scale.unsqueeze(-1)
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.round().abs().max() <= 8
    # the head's inputs now: the quantized decoder's final norm output on the calibration set
    inputs.clear()
    with torch.no_grad():
        model(calibration)
    gram = torch.zeros(64, 64)
    add_gram(gram, inputs["x"].reshape(-1, 64))
    args = weight_args(4, 32, True)
    rounded = fake_quantize(float_head, *minmax_qparams(float_head, args), args)

    def error(weight):
        difference = weight - float_head
        return ((difference @ gram) * difference).sum().item()

    assert error(model.lm_head.weight.detach()) < 0.9 * error(rounded)


def _quiet_run(recipe):
    return run(recipe, console=Console(quiet=True), show_progress=False)


def test_step_record_report_and_estimate_count_the_saved_bytes(tiny_recipe, tmp_path):
    recipe = tiny_recipe("  - quantize: {method: gptq, bits: 4, group_size: 32, lm_head: {bits: 8, group_size: 32},\n"
                         "               embeddings: {bits: 8},\n"
                         "               calibration: {dataset: wikitext2-valid, samples: 4, seq_len: 64}}",
                         max_tokens=1024)
    with pytest.warns(UserWarning, match="lm_head was tied to model.embed_tokens"):
        report = _quiet_run(recipe)
    folder = tmp_path / "runs" / "tiny" / "01-quantize"
    step = json.loads((folder / "step.json").read_text())
    assert "lm_head W8 g32 sym, embeddings W8 per-channel sym" in step["summary"]
    with safe_open(folder / "model.safetensors", "pt") as tensors:
        shapes = {key: (tensors.get_slice(key).get_shape(), tensors.get_slice(key).get_dtype())
                  for key in tensors.keys()}
    size = {"I32": 4, "F32": 4, "I64": 8, "I8": 1}

    def on_disk(module: str) -> int:
        return sum(size[dtype] * torch.Size(shape).numel() for key, (shape, dtype) in shapes.items()
                   if key.rsplit(".", 1)[0] == module)

    vocab = shapes["model.embed_tokens.weight"][0][0]
    assert step["grids"]["W8 g32 sym"] == {"linears": 1, "bytes": on_disk("lm_head"), "names": ["lm_head"]}
    assert step["grids"]["W8 per-channel sym"] == {"linears": 1, "bytes": on_disk("model.embed_tokens"),
                                                   "names": ["model.embed_tokens"]}
    assert on_disk("model.embed_tokens") == vocab * 64 + vocab * 4  # int8 codes, a float32 scale per token
    assert step["untied_head_bytes"] == on_disk("lm_head") == linear_bytes(vocab, 64, 8, 32, True, 4)
    saved = estimate(str(folder), EstimateConfig(dtype="float32"))["as_saved"]
    assert saved["grids"] == {grid: entry["bytes"] for grid, entry in step["grids"].items()}
    file_size = (folder / "model.safetensors").stat().st_size
    assert 0.95 * file_size < saved["disk"] <= file_size  # the safetensors header is not counted
    assert report["steps"][1]["size_bytes"] == step["size_bytes"]
    markdown = (tmp_path / "runs" / "tiny" / "report.md").read_text()
    assert "`lm_head`" in markdown and "`model.embed_tokens`" in markdown


def test_bad_head_or_embedding_grids_are_refused_before_any_work(tiny_recipe, tmp_path):
    recipe = tiny_recipe("  - quantize: {method: rtn, bits: 4, group_size: 32,\n"
                         "               lm_head: {bits: 8, group_size: 48}}")
    with pytest.raises(CompressError, match=rf"^{recipe}:5: steps\[0\].quantize.lm_head.group_size: quantize \(rtn\) "
                                            rf"lm_head: group_size 48 does not divide the head's input width 64; use "
                                            rf"32 or 64, or -1 for one scale per row"):
        _quiet_run(recipe)
    assert not (tmp_path / "runs" / "tiny" / "00-base").exists()  # refused before any work
    recipe = tiny_recipe("  - quantize: {method: gptq, bits: 4, group_size: 32,\n"
                         "               embeddings: {group_size: 24}}")
    with pytest.raises(CompressError, match=r":5: steps\[0\].quantize.embeddings.group_size: .* group_size 24 does "
                                            r"not divide the embedding width 64"):
        _quiet_run(recipe)
    for step, problem in [
        ("{method: rtn, embeddings: {bits: 4}}", r":4: steps\[0\].quantize.embeddings.bits: .*embeddings take 8 "
                                                 r"bits only, got 4"),
        ("{method: gptq,\n               lm_head: {bits: 3}}", r":5: .*lm_head.bits: .*lm_head takes 8 or 4 bits"),
        ("{method: gptq, format: gptq, lm_head: {}}", r"lm_head: format gptq holds the decoder's Linears"),
        ("{method: rtn, grid: mxfp4, embeddings: {}}", r"embeddings take integer grids"),
    ]:
        with pytest.raises(RecipeError, match=problem):
            load_recipe(tiny_recipe(f"  - quantize: {step}"))


def test_qat_after_the_step_leaves_the_quantized_head_and_embedding_on_their_grid():
    """QAT trains the decoder's grids; the head and embedding an earlier step quantized are not its to train."""
    model = _tiny("qwen2")
    ids = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(1))
    compress.quantize(model, compress.RTN(bits=4, group_size=32, lm_head=HEAD_8, embeddings={"bits": 8}),
                      show_progress=False)
    head, embedding = model.lm_head.weight.detach().clone(), model.model.embed_tokens.weight.detach().clone()
    down = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    compress.quantize(model, compress.QAT(bits=4, group_size=32, train="weights_and_scales", steps=3, batch_size=4,
                                          seq_len=32, lr=1e-4, warmup_ratio=0.0), train_data=ids, show_progress=False)
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, down)  # QAT did train
    assert torch.equal(model.lm_head.weight, head) and torch.equal(model.model.embed_tokens.weight, embedding)

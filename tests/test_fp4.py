"""FP4 grids (NVFP4, MXFP4): e2m1 rounding against a hand table and compressed-tensors, RTN and GPTQ weights on the
grid, the nvfp4- / mxfp4-pack-quantized checkpoints in stock transformers and compress.load, W4A4, and the shapes an
FP4 grid cannot group."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig
from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import compress
from compress.errors import CompressError
from compress.estimate import disk_bytes, shapes
from compress.quantize.fp4 import global_scale, round_e2m1_, weight_args
from compress.quantize.gptq import gptq_solve
from compress.quantize.grid import fake_quantize, minmax_qparams, quantized_linears

E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])


def test_e2m1_rounding_by_hand_and_as_compressed_tensors_rounds():
    # by hand: nearest value, ties to the even code (0, 1, 2, 4, 6 have even codes), beyond ±6 clamped
    given = torch.tensor([0.24, 0.25, 0.26, 0.75, 1.25, 1.3, 1.75, 2.5, 2.6, 3.5, 4.9, 5.0, 5.1, 7.0, 100.0])
    wanted = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0, 1.5, 2.0, 2.0, 3.0, 4.0, 4.0, 4.0, 6.0, 6.0, 6.0])
    assert torch.equal(round_e2m1_(given.clone()), wanted)
    assert torch.equal(round_e2m1_(-given), -wanted)
    x = torch.randn(10_000) * 3
    assert torch.equal(round_e2m1_(x.clone()), cast_to_fp4(x.clamp(-6, 6)))


def _on_grid(weight: torch.Tensor, step: torch.Tensor, group: int) -> torch.Tensor:
    values = (weight.reshape(weight.shape[0], -1, group) / step.unsqueeze(-1)).abs()
    return (values.unsqueeze(-1) - E2M1).abs().amin(-1)  # distance to the nearest e2m1 value


@pytest.mark.parametrize("grid", ["nvfp4", "mxfp4"])
def test_rtn_weights_lie_on_the_fp4_grid(tiny_model_dir, grid):
    model, _ = compress.load_model(str(tiny_model_dir))
    compress.quantize(model, compress.RTN(grid=grid), show_progress=False)
    quantized = {name: quant for name, _, quant in quantized_linears(model)}
    assert len(quantized) == 14
    group = 16 if grid == "nvfp4" else 32
    for name, linear, quant in quantized_linears(model):
        step = quant.scale / quant.global_scale if grid == "nvfp4" else quant.scale
        assert quant.scale.shape == (linear.out_features, linear.in_features // group)
        assert _on_grid(linear.weight.detach(), step, group).max() < 1e-4, name
        if grid == "nvfp4":  # scales are e4m3 numbers, the largest near e4m3's max
            assert torch.equal(quant.scale.to(torch.float8_e4m3fn).float(), quant.scale)
            assert 200 < quant.scale.max() <= 448
        else:  # powers of two, no global scale
            assert torch.equal(quant.scale.log2(), quant.scale.log2().round()) and quant.global_scale is None
    if grid == "nvfp4":  # one global scale for q/k/v and one for gate/up, as serving engines fuse them
        layer = "model.layers.0."
        qkv = {quantized[layer + f"self_attn.{p}_proj"].global_scale.item() for p in "qkv"}
        assert len(qkv) == 1
        assert quantized[layer + "mlp.gate_proj"].global_scale == quantized[layer + "mlp.up_proj"].global_scale


@pytest.mark.parametrize("grid", ["nvfp4", "mxfp4"])
def test_gptq_onto_fp4_beats_rtn_and_lies_on_the_grid(grid):
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(0)
    X = (torch.randn(2048, 128, generator=g) * torch.logspace(0, -2, 128)) @ torch.randn(128, 128, generator=g)
    W = torch.randn(48, 128)
    H = 2 * X.T @ X / X.shape[0]
    args = weight_args(grid)
    scale_of_tensor = global_scale([W], args)
    Q, scale, zero = gptq_solve(W, H, args, act_order=True, damp=0.01, block_size=32, where="test",
                                global_scale=scale_of_tensor)
    rtn = fake_quantize(W, *minmax_qparams(W, args, scale_of_tensor), args, scale_of_tensor)
    output_error = lambda A: ((X @ (W - A).T) ** 2).mean().item()  # noqa: E731
    assert output_error(Q) < 0.9 * output_error(rtn)
    assert torch.equal(fake_quantize(Q, scale, zero, args, scale_of_tensor), Q)  # what a loader decompresses
    step = scale / scale_of_tensor if scale_of_tensor is not None else scale
    assert _on_grid(Q, step, args.group_size).max() < 1e-4


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture(scope="module")
def w4a4(tiny_model_dir):
    """The tiny model with NVFP4 weights by GPTQ and NVFP4 inputs (W4A4); read-only for the tests that share it."""
    model, tokenizer = compress.load_model(str(tiny_model_dir))
    calibration = torch.randint(0, len(tokenizer), (4, 64), generator=torch.Generator().manual_seed(0))
    compress.quantize(model, compress.GPTQ(grid="nvfp4", activations="dynamic"), calibration, show_progress=False)
    return model, tokenizer


@pytest.mark.parametrize("method,grid,activations", [("rtn", "mxfp4", "none"), ("rtn", "nvfp4", "none"),
                                                     ("gptq", "nvfp4", "dynamic")])
def test_fp4_checkpoint_loads_in_stock_transformers_and_compress(tiny_model_dir, tmp_path, request, method, grid,
                                                                  activations):
    if method == "gptq":
        model, tokenizer = request.getfixturevalue("w4a4")
    else:
        model, tokenizer = compress.load_model(str(tiny_model_dir))
        compress.quantize(model, compress.RTN(grid=grid, activations=activations), show_progress=False)
    ids = tokenizer("Four bits of floating point, sixteen to a scale.", return_tensors="pt").input_ids
    in_memory = _logits(model, ids)
    compress.save_model(model, tokenizer, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["format"] == f"{grid}-pack-quantized" and config["ignore"] == ["lm_head"]
    scheme = QuantizationConfig.model_validate(config).config_groups["group_0"]  # compressed-tensors' own parser
    assert scheme.weights.type == "float" and scheme.weights.num_bits == 4
    assert (scheme.input_activations is not None) == (activations == "dynamic")

    reloaded, _ = compress.load(tmp_path / "q")  # dense, float32: the very model measured in memory
    torch.testing.assert_close(_logits(reloaded, ids), in_memory, rtol=0, atol=1e-5)
    # stock transformers decompresses to bfloat16 weights: compare with the same model in bfloat16
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.bfloat16)
    ours = _logits(reloaded.to(torch.bfloat16), ids)
    difference = (_logits(stock, ids) - ours).abs().max()
    assert difference < 0.02 * ours.abs().max()
    if activations == "dynamic":  # both round the inputs: far closer to each other than to the weight-only model
        for _, linear, _ in quantized_linears(reloaded):
            del linear.forward
        assert difference < 0.5 * (_logits(reloaded, ids) - ours).abs().max()


def test_w4a4_rounds_each_input_group_onto_the_grid(w4a4):
    model, _ = w4a4
    linear = model.model.layers[0].mlp.down_proj
    quant = next(q for _, m, q in quantized_linears(model) if m is linear)
    assert 0 < quant.input_global_scale.item() < float("inf")
    x = torch.randn(3, linear.in_features) * 4
    # by hand: per 16 inputs, an e4m3 scale of max|x| / 6 under the global scale, then e2m1 rounding
    groups = x.reshape(3, -1, 16)
    gs = quant.input_global_scale
    scale = (groups.abs().amax(-1, keepdim=True) / 6 * gs).to(torch.float8_e4m3fn).float() / gs
    by_hand = (round_e2m1_(groups / scale) * scale).reshape(3, -1)
    with torch.no_grad():
        torch.testing.assert_close(linear(x), by_hand @ linear.weight.T, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(linear(x), x @ linear.weight.T, atol=1e-3)


def test_disk_estimate_of_fp4_matches_the_saved_weights(tiny_model_dir, tmp_path):
    for grid in ("nvfp4", "mxfp4"):
        model, tokenizer = compress.load_model(str(tiny_model_dir))
        compress.quantize(model, compress.RTN(grid=grid), show_progress=False)
        compress.save_model(model, tokenizer, tmp_path / grid)
        saved = (tmp_path / grid / "model.safetensors").stat().st_size
        predicted = disk_bytes(shapes(model.config), grid, dtype_bytes=4, group_size=128)
        assert abs(predicted - saved) / saved < 0.05, (grid, predicted, saved)


def test_fp4_grid_fixes_bits_and_group_and_needs_whole_groups(tmp_path):
    assert compress.RTN(grid="nvfp4").group_size == 16 and compress.GPTQ(grid="mxfp4").group_size == 32
    with pytest.raises(ValueError, match="grid nvfp4 has group_size 16 .* remove `group_size: 64`"):
        compress.GPTQ(grid="nvfp4", group_size=64)
    with pytest.raises(ValueError, match="remove `format: gptq`"):
        compress.RTN(grid="mxfp4", format="gptq")
    with pytest.raises(ValueError, match="rtn does not read: use method gptq"):
        compress.RTN(grid="nvfp4", activations="dynamic")
    with pytest.raises(ValueError, match="set grid nvfp4 or mxfp4"):
        compress.RTN(activations="dynamic")
    # hidden 48: whole groups of 16, not of 32
    config = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=3, num_key_value_heads=1, head_dim=16)
    model = LlamaForCausalLM(config)
    with pytest.raises(CompressError, match=r"quantize \(rtn\) grid: mxfp4: .* model.layers.0.self_attn.q_proj has 48"
                                            r" .* `ignore: \['model.layers.0.self_attn.q_proj'\]`, or use grid nvfp4"):
        compress.quantize(model, compress.RTN(grid="mxfp4"), show_progress=False)
    assert not list(quantized_linears(model))  # nothing was touched
    compress.quantize(model, compress.RTN(grid="nvfp4"), show_progress=False)
    assert len(list(quantized_linears(model))) == 7


def _quiet_run(recipe):
    from rich.console import Console

    from compress.pipeline import run

    return run(recipe, console=Console(quiet=True), show_progress=False)


def test_w4a4_recipe_reports_the_simulation_and_a_width_it_cannot_group_stops_it_first(tiny_recipe, tmp_path):
    recipe = tiny_recipe("  - quantize: {method: rtn, grid: mxfp4, activations: dynamic}", max_tokens=1024)
    report = _quiet_run(recipe)
    assert "MXFP4" in report["steps"][1]["summary"] and "W4A4" in report["steps"][1]["summary"]
    markdown = (tmp_path / "runs" / "tiny" / "report.md").read_text()
    assert "W4A4 FP4 (01-quantize): simulated" in markdown and "speed is not measured" in markdown
    # a model of width 48: no whole groups of 32, so the step is refused before the base model is even saved
    narrow = tmp_path / "narrow"
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                                 num_attention_heads=3, num_key_value_heads=1, head_dim=16)).save_pretrained(narrow)
    AutoTokenizer.from_pretrained(tmp_path / "runs" / "tiny" / "00-base").save_pretrained(narrow)
    text = recipe.read_text().replace(str(tmp_path / "runs" / "tiny"), str(tmp_path / "runs" / "narrow"))
    model_line = next(line for line in text.splitlines() if line.startswith("model:"))
    (tmp_path / "narrow.yaml").write_text(text.replace(model_line, f"model: {narrow}"))
    with pytest.raises(CompressError, match=r"quantize \(rtn\) grid: mxfp4: .* has 48"):
        _quiet_run(tmp_path / "narrow.yaml")
    assert not (tmp_path / "runs" / "narrow" / "00-base").exists()

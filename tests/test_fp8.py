"""FP8 W8A8: weights on the e4m3 grid with per-channel scales, inputs quantized per token at run time (simulated on
the CPU), the float-quantized compressed-tensors checkpoint reloading with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import compress
from compress.quantize.fp8 import E4M3, E4M3_MAX, quantize_activation
from compress.quantize.grid import quantized_linears


def _model_and_ids(tiny_model_dir):
    model, tokenizer = compress.load_model(str(tiny_model_dir))
    ids = tokenizer("Eight bits of floating point, per channel and per token.", return_tensors="pt").input_ids
    return model, tokenizer, ids


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_fp8_weights_lie_on_the_e4m3_grid(tiny_model_dir):
    model, _, _ = _model_and_ids(tiny_model_dir)
    compress.quantize(model, compress.FP8(), show_progress=False)
    linears = list(quantized_linears(model))
    assert len(linears) == 14
    for name, linear, quant in linears:
        assert quant.scale.shape == (linear.out_features, 1)
        scaled = linear.weight.detach() / quant.scale
        assert torch.allclose(scaled.to(E4M3).float(), scaled, rtol=1e-5, atol=0), name  # e4m3 values × scale
        assert torch.allclose(scaled.abs().amax(dim=1), torch.full((linear.out_features,), E4M3_MAX))
        assert quant.input_args is not None and quant.input_args.strategy == "token" and quant.input_args.dynamic


def test_fp8_activations_are_quantized_per_token(tiny_model_dir):
    model, _, ids = _model_and_ids(tiny_model_dir)
    compress.quantize(model, compress.FP8(), show_progress=False)
    linear = model.model.layers[0].mlp.down_proj
    x = torch.randn(5, linear.in_features) * torch.logspace(-2, 2, 5).unsqueeze(1)  # very different token scales
    values, scale = quantize_activation(x)
    assert values.dtype == E4M3 and scale.shape == (5, 1)
    expected = (values.float() * scale) @ linear.weight.T
    with torch.no_grad():
        assert torch.allclose(linear(x), expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(linear(x), x @ linear.weight.T, rtol=1e-5, atol=1e-6)  # inputs did get rounded


def test_fp8_weight_only_leaves_inputs_alone(tiny_model_dir):
    model, _, _ = _model_and_ids(tiny_model_dir)
    compress.quantize(model, compress.FP8(activations="none"), show_progress=False)
    linear = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, linear.in_features)
    with torch.no_grad():
        assert torch.allclose(linear(x), x @ linear.weight.T, atol=1e-6)


def test_fp8_checkpoint_round_trips(tiny_model_dir, tmp_path):
    model, tokenizer, ids = _model_and_ids(tiny_model_dir)
    before = _logits(model, ids)
    compress.quantize(model, compress.FP8(), show_progress=False)
    in_memory = _logits(model, ids)
    assert not torch.equal(before, in_memory)
    assert (in_memory - before).abs().max() < 0.1 * before.abs().max()  # FP8 is close to the float model
    compress.save_model(model, tokenizer, tmp_path / "fp8")
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "float-quantized"
    group = config["config_groups"]["group_0"]
    assert group["weights"]["type"] == "float" and group["weights"]["strategy"] == "channel"
    assert group["input_activations"]["dynamic"] is True and group["input_activations"]["strategy"] == "token"
    with safe_open(tmp_path / "fp8" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == E4M3
    reloaded, _ = compress.load(tmp_path / "fp8")
    torch.testing.assert_close(_logits(reloaded, ids), in_memory, rtol=0, atol=1e-5)
    # stock transformers (with compressed-tensors) reads the same weights
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.float32)
    for name, linear, _ in quantized_linears(model):
        stock_weight = stock.get_submodule(name).weight
        if stock_weight.dtype == E4M3:  # kept compressed: dequantize with its scale
            stock_weight = stock_weight.float() * stock.get_submodule(name).weight_scale.float()
        torch.testing.assert_close(stock_weight.float(), linear.weight, rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a GPU with FP8 tensor cores")
def test_fp8_tensor_core_path_matches_the_simulation():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128, bias=False).cuda().to(torch.bfloat16)
    model = torch.nn.Sequential(linear)
    compress.quantize(model, compress.FP8(), show_progress=False)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    values, scale = quantize_activation(x)
    simulated = ((values.float() * scale) @ linear.weight.float().T)
    with torch.no_grad():
        fused = linear(x)
    assert linear._weight_fp8 is not None  # the tensor-core path ran
    torch.testing.assert_close(fused.float(), simulated, rtol=2e-2, atol=2e-2)

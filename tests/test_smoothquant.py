"""SmoothQuant W8A8 int8: the smoothing scales by the paper's formula, folded exactly; int8 weights per channel and
int8 inputs per token; the int-quantized compressed-tensors checkpoint that compressed-tensors' parser, stock
transformers and the packed runtime (torch._int_mm) read with the same logits; bad input refused before any work."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig

import compress
from compress.checkpoint import save_model
from compress.errors import CompressError
from compress.modules import QUANT_ATTR, WeightQuant
from compress.quantize.grid import fake_quantize, minmax_qparams, quantizable_linears, quantized_linears
from compress.quantize.int8_runtime import WEIGHT_ARGS, enable_int8_activations
from compress.quantize.packed import Int8W8A8Linear
from compress.recipe import load_recipe
from stock_load import stock_logits


def _tiny(tiny_model_dir, loud: bool = True):
    """The tiny Llama with a few loud input channels (what SmoothQuant is for), and calibration ids."""
    model, tokenizer = compress.load_model(str(tiny_model_dir))
    if loud:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.input_layernorm.weight[[3, 17]] *= 40
                layer.post_attention_layernorm.weight[5] *= 30
    ids = tokenizer("Smoothing moves the activations' outliers into the weights, which round them per channel. " * 4,
                    return_tensors="pt").input_ids
    return model, tokenizer, ids.reshape(-1)[: 4 * 16].reshape(4, 16)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _input_maxima(model, ids, name: str) -> torch.Tensor:
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().amax((0, 1))))
    _logits(model, ids)
    handle.remove()
    return torch.stack(seen).amax(0)


def test_scales_follow_the_formula_and_fold_into_the_norm(tiny_model_dir):
    model, _, ids = _tiny(tiny_model_dir)
    attention = model.model.layers[0].self_attn
    x_max = _input_maxima(model, ids, "model.layers.0.self_attn.q_proj")
    w_max = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]).abs().amax(0)
    norm = model.model.layers[0].input_layernorm.weight.detach().clone()
    q_weight = attention.q_proj.weight.detach().clone()
    compress.quantize(model, compress.SmoothQuant(alpha=0.75), ids, show_progress=False)
    s = x_max.pow(0.75) / w_max.pow(0.25)  # paper eq. 4
    torch.testing.assert_close(model.model.layers[0].input_layernorm.weight, norm / s, rtol=1e-5, atol=0)
    # q's columns were multiplied by s before rounding: within half an int8 step of each row's scale
    quant = getattr(attention.q_proj, QUANT_ATTR)
    assert (attention.q_proj.weight - q_weight * s).abs().le(quant.scale / 2 + 1e-6).all()


def test_weights_are_int8_per_channel_and_inputs_int8_per_token(tiny_model_dir):
    model, _, ids = _tiny(tiny_model_dir)
    compress.quantize(model, compress.SmoothQuant(), ids, show_progress=False)
    linears = list(quantized_linears(model))
    assert len(linears) == 14
    for name, linear, quant in linears:
        codes = linear.weight / quant.scale
        assert quant.scale.shape == (linear.out_features, 1), name
        assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 128, name
        assert quant.input_args.type == "int" and quant.input_args.strategy == "token" and quant.input_args.dynamic
    linear = model.model.layers[0].mlp.down_proj
    x = torch.randn(5, linear.in_features) * torch.logspace(-2, 2, 5).unsqueeze(1)  # very different token scales
    scale = x.abs().amax(1, keepdim=True) / 127.5  # by hand: compressed-tensors' symmetric int8, per token
    expected = (torch.round(x / scale).clamp(-128, 127) * scale) @ linear.weight.T
    torch.testing.assert_close(_logits_of(linear, x), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits_of(linear, x), x @ linear.weight.T, rtol=1e-5, atol=1e-5)


def _logits_of(linear, x):
    with torch.no_grad():
        return linear(x)


def test_smoothing_beats_plain_w8a8_and_search_beats_a_bad_alpha(tiny_model_dir):
    model, _, ids = _tiny(tiny_model_dir)
    reference = _logits(model, ids)

    def error(config):
        quantized, _, _ = _tiny(tiny_model_dir)
        compress.quantize(quantized, config, ids, show_progress=False)
        return (_logits(quantized, ids) - reference).pow(2).mean().item()

    plain, _, _ = _tiny(tiny_model_dir)  # int8 weights and inputs, no smoothing
    with torch.no_grad():
        for _, linear in quantizable_linears(plain):
            linear.weight.copy_(fake_quantize(linear.weight, *minmax_qparams(linear.weight, WEIGHT_ARGS), WEIGHT_ARGS))
            enable_int8_activations(linear)
    plain_error = (_logits(plain, ids) - reference).pow(2).mean().item()
    smoothed, searched, extreme = (error(compress.SmoothQuant(alpha=a)) for a in (0.5, "search", 1.0))
    assert smoothed < 0.5 * plain_error, (smoothed, plain_error)
    assert searched < 0.5 * extreme, (searched, extreme)


def test_gptq_rounds_the_smoothed_weights_onto_the_same_grid(tiny_model_dir):
    model, _, ids = _tiny(tiny_model_dir)
    rtn, _, _ = _tiny(tiny_model_dir)
    compress.quantize(model, compress.SmoothQuant(gptq={"act_order": True}), ids, show_progress=False)
    compress.quantize(rtn, compress.SmoothQuant(), ids, show_progress=False)
    for (name, linear, quant), (_, rtn_linear, _) in zip(quantized_linears(model), quantized_linears(rtn)):
        assert quant.args.num_bits == 8 and quant.args.strategy == "channel" and quant.input_args.type == "int"
        assert quant.output_error is not None  # GPTQ measured it
        assert not torch.equal(linear.weight, rtn_linear.weight), name  # GPTQ's rounding, not RTN's


def test_checkpoint_is_int_quantized_and_reads_back_everywhere(tiny_model_dir, tmp_path):
    model, tokenizer, ids = _tiny(tiny_model_dir)
    compress.quantize(model, compress.SmoothQuant(), ids, show_progress=False)
    in_memory = _logits(model, ids)
    save_model(model, tokenizer, tmp_path / "w8a8")
    config = json.loads((tmp_path / "w8a8" / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(config)  # compressed-tensors' own parser
    assert parsed.format == "int-quantized"
    scheme = parsed.config_groups["group_0"]
    assert (scheme.weights.type, scheme.weights.num_bits, scheme.weights.strategy) == ("int", 8, "channel")
    activations = scheme.input_activations
    assert (activations.type, activations.num_bits, activations.strategy, activations.dynamic) == \
        ("int", 8, "token", True)
    reloaded, _ = compress.load(tmp_path / "w8a8")
    torch.testing.assert_close(_logits(reloaded, ids), in_memory, rtol=0, atol=1e-5)
    packed, _ = compress.load(tmp_path / "w8a8", runtime="packed")
    assert {m.kernel for m in packed.modules() if isinstance(m, Int8W8A8Linear)} == {"int8 W8A8 _int_mm"}
    # the int8 GEMM computes the dense model's arithmetic up to float summation order, which may move an activation
    # across a rounding boundary in a later layer: close, not equal
    assert (_logits(packed, ids) - in_memory).abs().max() < 0.01 * in_memory.abs().max()
    # stock transformers with compressed-tensors: its own dynamic per-token rounding of the inputs, the same as ours
    torch.testing.assert_close(stock_logits(tmp_path / "w8a8", ids), in_memory, rtol=0, atol=1e-4)


def test_packed_int8_linear_matches_the_dense_rounding():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    model = torch.nn.Sequential(linear)
    model.config = type("Config", (), {"model_type": "llama"})()  # the families table reads only model_type
    from compress.quantize.int8_runtime import ACTIVATION_ARGS
    from compress.quantize.packed import pack_model

    scale, zero = minmax_qparams(linear.weight, WEIGHT_ARGS)
    with torch.no_grad():
        linear.weight.copy_(fake_quantize(linear.weight, scale, zero, WEIGHT_ARGS))
    setattr(linear, QUANT_ATTR, WeightQuant(WEIGHT_ARGS, scale, zero, ACTIVATION_ARGS))
    enable_int8_activations(linear)
    x = torch.randn(3, 7, 96) * 4
    dense = _logits_of(linear, x)
    assert pack_model(model) == []
    assert isinstance(model[0], Int8W8A8Linear) and model[0].codes.dtype == torch.int8
    torch.testing.assert_close(_logits_of(model[0], x), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bias", [False, True])
def test_fused_int8_kernels_give_the_pytorch_forms_bits(monkeypatch, bias):
    """The default on a GPU (COMPRESS_FUSED_INT8 unset): the input rounded per token and the int32 result scaled by
    one Triton kernel each give the same bits as the PyTorch form around torch._int_mm (COMPRESS_FUSED_INT8=0), for a
    decode row, a long input and an all-zero token."""
    pytest.importorskip("triton")
    from compress.quantize.int8_runtime import ACTIVATION_ARGS
    from compress.quantize.packed import FUSED_INT8_VARIABLE, pack_model

    outputs = {}
    for fused in ("0", "1"):
        if fused == "0":
            monkeypatch.setenv(FUSED_INT8_VARIABLE, fused)
        else:
            monkeypatch.delenv(FUSED_INT8_VARIABLE, raising=False)
        torch.manual_seed(0)
        linear = torch.nn.Linear(192, 136, bias=bias).cuda().to(torch.bfloat16)
        model = torch.nn.Sequential(linear)
        model.config = type("Config", (), {"model_type": "llama"})()
        scale, zero = minmax_qparams(linear.weight, WEIGHT_ARGS)
        with torch.no_grad():
            linear.weight.copy_(fake_quantize(linear.weight, scale, zero, WEIGHT_ARGS))
        setattr(linear, QUANT_ATTR, WeightQuant(WEIGHT_ARGS, scale, zero, ACTIVATION_ARGS))
        enable_int8_activations(linear)
        assert pack_model(model) == []
        assert model[0].fused == (fused == "1")
        x = torch.randn(3, 45, 192, device="cuda", dtype=torch.bfloat16) * 4
        x[0, 3] = 0
        with torch.no_grad():
            outputs[fused] = [model[0](x), model[0](x[:1, :1])]
    for plain, fused in zip(outputs["0"], outputs["1"]):
        assert torch.equal(plain, fused)


def test_bad_input_is_refused_before_any_work(tiny_recipe, tiny_model_dir):
    with pytest.raises(Exception, match=r"alpha 1\.5 is outside \[0, 1\]"):
        load_recipe(tiny_recipe("  - quantize: {method: smoothquant, alpha: 1.5}"))
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gemma", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    gemma = AutoModelForCausalLM.from_config(config)
    with pytest.raises(CompressError, match=r"SmoothQuant cannot fold scales into layers\.0\.input_layernorm"):
        compress.quantize(gemma, compress.SmoothQuant())  # the family check, before asking for calibration
    model, _, ids = _tiny(tiny_model_dir, loud=False)
    model.model.layers[1].mlp.down_proj = torch.nn.Linear(128, 67, bias=False)  # 67 outputs: not tileable
    with pytest.warns(UserWarning, match="not multiples of 8"):
        from compress.quantize.smoothquant import check_smoothquant

        check_smoothquant(model, compress.SmoothQuant())

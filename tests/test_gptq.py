"""GPTQ: the solver against RTN on one Linear, the layer-wise calibration on the tiny model, both checkpoint formats
round-tripping, non-uniform layer widths, and the bad inputs the issue lists."""

from __future__ import annotations

import json

import pytest
import torch

import compress
from compress.checkpoint import save_model
from compress.data import calibration_batches
from compress.errors import CompressError
from compress.quantize.formats import decompressed_state_dict, gptq_state_dict, is_quantized_checkpoint
from compress.quantize.gptq import GPTQ, LayerHessians, gptq_solve, inverse_hessian_factor
from compress.quantize.grid import fake_quantize, minmax_qparams, quantized_linears, weight_args
from compress.quantize.layerwise import LayerwiseCalibration


def _correlated_inputs(tokens: int, width: int, seed: int = 0) -> torch.Tensor:
    """Inputs with a few dominant directions and uneven column scales, like real activations."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(width, width, generator=g)
    scales = torch.logspace(0, -2, width)
    return (torch.randn(tokens, width, generator=g) * scales) @ basis


@pytest.mark.parametrize("bits,group_size,sym,act_order", [
    (4, 32, True, True), (4, 32, True, False), (3, 16, False, True), (2, -1, True, False), (8, 64, False, False),
])
def test_gptq_solve_beats_rtn_and_lies_on_the_grid(bits, group_size, sym, act_order):
    torch.manual_seed(1)
    X = _correlated_inputs(2048, 128)
    W = torch.randn(48, 128)
    H = 2 * X.T @ X / X.shape[0]
    args = weight_args(bits, group_size, sym, "weight" if act_order else None)

    Q, scale, zero = gptq_solve(W, H, args, act_order=act_order, damp=0.01, block_size=32, where="test")
    rtn = fake_quantize(W, *minmax_qparams(W, args), args)

    output_error = lambda A: ((X @ (W - A).T) ** 2).mean().item()  # noqa: E731
    assert output_error(Q) < 0.9 * output_error(rtn)
    assert torch.equal(fake_quantize(Q, scale, zero, args), Q)  # exactly what a loader decompresses
    assert scale.shape == (48, 1 if group_size == -1 else 128 // group_size)


def test_a_process_with_no_rows_of_a_group_still_joins_the_gather(monkeypatch):
    """Under several processes a group with fewer rows than processes leaves some with an empty share: they must
    still send an empty part of each result to the gather (else the others wait there forever)."""
    from compress.quantize import gptq
    from compress.quantize.grid import quantization_args

    torch.manual_seed(0)
    X = _correlated_inputs(512, 32)
    hessian = 2 * X.T @ X / X.shape[0]
    config = GPTQ(bits=4, group_size=16)
    args = quantization_args(config, "weight")
    make = lambda: {"a": torch.nn.Linear(32, 3, bias=False), "b": torch.nn.Linear(32, 2, bias=False)}  # noqa: E731
    torch.manual_seed(1)
    alone = make()
    torch.manual_seed(1)
    empty = make()
    with torch.no_grad():
        gptq._solve_group(alone, ["a", "b"], hessian, args, config, "test")  # one process: every row
    others = [torch.cat([alone["a"].weight, alone["b"].weight]).detach()]
    others += [torch.cat([alone[n].weight_quant.scale for n in "ab"]),
               torch.cat([alone[n].weight_quant.zero_point for n in "ab"])]
    sent = []

    def gather(rows, total):  # this process sends nothing; the other processes' rows come back
        sent.append(rows.shape[0])
        return others[len(sent) - 1] if len(sent) <= 3 else torch.ones(total)

    monkeypatch.setattr(gptq.distributed, "share", lambda items: items[:0])
    monkeypatch.setattr(gptq.distributed, "gather_rows", gather)
    with torch.no_grad():
        gptq._solve_group(empty, ["a", "b"], hessian, args, config, "test")
    assert sent == [0, 0, 0, 0, 0]  # quantized rows, scales, zero points, changed and kept energies
    for name in "ab":
        assert torch.equal(empty[name].weight, alone[name].weight)


def test_gptq_zero_columns_and_non_positive_definite_hessian():
    X = _correlated_inputs(512, 64)
    X[:, 5] = 0  # a column no input ever reaches
    H = 2 * X.T @ X / X.shape[0]
    args = weight_args(4, 16, True)
    Q, _, _ = gptq_solve(torch.randn(8, 64), H, args, act_order=True, damp=0.01, block_size=16, where="test")
    assert torch.isfinite(Q).all() and (Q[:, 5] == 0).all()

    broken = H.clone()
    broken[3, 3] = float("nan")
    with pytest.raises(CompressError, match="layer 7 .*not positive definite.*more calibration samples"):
        inverse_hessian_factor(broken, 0.01, "layer 7 (mlp.down_proj)")


def _tiny(tiny_model_dir):
    model, tokenizer = compress.load_model(str(tiny_model_dir))
    ids = calibration_batches(tokenizer, "wikitext2-valid", samples=8, seq_len=64)
    return model, tokenizer, ids


def test_hessians_are_shared_by_linears_reading_one_input(tiny_model_dir):
    model, _, ids = _tiny(tiny_model_dir)
    calibration = LayerwiseCalibration(model, ids, torch.device("cpu"), batch_tokens=128)
    assert len(calibration.hidden) == 4  # 8 samples x 64 tokens in chunks of 2 samples
    layer = calibration.layers[0]
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    hessians = LayerHessians(linears).collect(calibration, layer)
    groups = sorted(sorted(names) for names, _ in hessians)
    assert groups == [["mlp.down_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["self_attn.k_proj", "self_attn.q_proj",
                      "self_attn.v_proj"], ["self_attn.o_proj"]]
    # the shared Hessian is 2/n Σ x xᵀ of the normed hidden state that q, k and v all read
    with torch.no_grad():
        x = torch.cat([layer.input_layernorm(h).reshape(-1, 64) for h in calibration.hidden])
    qkv = next(h for names, h in hessians if "self_attn.q_proj" in names)
    assert torch.allclose(qkv, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# the whole set in one forward, or 8 chunks: the same sequential algorithm
@pytest.mark.parametrize("batch_tokens", [None, 128])
def test_gptq_model_is_closer_to_the_float_model_than_rtn(tiny_model_dir, batch_tokens):
    model, _, ids = _tiny(tiny_model_dir)
    reference = _logits(model, ids[:2])
    rtn_model, _, _ = _tiny(tiny_model_dir)
    compress.quantize(rtn_model, compress.RTN(bits=3, group_size=16))
    compress.quantize(model, GPTQ(bits=3, group_size=16, batch_tokens=batch_tokens), ids, show_progress=False)
    gptq_error = (_logits(model, ids[:2]) - reference).pow(2).mean()
    rtn_error = (_logits(rtn_model, ids[:2]) - reference).pow(2).mean()
    assert gptq_error < rtn_error
    assert len(list(quantized_linears(model))) == 14  # 7 per layer, lm_head left in full precision


def test_rows_solved_in_slices_give_the_same_codes(tiny_model_dir, monkeypatch):
    """Rows are independent given the Hessian: slicing each Linear's rows (as a Mixtral gate/up group needs) changes
    no code, scale or recorded sensitivity."""
    from compress.quantize import gptq

    whole, _, ids = _tiny(tiny_model_dir)
    compress.quantize(whole, GPTQ(bits=4, group_size=16), ids, show_progress=False)
    monkeypatch.setattr(gptq, "SOLVE_SLICE", 5 * 64)  # 5 rows of a 64-wide input per solve: uneven slices
    sliced, _, _ = _tiny(tiny_model_dir)
    compress.quantize(sliced, GPTQ(bits=4, group_size=16), ids, show_progress=False)
    pairs = list(zip(quantized_linears(whole), quantized_linears(sliced)))
    assert len(pairs) == 14
    for (name, a, quant_a), (_, b, quant_b) in pairs:
        assert torch.equal(a.weight, b.weight), name
        assert torch.equal(quant_a.scale, quant_b.scale), name
        assert quant_a.output_error == pytest.approx(quant_b.output_error, rel=1e-5), name


@pytest.mark.parametrize("format", ["compressed-tensors", "gptq"])
def test_gptq_checkpoint_round_trips_to_the_same_logits(tiny_model_dir, tmp_path, format):
    model, tokenizer, ids = _tiny(tiny_model_dir)
    compress.quantize(model, GPTQ(bits=4, group_size=32, format=format), ids, show_progress=False)
    save_model(model, tokenizer, tmp_path / "q", format=format)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert is_quantized_checkpoint(config)
    reloaded, _ = compress.load(tmp_path / "q")
    assert torch.allclose(_logits(reloaded, ids[:2]), _logits(model, ids[:2]), atol=1e-4)
    if format == "gptq":
        quant = json.loads((tmp_path / "q" / "quantize_config.json").read_text())
        assert quant == config["quantization_config"]
        assert quant["bits"] == 4 and quant["group_size"] == 32 and quant["checkpoint_format"] == "gptq"


def test_gptq_v1_layout_matches_autogptq_reference(tiny_model_dir):
    """Unpack qweight/qzeros with AutoGPTQ's own shift-and-mask recipe (written out here independently)."""
    model, _, ids = _tiny(tiny_model_dir)
    compress.quantize(model, compress.RTN(bits=4, group_size=32, format="gptq"))
    state, config = gptq_state_dict(model)
    name = "model.layers.0.self_attn.q_proj"
    qweight, qzeros, scales, g_idx = (state[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx"))
    assert qweight.dtype == torch.int32 and qweight.shape == (64 // 8, 64)
    assert qzeros.shape == (2, 64 // 8) and scales.shape == (2, 64) and scales.dtype == torch.float16
    wf = torch.arange(0, 32, 4, dtype=torch.int32)
    zeros = torch.bitwise_and(torch.bitwise_right_shift(qzeros.unsqueeze(2).expand(-1, -1, 8), wf), 15) + 1
    weight = torch.bitwise_and(torch.bitwise_right_shift(qweight.unsqueeze(1).expand(-1, 8, -1), wf.unsqueeze(-1)), 15)
    weight = weight.reshape(-1, weight.shape[-1])
    dense = scales[g_idx.long()].float() * (weight - zeros.reshape(scales.shape)[g_idx.long()])
    assert torch.allclose(dense.T, model.get_submodule(name).weight, atol=1e-3)
    assert (zeros == 8).all()  # symmetric 4-bit: the zero point is the middle of 0..15


def test_gptq_on_layers_of_different_widths(tiny_model_dir):
    """A pruned model's layers differ in width: here layer 1's MLP is 96 wide and its attention has 2 query heads."""
    model, _, ids = _tiny(tiny_model_dir)
    layer = model.model.layers[1]
    torch.manual_seed(3)
    for name, shape in {"mlp.gate_proj": (96, 64), "mlp.up_proj": (96, 64), "mlp.down_proj": (64, 96)}.items():
        parent, attr = name.rsplit(".", 1)
        setattr(layer.get_submodule(parent), attr, torch.nn.Linear(shape[1], shape[0], bias=False))
    attention = layer.self_attn
    attention.q_proj = torch.nn.Linear(64, 32, bias=False)
    attention.o_proj = torch.nn.Linear(32, 64, bias=False)
    attention.config = attention.config.__class__(**{**attention.config.to_dict(), "num_attention_heads": 2})
    attention.num_key_value_groups = 1
    reference = _logits(model, ids[:2])

    compress.quantize(model, GPTQ(bits=4, group_size=32, batch_tokens=128), ids, show_progress=False)
    widths = {n: m.weight.shape for n, m, _ in quantized_linears(model)}
    assert widths["model.layers.1.mlp.down_proj"] == (64, 96) and widths["model.layers.0.mlp.down_proj"] == (64, 128)
    assert torch.isfinite(_logits(model, ids[:2])).all()
    assert (_logits(model, ids[:2]) - reference).abs().mean() < reference.abs().mean()
    for save in ("compressed-tensors", "gptq"):  # both layouts hold per-layer shapes
        state, config = (gptq_state_dict(model) if save == "gptq" else _ct_state(model))
        dense, grids = decompressed_state_dict(state, {"quantization_config": config})
        assert set(grids) == {name for name, _, _ in quantized_linears(model)}
        for name, linear, _ in quantized_linears(model):
            assert torch.allclose(dense[f"{name}.weight"].float(), linear.weight, atol=1e-3), (save, name)


def _ct_state(model):
    from compress.quantize.formats import compressed_tensors_state_dict

    state, compressor = compressed_tensors_state_dict(model)
    return state, compressor.quantization_config.model_dump(mode="json")


def test_nan_in_a_layer_output_names_the_layer(tiny_model_dir):
    model, _, ids = _tiny(tiny_model_dir)
    model.model.layers[0].register_forward_hook(lambda module, args, output: output * float("nan"))
    with pytest.raises(CompressError, match="decoder layer 0 produced NaN/inf"):
        compress.quantize(model, GPTQ(bits=4, group_size=32), ids, show_progress=False)


def test_non_finite_hessian_names_the_step_and_the_layer(tiny_model_dir):
    model, _, ids = _tiny(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight.fill_(float("nan"))
    # not "not positive definite, raise damp": no damping makes a NaN Hessian usable
    with pytest.raises(CompressError, match=r"^quantize \(GPTQ\), layer 1 \(mlp.gate_proj, mlp.up_proj\): the Hessian "
                                            r"of the calibration inputs has \d+ NaN or inf entries"):
        compress.quantize(model, GPTQ(bits=4, group_size=32), ids, show_progress=False)


def test_gptq_needs_calibration_and_divisible_groups(tiny_model_dir):
    model, _, ids = _tiny(tiny_model_dir)
    with pytest.raises(CompressError, match="calibration token ids"):
        compress.quantize(model, GPTQ(bits=4, group_size=32))
    with pytest.raises(CompressError, match="group_size 48 does not divide"):
        compress.quantize(model, GPTQ(bits=4, group_size=48), ids)


@pytest.mark.parametrize("fields,message", [
    ({"bits": 3, "format": "gptq"}, "for 3 bits use format compressed-tensors"),
    ({"sym": False, "format": "gptq"}, "use sym: true"),
    ({"damp": 0}, "greater than 0"),
])
def test_gptq_config_rejects_what_cannot_be_written(fields, message):
    with pytest.raises(ValueError, match=message):
        GPTQ(**fields)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows,columns", [(40, 128), (33, 70)])
def test_gpu_kernel_matches_the_eager_column_loop(rows, columns):
    from compress.quantize import kernels
    from compress.quantize.gptq import quantize_block

    torch.manual_seed(0)
    X = _correlated_inputs(1024, columns).cuda()
    upper, _ = inverse_hessian_factor(2 * X.T @ X / 1024, 0.01, "test")
    block = torch.randn(rows, columns, device="cuda")
    scale = torch.rand(rows, columns, device="cuda") * 0.2 + 0.05
    zero = torch.randint(-2, 3, (rows, columns), device="cuda").float()
    eager_q, eager_e = quantize_block(block.clone(), upper, scale, zero, -8, 7)
    fused_q, fused_e = kernels.quantize_block(block.clone(), upper, scale, zero, -8, 7)
    assert (fused_q != eager_q).float().mean() < 1e-3  # a rare tie may round apart after float reassociation
    assert torch.allclose(fused_e, eager_e, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("offload", [False, True])
def test_gptq_on_gpu_matches_cpu(tiny_model_dir, offload):
    model, _, ids = _tiny(tiny_model_dir)
    cpu_model, _, _ = _tiny(tiny_model_dir)
    # offload always takes two chunked passes per layer; give the CPU run the same schedule
    batch_tokens = 16384 if offload else None
    compress.quantize(cpu_model, GPTQ(bits=4, group_size=32, batch_tokens=batch_tokens), ids, show_progress=False)
    if not offload:
        model.cuda()
    compress.quantize(model, GPTQ(bits=4, group_size=32, offload=offload), ids, show_progress=False)
    assert next(model.parameters()).device.type == ("cpu" if offload else "cuda")
    for (name, a, quant), (_, b, cpu_quant) in zip(quantized_linears(model), quantized_linears(cpu_model)):
        assert (a.weight.cpu() != b.weight).float().mean() < 0.02, name  # float reassociation flips rare ties
        assert quant.output_error == pytest.approx(cpu_quant.output_error, rel=0.05), name  # offload keeps it too


@pytest.mark.parametrize("width", [100, 1100, 1536])
def test_gram_skipping_the_lower_blocks_equals_the_full_product(width):
    from compress.quantize.gptq import add_gram

    x = torch.randn(300, width)
    total = torch.ones(width, width)
    add_gram(total, x)
    torch.testing.assert_close(total, 1 + x.T @ x, rtol=1e-5, atol=1e-3)

"""AWQ: folding keeps the float function, the search protects channels that meet large activations, checkpoints round
trip through stock transformers, GQA and pruned widths, the sensitivity it records, and the bad inputs the issue
lists."""

from __future__ import annotations

import pytest
import torch

import compress
from compress.architectures import FAMILIES
from compress.checkpoint import save_model
from compress.data import calibration_batches
from compress.errors import CompressError
from compress.quantize.awq import LLAMA_GROUPS, fold_scales, layer_groups, quantize_awq
from compress.quantize.grid import quantized_linears, relative_output_error
from stock_load import stock_logits

LLAMA = FAMILIES["llama"]  # the layout of the Llama models these tests build


def _tiny(tiny_model_dir):
    model, tokenizer = compress.load_model(str(tiny_model_dir))
    ids = calibration_batches(tokenizer, "wikitext2-valid", samples=8, seq_len=64)
    return model, tokenizer, ids


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _loud_channels(model, factor: float = 30.0) -> None:
    """Make a few input channels of every Linear group carry large activations, as real LLMs' do: the norms scale
    channels 0-3 up (and the Linears reading them scale those columns down, so outputs stay of the usual size)."""
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, linears in ((layer.input_layernorm, ("q_proj", "k_proj", "v_proj")),
                                  (layer.post_attention_layernorm, ("gate_proj", "up_proj"))):
                norm.weight[:4] *= factor
                parent = layer.self_attn if linears[0] == "q_proj" else layer.mlp
                for name in linears:
                    getattr(parent, name).weight[:, :4] /= factor ** 0.5


def test_folding_scales_keeps_the_float_function(tiny_model_dir):
    model, _, ids = _tiny(tiny_model_dir)
    reference = _logits(model, ids[:2])
    torch.manual_seed(1)
    for index, layer in enumerate(model.model.layers):
        for group in layer_groups(layer, index, LLAMA):
            width = layer.get_submodule(group.linears[0]).in_features
            fold_scales(layer, group, torch.rand(width) * 4 + 0.25)
    assert torch.allclose(_logits(model, ids[:2]), reference, atol=1e-4)


def test_gqa_skips_the_v_to_o_fold_and_equal_heads_keep_it(tiny_model_dir):
    model, _, _ = _tiny(tiny_model_dir)  # 4 query heads, 2 KV heads: v's 32 outputs feed o's 64 inputs
    groups = [g.prev for g in layer_groups(model.model.layers[0], 0, LLAMA)]
    assert groups == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]
    from transformers import LlamaConfig, LlamaForCausalLM

    mha = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2))
    assert [g.prev for g in layer_groups(mha.model.layers[0], 0, LLAMA)] == [g.prev for g in LLAMA_GROUPS]


@pytest.mark.parametrize("loss", ["block", "linear"])
def test_awq_protects_loud_channels_better_than_rtn(tiny_model_dir, loss):
    model, _, ids = _tiny(tiny_model_dir)
    _loud_channels(model)
    reference = _logits(model, ids[:2])
    rtn, _, _ = _tiny(tiny_model_dir)
    _loud_channels(rtn)
    compress.quantize(rtn, compress.RTN(bits=3, group_size=32))
    compress.quantize(model, compress.AWQ(bits=3, group_size=32, loss=loss, clip=False), ids, show_progress=False)
    awq_error = (_logits(model, ids[:2]) - reference).pow(2).mean()
    rtn_error = (_logits(rtn, ids[:2]) - reference).pow(2).mean()
    assert awq_error < 0.7 * rtn_error, (awq_error, rtn_error)
    assert len(list(quantized_linears(model))) == 14


def test_awq_checkpoint_loads_in_stock_transformers(tiny_model_dir, tmp_path):
    model, tokenizer, ids = _tiny(tiny_model_dir)
    compress.quantize(model, compress.AWQ(bits=4, group_size=32, grid_points=5), ids, show_progress=False)
    save_model(model, tokenizer, tmp_path / "awq")
    torch.testing.assert_close(stock_logits(tmp_path / "awq", ids[:2]), _logits(model, ids[:2]), atol=1e-4, rtol=0)


def test_awq_then_gptq_and_sensitivity_is_the_relative_output_error(tiny_model_dir):
    model, _, ids = _tiny(tiny_model_dir)
    compress.quantize(model, compress.AWQ(bits=4, group_size=32, gptq={"act_order": True}), ids,
                      show_progress=False)
    errors = {name: quant.output_error for name, _, quant in quantized_linears(model)}
    assert len(errors) == 14 and all(0 < e < 0.5 for e in errors.values()), errors
    # the error GPTQ records is ||(Q − W') X'||² / ||W' X'||² for the weights and inputs it saw (scaled by AWQ);
    # written out here: relative_output_error against a direct computation on random data
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(8, 16, generator=g), torch.randn(100, 16, generator=g)
    q = w + 0.1 * torch.randn(8, 16, generator=g)
    direct = ((x @ (q - w).T).pow(2).sum() / (x @ w.T).pow(2).sum()).item()
    assert relative_output_error(w, q, x.T @ x) == pytest.approx(direct, rel=1e-4)


def test_awq_on_layers_of_different_widths(tiny_model_dir):
    """A pruned model: layer 1's MLP is 96 wide."""
    model, _, ids = _tiny(tiny_model_dir)
    layer = model.model.layers[1]
    torch.manual_seed(3)
    for name, shape in {"gate_proj": (96, 64), "up_proj": (96, 64), "down_proj": (64, 96)}.items():
        setattr(layer.mlp, name, torch.nn.Linear(shape[1], shape[0], bias=False))
    reference = _logits(model, ids[:2])
    compress.quantize(model, compress.AWQ(bits=4, group_size=32, grid_points=5), ids, show_progress=False)
    assert model.model.layers[1].mlp.down_proj.weight.shape == (64, 96)
    assert (_logits(model, ids[:2]) - reference).abs().mean() < 0.2 * reference.abs().mean()


def test_awq_names_the_module_it_cannot_fold_into():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gemma", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, 64, (2, 16))
    with pytest.raises(CompressError, match=r"layers\.0\.input_layernorm \(GemmaRMSNorm\).*gptq or rtn"):
        quantize_awq(model, compress.AWQ(bits=4, group_size=32), ids, show_progress=False)
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    layer = llama.model.layers[0]
    del layer.mlp.up_proj  # e.g. a fused gate_up_proj
    with pytest.raises(CompressError, match="AWQ cannot scale decoder layer 0 .*up_proj"):
        layer_groups(layer, 0, LLAMA)


def test_awq_refuses_a_quantized_model_and_needs_calibration(tiny_model_dir):
    model, _, ids = _tiny(tiny_model_dir)
    with pytest.raises(CompressError, match="needs calibration token ids"):
        compress.quantize(model, compress.AWQ(bits=4, group_size=32))
    compress.quantize(model, compress.RTN(bits=4, group_size=32))
    with pytest.raises(CompressError, match="quantized model"):
        compress.quantize(model, compress.AWQ(bits=4, group_size=32), ids)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_ignored_linears_stay_float_and_are_written_unquantized(tiny_model_dir, tmp_path, method):
    model, tokenizer, ids = _tiny(tiny_model_dir)
    kept = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    grid = dict(bits=4, group_size=32, ignore=("model.layers.1.mlp.down_proj", "*.0.self_attn.o_proj"))
    config = {"rtn": compress.RTN, "gptq": compress.GPTQ, "awq": compress.AWQ}[method](**grid)
    compress.quantize(model, config, ids, show_progress=False)
    names = {name for name, _, _ in quantized_linears(model)}
    assert len(names) == 12 and "model.layers.1.mlp.down_proj" not in names
    assert "model.layers.0.self_attn.o_proj" not in names
    if method != "awq":  # AWQ scales every Linear of a group (exactly), rounding only the quantized ones
        assert torch.equal(model.model.layers[1].mlp.down_proj.weight, kept)
    save_model(model, tokenizer, tmp_path / "mixed")
    reloaded, _ = compress.load(tmp_path / "mixed")
    assert {name for name, _, _ in quantized_linears(reloaded)} == names
    assert torch.allclose(_logits(reloaded, ids[:2]), _logits(model, ids[:2]), atol=1e-4)


def _tiny_qwen2():
    """A random Qwen2 laid out as the real 1.5B one: biased q/k/v (non-zero, so the attention block that judges the
    scales adds them), grouped-query attention (4 heads, 2 KV heads: no v → o fold)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for name in ("q_proj", "k_proj", "v_proj"):
                getattr(layer.self_attn, name).bias.normal_(0, 0.5)
    return model, torch.randint(0, 128, (8, 64), generator=torch.Generator().manual_seed(0))


def test_awq_on_a_biased_gqa_qwen2_keeps_the_float_function_and_beats_rtn():
    import copy

    model, ids = _tiny_qwen2()
    _loud_channels(model)
    reference = _logits(model, ids[:2])
    folded = copy.deepcopy(model)
    torch.manual_seed(1)
    for index, layer in enumerate(folded.model.layers):
        groups = layer_groups(layer, index, FAMILIES["qwen2"])
        assert [g.prev for g in groups] == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]  # GQA
        for group in groups:
            fold_scales(layer, group, torch.rand(layer.get_submodule(group.linears[0]).in_features) * 4 + 0.25)
    assert torch.allclose(_logits(folded, ids[:2]), reference, atol=1e-4)
    rtn = copy.deepcopy(model)
    compress.quantize(rtn, compress.RTN(bits=3, group_size=32), show_progress=False)
    compress.quantize(model, compress.AWQ(bits=3, group_size=32, clip=False), ids, show_progress=False)
    awq_error = (_logits(model, ids[:2]) - reference).pow(2).mean()
    rtn_error = (_logits(rtn, ids[:2]) - reference).pow(2).mean()
    assert awq_error < 0.7 * rtn_error, (awq_error, rtn_error)


def _straightforward_awq(model, ids, args, grid_points: int, search_samples: int | None) -> list[torch.Tensor]:
    """AWQ's scale search written out plainly, as the paper and AutoAWQ state it: the float model's inputs of every
    block, and for every candidate the block that judges it (the attention, the MLP, or the Linear itself) run with
    the rounded weights (the attention and the MLP on the first `search_samples` samples, a Linear on all), the
    smallest squared output error kept and folded. Returns the chosen scales in the order they are folded."""
    from compress.quantize.awq import _column_magnitude, _rounded, candidate_scales

    seen: dict[str, tuple] = {}
    handles = []
    for index, layer in enumerate(model.model.layers):
        for name in ("self_attn", "self_attn.o_proj", "mlp", "mlp.down_proj", "self_attn.q_proj", "mlp.gate_proj"):
            def record(module, args_, kwargs, output, key=f"{index}.{name}"):
                seen[key] = (args_[0] if args_ else kwargs["hidden_states"], kwargs,
                             output[0] if isinstance(output, tuple) else output)

            handles.append(layer.get_submodule(name).register_forward_hook(record, with_kwargs=True))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    chosen = []
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            for group in layer_groups(layer, index, LLAMA):
                linears = [layer.get_submodule(name) for name in group.linears]
                originals = [linear.weight.detach().clone() for linear in linears]
                x = seen[f"{index}.{group.linears[0]}"][0]
                x_mean = x.abs().reshape(-1, x.shape[-1]).mean(0)
                block = layer.get_submodule(group.inspect)
                block_input, kwargs, reference = seen[f"{index}.{group.inspect}"]
                take = ids.shape[0] if search_samples is None or group.inspect in group.linears else search_samples
                kwargs = {k: (tuple(t[:take] for t in v) if isinstance(v, tuple) else v) for k, v in kwargs.items()
                          if k not in ("hidden_states", "past_key_values", "past_key_value")}
                best, best_error = None, float("inf")
                for scales in candidate_scales(x_mean, _column_magnitude(originals, args.group_size), grid_points):
                    for linear, weight in zip(linears, originals):
                        linear.weight.copy_(_rounded(weight * scales, args) / scales)
                    output = block(block_input[:take], **kwargs)
                    output = output[0] if isinstance(output, tuple) else output
                    error = (output - reference[:take]).pow(2).sum().item()
                    if error < best_error:
                        best, best_error = scales, error
                for linear, weight in zip(linears, originals):
                    linear.weight.copy_(weight)
                fold_scales(layer, group, best)
                chosen.append(best)
    return chosen


@pytest.mark.parametrize("search_samples", [None, 3])
def test_awq_search_chooses_the_straightforward_scales_and_weights(monkeypatch, search_samples):
    """The search's shortcuts (a lone Linear judged from XᵀX, the blocks run once per candidate on the recorded
    inputs of the first samples only) choose the scales, and so the rounded weights, that running every block on
    those samples for every candidate chooses: on a random Llama with full attention (v → o folds) and loud
    channels."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.quantize import awq
    from compress.quantize.grid import fake_quantize, minmax_qparams, quantization_args

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4)).eval()
    _loud_channels(model)
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    config = compress.AWQ(bits=3, group_size=32, grid_points=10, clip=False,
                          search_tokens=None if search_samples is None else search_samples * ids.shape[1])
    plain = copy.deepcopy(model)
    expected = _straightforward_awq(plain, ids, quantization_args(config), config.grid_points, search_samples)
    chosen = []
    fold = awq.fold_scales
    monkeypatch.setattr(awq, "fold_scales", lambda layer, group, scales: (chosen.append(scales.clone()),
                                                                           fold(layer, group, scales)))
    quantize_awq(model, config, ids, show_progress=False)
    assert len(chosen) == len(expected) == 8  # 2 layers x (q/k/v, v → o, gate/up, up → down)
    for ours, theirs in zip(chosen, expected):
        assert torch.allclose(ours, theirs, rtol=1e-4), (ours - theirs).abs().max()
    args = quantization_args(config)
    for (name, linear), (_, reference) in zip(awq.quantizable_linears(model), awq.quantizable_linears(plain)):
        rounded = fake_quantize(reference.weight, *minmax_qparams(reference.weight, args), args)
        assert torch.allclose(linear.weight, rounded, atol=1e-5), name


@pytest.mark.parametrize("propagate", ["float", "quantized"])
def test_awq_searches_each_layer_on_the_float_or_the_rounded_layers_before_it(tiny_model_dir, propagate):
    """What layer 1 is searched on: the float model's layer-1 inputs (float), or those of the model whose layer 0 AWQ
    has already scaled, clipped and rounded (quantized): recorded during the search, recomputed afterwards by the
    model's own forward."""
    model, _, ids = _tiny(tiny_model_dir)
    float_model, _, _ = _tiny(tiny_model_dir)
    seen = []

    def first_input(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).clone())

    def layer1_input(m):
        captured = []
        handle = m.model.layers[1].register_forward_pre_hook(
            lambda module, args, kwargs: captured.append(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True)
        _logits(m, ids)
        handle.remove()
        return captured[0]

    handle = model.model.layers[1].register_forward_pre_hook(first_input, with_kwargs=True)
    compress.quantize(model, compress.AWQ(bits=3, group_size=32, propagate=propagate), ids, show_progress=False)
    handle.remove()
    searched_on = seen[0]
    from_quantized, from_float = layer1_input(model), layer1_input(float_model)
    assert not torch.allclose(from_quantized, from_float, atol=1e-4)  # rounding layer 0 changed its outputs
    expected = from_quantized if propagate == "quantized" else from_float
    assert torch.allclose(searched_on, expected, atol=1e-5)


def test_awq_propagate_quantized_refuses_gptq_rounding():
    with pytest.raises(ValueError, match="propagate: quantized needs the layers rounded as AWQ goes"):
        compress.AWQ(bits=4, propagate="quantized", gptq={})


def test_awq_first_token_weight_counts_each_first_token_that_many_times(tiny_model_dir):
    """With first_token_weight w, XᵀX gains (w − 1)·x₀ᵀx₀ of each sequence's first input, and the block's output
    error counts the first tokens' squared error w times (both against a hand computation)."""
    from compress.quantize.awq import LayerInputs
    from compress.quantize.grid import quantizable_linears
    from compress.quantize.layerwise import LayerwiseCalibration

    model, _, ids = _tiny(tiny_model_dir)
    layer = model.model.layers[0]
    calibration = LayerwiseCalibration(model, ids, torch.device("cpu"), batch_tokens=ids.numel())
    hidden = list(calibration.hidden)
    seen = []
    handle = layer.self_attn.q_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    linears, groups = dict(quantizable_linears(layer)), layer_groups(layer, 0, LLAMA)
    plain = LayerInputs(calibration, layer, 0, groups, linears)
    calibration.hidden[:] = hidden
    weighted = LayerInputs(calibration, layer, 0, groups, linears, first_token_weight=5.0)
    handle.remove()
    first = seen[0][:, 0].double()
    expected = plain.grams["self_attn.q_proj"].double() + 4 * first.T @ first
    assert torch.allclose(weighted.grams["self_attn.q_proj"].double(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(weighted.magnitude["self_attn.q_proj"], plain.magnitude["self_attn.q_proj"])

    with torch.no_grad():
        layer.self_attn.o_proj.weight.mul_(1.1)  # some output error to weigh
        output = layer.self_attn(plain.inputs["self_attn"][0], **plain.kwargs["self_attn"][0])[0]
    squared = (output - plain.outputs["self_attn"][0]).double().pow(2)
    by_hand = (squared.sum() + 4 * squared[:, 0].sum()) / (squared.numel() + 4 * squared[:, 0].numel())
    with torch.no_grad():  # as the search calls it
        assert weighted.output_error(layer.self_attn, "self_attn") == pytest.approx(float(by_hand), rel=1e-5)
        assert plain.output_error(layer.self_attn, "self_attn") == pytest.approx(float(squared.mean()), rel=1e-5)


def test_the_search_compares_on_tf32_only_on_a_gpu_and_restores_the_precision():
    """On CUDA the candidates' float32 products may use TF32 (the choice is emulated against float32 in
    eval/awq_tf32_check.py); elsewhere nothing changes, and the caller's setting comes back even after an error."""
    from compress.quantize.awq import _search_precision

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        with _search_precision(torch.device("cpu")):
            assert torch.get_float32_matmul_precision() == "highest"
        with _search_precision(torch.device("cuda")):  # sets a flag only: no GPU needed
            assert torch.get_float32_matmul_precision() == "high"
        assert torch.get_float32_matmul_precision() == "highest"
        with pytest.raises(RuntimeError), _search_precision(torch.device("cuda")):
            raise RuntimeError("a candidate's forward failed")
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)

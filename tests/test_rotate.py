"""Rotations of the residual stream (compress.rotate): the float model's logits are unchanged (tiny random Llama with
biases on o_proj / down_proj and a tied head, tiny Qwen2 with q/k/v biases, Phi-3's fused projections), the stream
is really rotated, the families and settings it cannot rotate are refused before any work, and the rotated checkpoint
loads in stock transformers; on SmolLM2 the logits stay and the stream's peaks are spread."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoConfig, AutoModelForCausalLM

import compress
from compress.errors import CompressError, StepConfigError
from compress.rotate import block_size, check_rotatable, hadamard, random_orthogonal, rotate_columns
from stock_load import stock_logits

IDS = torch.randint(0, 500, (4, 32), generator=torch.Generator().manual_seed(1))
SMALL = dict(vocab_size=512, hidden_size=96, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, head_dim=16)
MODELS = {
    # biases on every Linear: o_proj's and down_proj's are rotated with their outputs
    "llama": dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "qwen2": dict(tie_word_embeddings=False),  # q/k/v biases, read side: left as they are
    "phi3": dict(tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1),  # fused qkv, gate_up
}


def tiny(kind: str, seed: int = 0, **overrides):
    """A tiny random model whose norms and biases are far from their initial 1 and 0 (a fold that forgot one would
    show in the logits)."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(kind, **{**SMALL, **MODELS.get(kind, {}), **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.add_(torch.randn_like(parameter) * 0.5)
    return model


def _run(model, **kwargs):
    with torch.no_grad():
        return model(input_ids=IDS, **kwargs)


def test_hadamard_and_random_blocks_are_orthogonal_and_spread_an_outlier():
    for block in (hadamard(64), random_orthogonal(96, torch.Generator().manual_seed(3))):
        torch.testing.assert_close(block.T @ block, torch.eye(block.shape[0], dtype=torch.float64))
    assert torch.equal(hadamard(4) * 2, torch.tensor([[1., 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]],
                                                      dtype=torch.float64))
    x = torch.ones(1, 576)
    x[0, 5] = 400.0  # one outlier channel: 400x the rest
    rotated = rotate_columns(x, hadamard(64))
    assert rotated.abs().max() < 60 and torch.allclose(rotated.norm(), x.norm())
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(48)


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("rotation", [compress.Rotate(), compress.Rotate(kind="random", seed=1),
                                      compress.Rotate(kind="random", block=32, heads=False)],
                         ids=["hadamard", "random", "random-block32-noheads"])
def test_the_float_model_computes_the_same_logits_on_a_rotated_stream(kind, rotation):
    model = tiny(kind)
    before = _run(model, output_hidden_states=True)
    rotated = copy.deepcopy(model)
    compress.rotate(rotated, rotation)
    after = _run(rotated, output_hidden_states=True)
    torch.testing.assert_close(after.logits, before.logits, rtol=0, atol=2e-5)
    assert before.logits.abs().max() > 0.3  # the logits compared are not all near zero
    # the residual stream after layer 0 is the original one times Q: the weights were rotated, not left alone
    block = hadamard(block_size(model, rotation)) if rotation.kind == "hadamard" else None
    stream, new_stream = before.hidden_states[1], after.hidden_states[1]
    assert (new_stream - stream).abs().max() > 0.1 * stream.abs().max()
    if block is not None:
        torch.testing.assert_close(new_stream, rotate_columns(stream, block), rtol=0, atol=2e-5)
    for name, parameter in rotated.named_parameters():
        if "norm" in name and parameter.dim() == 1 and parameter.shape[0] == SMALL["hidden_size"]:
            assert torch.equal(parameter, torch.ones_like(parameter)), name
    if kind == "qwen2":  # q/k/v biases: the read side's rotation leaves them as they were
        torch.testing.assert_close(rotated.model.layers[0].self_attn.q_proj.bias,
                                   model.model.layers[0].self_attn.q_proj.bias, rtol=0, atol=0)
    head, embedding = rotated.get_output_embeddings().weight, rotated.get_input_embeddings().weight
    assert head is not embedding and not rotated.config.tie_word_embeddings


def test_a_tied_head_is_untied_with_a_warning():
    model = tiny("llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.warns(UserWarning, match="untied"):
        compress.rotate(model, compress.Rotate())
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
    untied = tiny("qwen2")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to untie: no warning
        compress.rotate(untied, compress.Rotate())


def test_what_it_cannot_rotate_is_refused_before_any_work():
    with pytest.raises(ValidationError, match="block 48: a Hadamard block here is a power of two"):
        compress.Rotate(block=48)
    compress.Rotate(kind="random", block=48)  # any divisor for a random matrix
    refusals = {
        "gemma": (dict(), r"Gemma's norms compute x̂·\(1 \+ weight\)"),
        "mixtral": (dict(num_local_experts=4, num_experts_per_tok=2), "Mixture-of-Experts family"),
        "gpt2": (dict(n_embd=64, n_layer=1, n_head=4, vocab_size=64), "compress knows the model families"),
    }
    for kind, (overrides, message) in refusals.items():
        config = (AutoConfig.for_model(kind, **overrides) if kind == "gpt2"
                  else AutoConfig.for_model(kind, **{**SMALL, **overrides}))
        model = AutoModelForCausalLM.from_config(config)
        pristine = copy.deepcopy(model.state_dict())
        with pytest.raises(StepConfigError, match=rf"rotate \(hadamard\): .*{message}"):
            compress.rotate(model, compress.Rotate())
        for key, value in model.state_dict().items():  # refused before any weight moved
            assert torch.equal(value, pristine[key]), (kind, key)
    model = tiny("llama")  # hidden 96 = 3 x 32
    with pytest.raises(StepConfigError, match="block: 64 does not divide the hidden size 96") as error:
        check_rotatable(model, compress.Rotate(block=64))
    assert error.value.field == ("block",)
    with pytest.raises(StepConfigError, match="head_dim 24 is not a power of two"):
        check_rotatable(tiny("llama", head_dim=24, num_attention_heads=4), compress.Rotate())
    check_rotatable(tiny("llama", head_dim=24, num_attention_heads=4), compress.Rotate(heads=False))
    compress.quantize(model, compress.RTN(bits=4, group_size=32), show_progress=False)
    with pytest.raises(CompressError, match="rotate on a quantized model"):
        compress.rotate(model, compress.Rotate())


def test_a_recipe_refuses_a_bad_block_at_its_line_before_the_base_step(tiny_recipe, tmp_path):
    from rich.console import Console

    from compress.pipeline import run

    recipe = tiny_recipe("  - rotate: {block: 128}\n  - quantize: {method: rtn, grid: nvfp4}", max_tokens=1024)
    line = next(i for i, text in enumerate(recipe.read_text().splitlines(), 1) if "rotate" in text)
    with pytest.raises(CompressError, match=rf"tiny\.yaml:{line}: steps\[0\]\.rotate\.block: rotate \(hadamard\) "
                                            r"block: 128 does not divide the hidden size 64"):
        run(recipe, console=Console(quiet=True), show_progress=False)
    assert not (tmp_path / "runs" / "tiny" / "00-base").exists()


def test_rotate_then_w4a4_recipe_and_the_rotated_step_loads_in_stock_transformers(tiny_recipe, tmp_path):
    from rich.console import Console

    from compress.pipeline import run

    recipe = tiny_recipe("  - rotate: {}\n  - quantize: {method: rtn, grid: mxfp4, activations: dynamic}",
                         max_tokens=1024)
    with pytest.warns(UserWarning, match="untied"):  # the tiny Llama ties its head
        report = run(recipe, console=Console(quiet=True), show_progress=False)
    assert "rotate: hadamard" in report["steps"][1]["summary"] and "untied" in report["steps"][1]["summary"]
    base_ppl, rotated_ppl = (step["metrics"]["wikitext2"]["perplexity"] for step in report["steps"][:2])
    assert rotated_ppl == pytest.approx(base_ppl, rel=1e-4)  # the float model, rotated: the same perplexity
    folder = tmp_path / "runs" / "tiny" / "01-rotate"
    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and "quantization_config" not in config
    base, _ = compress.load(tmp_path / "runs" / "tiny" / "00-base")
    ours, _ = compress.load(folder)
    expected = _run(ours).logits
    torch.testing.assert_close(expected, _run(base).logits, rtol=0, atol=1e-4)
    assert not torch.equal(ours.model.embed_tokens.weight, base.model.embed_tokens.weight)
    # stock transformers, in a process that never imports compress
    torch.testing.assert_close(stock_logits(folder, IDS), expected, rtol=0, atol=1e-4)
    step = json.loads((folder / "step.json").read_text())
    assert step["untied_head_bytes"] == 512 * 64 * 4  # the head's float32 copy, recorded as a quantize step's is


def _peak_to_rms(model, ids, name: str) -> float:
    """The mean over tokens of max|x| / rms(x) of the input of every Linear called `name` (x̂ once the norms are
    folded): how far each token's largest channel stands out of the stream the Linear reads."""
    ratios = []

    def hook(module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        ratios.append((x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()).mean())

    handles = [module.register_forward_pre_hook(hook) for key, module in model.named_modules() if key.endswith(name)]
    with torch.no_grad():
        logits = model(ids).logits
    for handle in handles:
        handle.remove()
    return float(torch.stack(ratios).mean()), logits


@pytest.mark.slow
def test_on_smollm2_the_logits_stay_and_the_stream_outliers_spread():
    """SmolLM2 (hidden 576: Hadamard blocks of 64): the rotated float model computes the float model's logits, and
    the stream q_proj reads (with the norms folded, as the rotation leaves it) has its peaks spread: each token's
    largest channel stands out far less than in the folded stream without the rotation."""
    from compress.architectures import family
    from compress.rotate import fold_norms

    model, tokenizer = compress.load_model("smollm2-135m")
    ids = tokenizer("The capital of France is Paris. The capital of Germany is Berlin, and of Italy",
                    return_tensors="pt").input_ids
    folded, rotated = copy.deepcopy(model), copy.deepcopy(model)
    fold_norms(folded, family(folded))
    with pytest.warns(UserWarning, match="untied"):
        compress.rotate(rotated, compress.Rotate())
    with torch.no_grad():
        reference = model(ids).logits
    peak_folded, logits_folded = _peak_to_rms(folded, ids, "q_proj")
    peak_rotated, logits = _peak_to_rms(rotated, ids, "q_proj")
    for candidate in (logits_folded, logits):
        assert (candidate - reference).abs().max() < 1e-3 * reference.abs().max()
    assert peak_rotated < 0.6 * peak_folded, (peak_rotated, peak_folded)

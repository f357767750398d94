"""Structured pruning: importance statistics, group selection under GQA, surgery that preserves what it keeps,
checkpoints that load (stock transformers for uniform widths, compress.load for per-layer widths), and clear errors
before any work. Tiny random models: only mechanics matter here (quality is tested on SmolLM2 in test_smollm2)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import compress
from compress.architectures import FAMILIES
from compress.errors import CompressError
from compress.modules import decoder_layers
from compress.prune import TaylorPrune, check_prunable, prune
from compress.prune.importance import gradient_statistics
from compress.prune.structure import (
    LAYER_WIDTHS_KEY,
    LayerWidths,
    kept_count,
    layer_widths,
    select_heads,
    shrink_attention,
    shrink_mlp,
)

IDS = torch.randint(0, 500, (4, 32), generator=torch.Generator().manual_seed(1))

LLAMA = FAMILIES["llama"]  # the layout of tiny_llama's layers


def tiny_llama(layers: int = 3, heads: int = 4, kv_heads: int = 2, seed: int = 0, **extra) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16,
                         tie_word_embeddings=True, **extra)
    return LlamaForCausalLM(config).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_kept_count_rounds_to_the_width_multiple():
    assert kept_count(1536, 0.25, 1, 64) == 1152  # SmolLM2's MLP: 18 x 64
    assert kept_count(11008, 0.25, 1, 64) == 8256  # Llama-2-7B's MLP: 8256 = 129 x 64 (exact 8256)
    assert kept_count(32, 0.25, 128, 64) == 24  # Llama-2-7B heads (head_dim 128): LLM-Pruner's 24 of 32
    assert kept_count(3, 0.25, 3 * 64, 64) == 2  # SmolLM2: 3 query heads per KV group -> 2
    assert kept_count(4, 0.5, 16, 64) == 4  # units 16 wide: 0 or 4 units are multiples of 64; a tie keeps more
    assert kept_count(4, 0.6, 16, 64) == 0
    assert kept_count(4, 0.9, 16, 64, keep_one=True) == 4
    assert kept_count(10, 0.97, 1, 1) == 0 and kept_count(10, 0.97, 1, 1, keep_one=True) == 1


def test_gradient_statistics_are_the_mean_gradient_and_mean_squared_per_sample_gradient():
    model = tiny_llama(layers=1)
    weight = model.model.layers[0].mlp.down_proj.weight
    mean, squares = gradient_statistics(model, [weight], IDS, fisher=True, show_progress=False)
    per_sample = []
    for row in IDS:
        loss = model(input_ids=row[None], labels=row[None]).loss
        per_sample.append(torch.autograd.grad(loss, weight)[0])
    per_sample = torch.stack(per_sample)
    torch.testing.assert_close(mean[weight], per_sample.mean(0))
    torch.testing.assert_close(squares[weight], per_sample.square().mean(0))
    assert weight.grad is None and all(p.requires_grad for p in model.parameters())  # left as found


def test_select_heads_keeps_the_best_query_heads_in_every_kv_group():
    query = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2, 0.3, 0.8, 0.0, 0.4])  # 3 KV groups of 3 query heads
    kv = torch.tensor([0.0, 0.0, 5.0])
    kept_query, kept_kv = select_heads(query, kv, LayerWidths(6, 3, 0), "query")
    assert kept_query.tolist() == [1, 2, 3, 5, 6, 8] and kept_kv.tolist() == [0, 1, 2]
    kept_query, kept_kv = select_heads(query, kv, LayerWidths(3, 1, 0), "kv_groups")
    assert kept_kv.tolist() == [2] and kept_query.tolist() == [6, 7, 8]  # group 2: 1.2 + 5.0 beats 1.5 and 1.2


@pytest.mark.parametrize("mode", ["query", "kv_groups"])
def test_surgery_keeps_the_function_of_what_it_keeps(mode):
    """Silence the heads and channels to be removed (zero their o_proj / down_proj columns): removing them for
    real must then leave the logits unchanged, and the layer must shrink."""
    model = tiny_llama(layers=2)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    if mode == "query":
        query, kv = torch.tensor([1, 2]), torch.tensor([0, 1])
    else:
        query, kv = torch.tensor([2, 3]), torch.tensor([1])
    channels = torch.arange(0, 128, 2)
    with torch.no_grad():
        for head in set(range(4)) - set(query.tolist()):
            attn.o_proj.weight[:, head * 16 : (head + 1) * 16] = 0
        mlp.down_proj.weight[:, 1::2] = 0
    before = logits(model)
    shrink_attention(attn, query, kv, fused=False)
    shrink_mlp(mlp, channels, fused=False)
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)
    assert layer_widths(model.model.layers[1], LLAMA) == LayerWidths(2, kv.numel(), 64)
    assert attn.num_key_value_groups == 2 // kv.numel()


@pytest.mark.parametrize("importance", ["element1", "element2", "vector", "mix", "l1", "l2", "random"])
def test_every_importance_prunes_to_the_planned_widths(importance):
    model = tiny_llama()
    before = sum(p.numel() for p in model.parameters())
    prune(model, TaylorPrune(importance=importance, ratio=0.5, layers=(1, 3), multiple=16), IDS, show_progress=False)
    widths = [layer_widths(layer, LLAMA) for layer in decoder_layers(model)]
    assert widths == [LayerWidths(4, 2, 128), LayerWidths(2, 2, 64), LayerWidths(2, 2, 64)]
    assert sum(p.numel() for p in model.parameters()) < before
    assert torch.isfinite(logits(model)).all()


def test_taylor_importance_removes_the_groups_that_matter_least():
    """Make one MLP channel and one query head obviously important (large weights in the loss path) and one of
    each dead (zero output weights): element1 keeps the first and drops the second."""
    model = tiny_llama(layers=1)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    with torch.no_grad():
        mlp.down_proj.weight[:, 7] *= 30
        mlp.up_proj.weight[7] *= 30
        mlp.down_proj.weight[:, 9] = 0
        attn.o_proj.weight[:, 0:16] = 0  # head 0 (KV group 0) is dead
        attn.o_proj.weight[:, 16:32] *= 30  # head 1 (same group) matters
    prune(model, TaylorPrune(ratio=0.5, multiple=16), IDS, show_progress=False)
    assert layer_widths(model.model.layers[0], LLAMA) == LayerWidths(2, 2, 64)
    # the surviving channel 7 is the one scaled up; channel 9 is gone
    assert mlp.down_proj.weight.abs().sum(0).max() > 10 * mlp.down_proj.weight.abs().sum(0).median()
    assert not (mlp.down_proj.weight.abs().sum(0) == 0).any()
    assert attn.o_proj.weight[:, :16].abs().sum() > 0  # head 1 kept (now first), head 0 removed


def test_global_scope_gives_layers_different_widths_and_removes_about_the_ratio():
    model = tiny_llama(layers=3)
    with torch.no_grad():  # layer 2's MLP matters far more than the others'
        model.model.layers[2].mlp.down_proj.weight *= 20
    prune(model, TaylorPrune(ratio=0.5, scope="global", targets=("mlp",), multiple=8), IDS, show_progress=False)
    sizes = [layer.mlp.gate_proj.out_features for layer in decoder_layers(model)]
    assert len(set(sizes)) > 1 and sizes[2] == max(sizes)
    assert abs(sum(sizes) - 0.5 * 3 * 128) <= 3 * 8
    assert json.loads(model.config.to_json_string())[LAYER_WIDTHS_KEY][2]["intermediate_size"] == sizes[2]


def test_uniform_checkpoint_loads_in_stock_transformers_without_compress(tmp_path):
    model = tiny_llama(layers=2)
    prune(model, TaylorPrune(ratio=0.5, multiple=16, uniform=True), IDS, show_progress=False)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"],
            config["intermediate_size"]) == (2, 2, 16, 64)
    assert LAYER_WIDTHS_KEY not in config
    torch.save(IDS, tmp_path / "ids.pt")
    script = (
        "import sys, torch\n"
        "sys.modules['compress'] = None  # any import of compress now fails\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}).eval()\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "with torch.no_grad(): torch.save(m(input_ids=ids).logits, sys.argv[1])\n"
    )
    out = tmp_path / "stock-logits.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    torch.testing.assert_close(torch.load(out), logits(model), atol=1e-5, rtol=1e-5)


def test_non_uniform_checkpoint_records_layer_widths_and_loads_with_compress(tmp_path, tiny_model_dir):
    model, tokenizer = compress.load(tiny_model_dir)
    prune(model, TaylorPrune(ratio=0.5, layers=(1, 2), multiple=16), IDS, show_progress=False)
    compress.save_model(model, tokenizer, tmp_path / "pruned")
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert [w["intermediate_size"] for w in config[LAYER_WIDTHS_KEY]] == [128, 64]
    loaded, _ = compress.load(tmp_path / "pruned")
    torch.testing.assert_close(logits(loaded), logits(model))
    # and a quantized non-uniform model round-trips too
    compress.quantize(model, compress.RTN(bits=4, group_size=16))
    compress.save_model(model, tokenizer, tmp_path / "quantized")
    loaded, _ = compress.load(tmp_path / "quantized")
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_llama_family_architectures_prune_and_reload(tmp_path, family):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {"mistral": (MistralConfig, MistralForCausalLM),
                                 "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    torch.manual_seed(0)
    model = model_class(config_class(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)).eval()
    prune(model, TaylorPrune(ratio=0.5, multiple=16, uniform=True), IDS, show_progress=False)
    if family == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias.numel() == 32  # biases sliced with their rows
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded), logits(model), atol=1e-5, rtol=1e-5)


def test_file_size_falls_with_the_parameter_count(tmp_path):
    model = tiny_llama(layers=2)
    model.save_pretrained(tmp_path / "base")
    prune(model, TaylorPrune(ratio=0.5, multiple=16, uniform=True), IDS, show_progress=False)
    model.save_pretrained(tmp_path / "pruned")
    size = {name: (tmp_path / name / "model.safetensors").stat().st_size for name in ("base", "pruned")}
    assert size["pruned"] < 0.85 * size["base"]


@pytest.mark.parametrize("config,model_kwargs,fragment", [
    (TaylorPrune(ratio=0.9, multiple=64), {}, "leaves no query head per KV group in decoder layer 0"),
    (TaylorPrune(ratio=0.9, targets=("mlp",), multiple=64), {}, "leaves no MLP channel in decoder layer 0"),
    (TaylorPrune(layers=(1, 5)), {}, "outside the model: it has 3 decoder layers"),
    (TaylorPrune(uniform=True, layers=(1, 3)), {}, "remove `layers` or set uniform: false"),
    (TaylorPrune(heads="query", multiple=16), {"heads": 4, "kv_heads": 4}, "use heads: kv_groups"),
])
def test_bad_settings_are_clear_errors_before_any_work(config, model_kwargs, fragment):
    model = tiny_llama(**model_kwargs)
    with pytest.raises(CompressError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        check_prunable(model, config)
    with pytest.raises(CompressError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        prune(model, config, IDS, show_progress=False)


def test_unsupported_architecture_lists_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(CompressError, match="knows the model families llama, mistral, qwen2, qwen3.*'gpt2'"):
        check_prunable(model, TaylorPrune())


def test_taylor_importance_without_calibration_says_what_to_pass():
    with pytest.raises(CompressError, match="needs calibration token ids"):
        prune(tiny_llama(), TaylorPrune(multiple=16))
    prune(tiny_llama(), TaylorPrune(importance="l2", multiple=16))  # data-free baselines need none


@pytest.mark.parametrize("importance,copies", [("element1", 1), ("mix", 2)])
def test_gradient_sums_that_do_not_fit_are_refused_before_any_work(monkeypatch, importance, copies):
    """float32 sums (and, with a Fisher term, squares) of every scored weight, against 90 % of the free memory."""
    importance_module = importlib.import_module("compress.prune.importance")  # compress.prune is also the verb

    model = tiny_llama()
    scored = sum(m.weight.numel() for layer in model.model.layers for m in layer.modules()
                 if isinstance(m, torch.nn.Linear))
    need = scored * 4 * copies
    before = {name: p.clone() for name, p in model.state_dict().items()}
    monkeypatch.setattr(importance_module, "available_memory", lambda device: int(need / 0.9) - 8)
    free = int(need / 0.9) - 8
    with pytest.raises(CompressError, match=rf" {need / 2**20:,.1f} MiB, and cpu has {free / 2**20:,.1f} "
                                            rf"MiB free.*importance l1 or l2"):
        prune(model, TaylorPrune(importance=importance, multiple=16), IDS[:2], show_progress=False)
    assert all(torch.equal(p, before[name]) for name, p in model.state_dict().items())  # untouched
    monkeypatch.setattr(importance_module, "available_memory", lambda device: int(need / 0.9) + 8)
    prune(model, TaylorPrune(importance=importance, multiple=16), IDS[:2], show_progress=False)
    assert model.model.layers[0].mlp.down_proj.in_features < 128


@pytest.mark.parametrize("kind,expected", [("element1", 1.5), ("element2", 4.0), ("mix", 4.5), ("vector", 0.5),
                                           ("l1", 3.0), ("l2", 5.0)])
def test_importance_formulas_match_llm_pruner(kind, expected):
    """One output channel with w = [1, -2], mean gradient g = [0.5, 0.5], mean squared gradient F = [4, 1]:
    element1 Σ|wg| = 1.5; element2 Σ|½w²F| = 2 + 2; mix Σ|½w²F − wg| = 1.5 + 3; vector |Σwg| = 0.5."""
    from compress.prune.importance import channel_scorer

    linear = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, -2.0]]))
    score = channel_scorer(kind, {linear.weight: torch.tensor([[0.5, 0.5]])},
                           {linear.weight: torch.tensor([[4.0, 1.0]])})
    assert score(linear, 0).item() == pytest.approx(expected)
    assert score(linear, 1).shape == (2,)  # per input column when the channel runs along dim 1


def test_prune_refuses_a_quantized_model():
    model = tiny_llama()
    compress.quantize(model, compress.RTN(bits=4, group_size=16), show_progress=False)
    with pytest.raises(CompressError, match="put the prune step before quantize"):
        prune(model, TaylorPrune(importance="l2", multiple=16))

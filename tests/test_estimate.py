"""`compress estimate` and the random-weights model source: parameter counts and disk sizes against real models and
saved folders (tiny model), the CLI, and a run of a recipe whose model is `{config: ..., init: random}`."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig
from typer.testing import CliRunner

import compress
from compress.cli import app
from compress.estimate import EstimateConfig, disk_bytes, estimate, inference_bytes, shapes
from compress.models import RandomInit, load_model


def test_shapes_count_the_parameters_of_the_model_and_of_its_pruned_self(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir))
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert shapes(config).params == sum(p.numel() for p in model.parameters())
    pruning = compress.TaylorPrune(ratio=0.5, multiple=16, importance="l1")
    pruned = compress.prune(model, pruning, show_progress=False)
    assert shapes(config, pruning).params == sum(p.numel() for p in pruned.parameters()) < shapes(config).params
    # and a pruned model's own config (per-layer widths) counts the same
    assert shapes(pruned.config).params == sum(p.numel() for p in pruned.parameters())


@pytest.mark.parametrize("precision,quantize", [("fp32", None), ("int4", compress.RTN(bits=4, group_size=32)),
                                                ("int8", compress.RTN(bits=8, group_size=-1))])
def test_disk_estimate_matches_the_saved_weights(tiny_model_dir, tmp_path, precision, quantize):
    model, tokenizer = load_model(str(tiny_model_dir))
    if quantize:
        model = compress.quantize(model, quantize, show_progress=False)
    compress.save_model(model, tokenizer, tmp_path / "saved")
    saved = (tmp_path / "saved" / "model.safetensors").stat().st_size
    predicted = disk_bytes(shapes(model.config), precision, dtype_bytes=4, group_size=32)
    assert abs(predicted - saved) / saved < 0.05, (predicted, saved)


def test_kv_cache_and_the_effect_of_context_and_batch():
    shape = shapes(AutoConfig.for_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                        num_attention_heads=8, num_key_value_heads=2, vocab_size=1000))
    small = inference_bytes(shape, "bf16", EstimateConfig(context=1024, batch=1))
    large = inference_bytes(shape, "bf16", EstimateConfig(context=1024, batch=4))
    assert small["kv_cache"] == 2 * 4 * (2 * 32) * 1024 * 2  # K and V, layers, KV heads x head_dim, tokens, bf16
    assert large["kv_cache"] == 4 * small["kv_cache"] and large["weights"] == small["weights"]


def test_estimate_orders_precisions_ratios_and_training_steps():
    result = estimate("llama2-7b", EstimateConfig(context=4096))
    assert 6.7e9 < result["params"] < 6.8e9  # Llama-2-7B: 6.74 B
    disks = [result["precisions"][p]["disk"] for p in ("fp32", "bf16", "int8", "int4", "int3")]
    assert disks == sorted(disks, reverse=True)
    assert 3.4 * 2**30 < result["precisions"]["int4"]["disk"] < 3.8 * 2**30  # GPTQ W4 g128 7B checkpoints: ~3.6 GiB
    assert result["pruned"]["0.5"]["params"] < result["pruned"]["0.25"]["params"] < result["params"]
    training = result["training"]
    assert training["lora"]["gradients"] < 0.02 * training["lora"]["weights"]  # adapters only
    assert training["distill"]["total"] > 2 * training["lora"]["weights"]  # student, its gradients, AdamW, teacher


def test_cli_estimate_prints_tables_and_writes_json(tmp_path):
    out = tmp_path / "estimate.json"
    result = CliRunner().invoke(app, ["estimate", "meta-llama/Llama-2-7b-hf", "--context", "4096", "--gpu-gib", "24",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "KV cache" in result.output and "LoRA recovery" in result.output and "✗" in result.output
    data = json.loads(out.read_text())
    assert data["precisions"]["bf16"]["inference"]["kv_cache"] == 2 * 32 * 4096 * 4096 * 2  # 2 GiB at 4k context


@pytest.mark.parametrize("args,fragment", [(["--ratios", "0.3,x"], "--ratios: Input should be a valid number"),
                                           (["--ratios", "1.5"], "--ratios: Input should be less than 1"),
                                           (["--dtype", "int4"], "dtype 'int4' is not one of")])
def test_cli_estimate_bad_input_is_one_line(args, fragment):
    result = CliRunner().invoke(app, ["estimate", "llama2-7b", *args])
    assert result.exit_code == 2 and fragment in result.output and "Traceback" not in result.output


def test_random_source_is_reproducible_and_sized_to_its_tokenizer(tiny_model_dir):
    spec = RandomInit(config=str(tiny_model_dir), init="random", tokenizer=str(tiny_model_dir), seed=3)
    first, tokenizer = load_model(spec)
    second, _ = load_model(spec)
    other, _ = load_model(spec.model_copy(update={"seed": 4}))
    assert first.config.vocab_size == len(tokenizer)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not torch.equal(first.model.layers[0].mlp.up_proj.weight, other.model.layers[0].mlp.up_proj.weight)


def test_recipe_on_random_weights_runs_and_says_so(tmp_path, tiny_model_dir):
    recipe = tmp_path / "random.yaml"
    recipe.write_text(f"name: rnd\nmodel: {{config: {tiny_model_dir}, init: random, tokenizer: {tiny_model_dir}}}\n"
                      f"steps:\n  - quantize: {{method: rtn, bits: 4, group_size: 32}}\n"
                      f"eval:\n  tasks: [wikitext2]\n  wikitext2: {{seq_len: 128, max_tokens: 1024}}\n"
                      f"output_dir: {tmp_path / 'run'}\n")
    report = compress.run(recipe, show_progress=False)
    assert report["model"].endswith("architecture, random weights (seed 0)")
    assert [row["step"] for row in report["steps"]] == ["00-base", "01-quantize"]
    again = compress.run(recipe, show_progress=False)  # same seed, same weights: both steps resume
    assert [row["seconds"] for row in again["steps"]] == [row["seconds"] for row in report["steps"]]


def test_group_size_that_unpruned_layers_cannot_take_fails_before_any_step(tmp_path, tiny_recipe):
    # layer 1 is not pruned and keeps its 128 MLP channels and hidden size 64: group 128 cannot quantize it
    path = tiny_recipe("  - prune: {ratio: 0.5, layers: [0, 1], targets: [mlp], multiple: 128, importance: l1}\n"
                       "  - quantize: {method: rtn, bits: 4, group_size: 128}")
    with pytest.raises(compress.errors.CompressError, match="group_size 128 does not divide the input width 64"):
        compress.run(path, show_progress=False)
    assert not (tmp_path / "runs" / "tiny" / "01-prune").exists()

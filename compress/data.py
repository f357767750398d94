"""Named datasets, read from a local data directory (never copied into the repo), else from the cache, which
compress.fetch fills from each dataset's public source on first use.

The data directory is, in order: the `data_dir` argument, the COMPRESS_DATA_DIR environment variable, then the
first `shared/data` found beside the current directory or beside this checkout (`../shared/data`)."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import torch

from compress.config.data import (  # noqa: F401 -- re-exported: the names and the data-dir rule live in the config
    DATA_DIR_ENV,
    DATASETS,
    CalibrationData,
    DatasetName,
    NamedDataset,
    candidate_data_dirs,
    data_dir,
    is_known,
)
from compress.errors import CompressError
from compress.fetch import fetch, recorded_sources, status


def _read_local(path: Path, kind: str):
    if kind == "records":
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    return path.read_text(encoding="utf-8")


def dataset_file(name: str, directory: str | Path | None = None) -> Path:
    """The file a dataset is read from: a named dataset's file in the data directory, else in the cache (fetched from
    its public source the first time), or the data file a path names."""
    if name in DATASETS:
        _, path = status(name, directory)  # the data directory's file, else the cache's
        return path if path is not None else fetch(name, directory)
    path = Path(name).expanduser()
    if not path.is_file():
        raise CompressError(f"data file {name} does not exist; use a named dataset ({', '.join(DATASETS)}) "
                            f"or a .txt/.jsonl path")
    return path


def _kind(name: str, path: Path) -> str:
    return DATASETS[name].kind if name in DATASETS else "records" if path.suffix == ".jsonl" else "text"


@lru_cache(maxsize=8)  # keyed on the file's size and mtime too: a file edited since is read again
def _load(path: Path, kind: str, size: int, mtime_ns: int):
    return _read_local(path, kind)


def _dataset(name: str, directory: str | None):
    path = dataset_file(name, directory)
    stat = path.stat()
    return _load(path.resolve(), _kind(name, path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=32)
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def dataset_digest(name: str, directory: str | Path | None = None) -> str:
    """The sha256 of the file a dataset is read from (what a step that reads it is keyed by)."""
    path = dataset_file(name, directory).resolve()
    stat = path.stat()
    return _file_digest(path, stat.st_size, stat.st_mtime_ns)


def public_dataset_name(name: str) -> str:
    """A dataset as a published report names it: its registered name, or a data file's own name (no directory)."""
    return name if name in DATASETS else Path(name).name


def source_of(name: str, directory: str | Path | None = None) -> str:
    """Where a dataset's rows come from, for reports (which may be published: no local directory is named): the
    data directory's file, or the public source the cache was filled from and its revision; a data file by its
    name and content hash."""
    if name not in DATASETS:
        return f"the file {public_dataset_name(name)} (sha256 {dataset_digest(name)[:16]})"
    spec = DATASETS[name]
    if status(name, directory)[0] == "data dir":
        return f"the data directory's {spec.path}"
    recorded = recorded_sources().get(name)
    if recorded:
        return f"{recorded['source']} at {recorded['revision']} (fetched into the cache)"
    return f"the cache's {spec.path}"


def load_text(name: str, directory: str | Path | None = None) -> str:
    """A named text dataset (or .txt file) as one string."""
    data = _dataset(name, str(directory) if directory else None)
    if not isinstance(data, str):
        data = "\n\n".join(row.get("text", "") for row in data)
    if not data.strip():
        raise CompressError(f"dataset '{name}' is empty")
    return data


def load_records(name: str, directory: str | Path | None = None) -> list[dict]:
    data = _dataset(name, str(directory) if directory else None)
    if isinstance(data, str):
        raise CompressError(f"dataset '{name}' is plain text; a .jsonl of records is needed here")
    return data


def token_stream(tokenizer, name: str, directory: str | Path | None = None) -> torch.Tensor:
    """The whole text tokenized as one stream: a 1-D tensor of token ids."""
    return tokenizer(load_text(name, directory), return_tensors="pt").input_ids[0]


def calibration_batches(tokenizer, name: str, samples: int, seq_len: int, seed: int = 0,
                        directory: str | Path | None = None) -> torch.Tensor:
    """`samples` random windows of `seq_len` tokens from a text dataset: a [samples, seq_len] tensor."""
    stream = token_stream(tokenizer, name, directory)
    if stream.numel() < samples * seq_len:
        raise CompressError(f"calibration data '{name}' has {stream.numel()} tokens, fewer than the "
                            f"{samples} x {seq_len} = {samples * seq_len} requested; lower samples or seq_len")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (samples,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def training_windows(tokenizer, name: str, seq_len: int, directory: str | Path | None = None) -> torch.Tensor:
    """A text dataset cut into consecutive, non-overlapping windows of `seq_len` tokens: [windows, seq_len]."""
    stream = token_stream(tokenizer, name, directory)
    count = stream.numel() // seq_len
    if count == 0:
        raise CompressError(f"training data '{name}' has {stream.numel()} tokens, fewer than one window of {seq_len}; "
                            f"lower seq_len or use a larger dataset")
    return stream[: count * seq_len].view(count, seq_len)

"""Named datasets, read from a local data directory (never copied into the repo), else from the cache, which
compress.fetch fills from each dataset's public source on first use.

The data directory is, in order: the `data_dir` argument, the COMPRESS_DATA_DIR environment variable, then the
first `shared/data` found beside the current directory or beside this checkout (`../shared/data`)."""

from __future__ import annotations

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


@lru_cache(maxsize=8)
def _load(name: str, directory: str | None):
    if name in DATASETS:
        _, path = status(name, directory)  # the data directory's file, else the cache's
        # not yet cached: fetched from its public source, once
        return _read_local(path if path is not None else fetch(name, directory), DATASETS[name].kind)
    path = Path(name).expanduser()
    if not path.is_file():
        raise CompressError(f"data file {name} does not exist; use a named dataset ({', '.join(DATASETS)}) "
                            f"or a .txt/.jsonl path")
    return _read_local(path, "records" if path.suffix == ".jsonl" else "text")


def source_of(name: str, directory: str | Path | None = None) -> str:
    """Where a dataset's rows come from, for reports (which may be published: no local directory is named for a
    named dataset): the data directory's file, or the public source the cache was filled from and its revision."""
    if name not in DATASETS:
        return str(Path(name).expanduser().resolve())
    spec = DATASETS[name]
    if status(name, directory)[0] == "data dir":
        return f"the data directory's {spec.path}"
    recorded = recorded_sources().get(name)
    if recorded:
        return f"{recorded['source']} at {recorded['revision']} (fetched into the cache)"
    return f"the cache's {spec.path}"


def load_text(name: str, directory: str | Path | None = None) -> str:
    """A named text dataset (or .txt file) as one string."""
    data = _load(name, str(directory) if directory else None)
    if not isinstance(data, str):
        data = "\n\n".join(row.get("text", "") for row in data)
    if not data.strip():
        raise CompressError(f"dataset '{name}' is empty")
    return data


def load_records(name: str, directory: str | Path | None = None) -> list[dict]:
    data = _load(name, str(directory) if directory else None)
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

"""Named datasets (as data: where each lives in a data directory and on the hub) and the recipe's data section."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field

from compress.config.base import MAX_SAMPLES, MAX_SEQ_LEN, Strict

DATA_DIR_ENV = "COMPRESS_DATA_DIR"


@dataclass(frozen=True)
class NamedDataset:
    path: str  # relative to the data directory (and to the cache of fetched datasets)
    kind: str  # "text" (one document) or "records" (jsonl rows)


# where each comes from when no data directory holds it: compress.fetch
DATASETS = {
    "wikitext2-test": NamedDataset("wikitext2/wiki.test.raw", "text"),
    "wikitext2-valid": NamedDataset("wikitext2/wiki.valid.tokens", "text"),
    "rte-train": NamedDataset("rte/train.jsonl", "records"),
    "rte-validation": NamedDataset("rte/validation.jsonl", "records"),
    "politeness-train": NamedDataset("politeness/train.jsonl", "records"),
    "politeness-test": NamedDataset("politeness/test.jsonl", "records"),
}
DATA_FILE_SUFFIXES = (".txt", ".raw", ".tokens", ".jsonl")


def is_known(name: str) -> bool:
    return name in DATASETS or Path(name).suffix in DATA_FILE_SUFFIXES


def _known_dataset(value: str) -> str:
    if not is_known(value):
        raise ValueError(f"unknown dataset '{value}'; allowed: {', '.join(DATASETS)}, or a .txt/.jsonl path")
    return value


# a recipe field naming a dataset: a known name or a data file path, checked at validation time
DatasetName = Annotated[str, AfterValidator(_known_dataset)]


class CalibrationData(Strict):
    """Recipe: `calibration: {dataset: wikitext2-valid, samples: 128, seq_len: 512}` (random windows, seeded)."""

    dataset: DatasetName = "wikitext2-valid"
    samples: int = Field(128, ge=1, le=MAX_SAMPLES)
    seq_len: int = Field(512, ge=8, le=MAX_SEQ_LEN)


class DataConfig(Strict):
    calibration: CalibrationData = CalibrationData()
    dir: str | None = Field(None, description="data directory; default: $COMPRESS_DATA_DIR, then ../shared/data")


def cache_root() -> Path:
    """Where compress keeps what it builds once (dequantized GGUF models, fetched datasets): $COMPRESS_CACHE, else
    $XDG_CACHE_HOME/compress, else ~/.cache/compress."""
    return Path(os.environ.get("COMPRESS_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                / "compress")


def candidate_data_dirs() -> list[Path]:
    """Where a data directory is looked for: $COMPRESS_DATA_DIR alone when set, else `shared/data` in or beside the
    current directory and this checkout."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return [Path(env).expanduser()]
    checkout = Path(__file__).resolve().parent.parent.parent
    seen: list[Path] = []
    for base in (Path.cwd(), checkout):
        for folder in (base / "shared" / "data", base.parent / "shared" / "data"):
            if folder.resolve() not in seen:
                seen.append(folder.resolve())
    return seen


def data_dir(explicit: str | Path | None = None) -> Path | None:
    """The first existing data directory, or None (then named datasets come from the hub)."""
    if explicit is not None:
        return Path(explicit).expanduser()
    return next((d for d in candidate_data_dirs() if d.is_dir()), None)

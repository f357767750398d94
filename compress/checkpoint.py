"""Step folders: a complete model each (safetensors, config.json, tokenizer files) plus step.json with the step's
config, metrics, timings and the sha256 of every file. Written under a temporary name and renamed only when
complete, so a crash or a full disk never leaves a half-written folder that looks finished."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from compress.errors import CompressError
from compress.config.quantize import SAVE_FORMATS
from compress.modules import is_packed, is_quantized
from compress.quantize.formats import compressed_tensors_state_dict, gptq_state_dict

STEP_FILE = "step.json"
PARTIAL_SUFFIX = ".partial"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != STEP_FILE)


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder_files(folder))


def save_model(model, tokenizer, folder: str | Path, format: str = "compressed-tensors") -> None:
    """Write a loadable model folder. Quantized models go in the compressed-tensors pack-quantized format (stock
    transformers, vLLM), or with format="gptq" in the GPTQ v1 layout (AutoGPTQ / GPTQModel loaders)."""
    if format not in SAVE_FORMATS:
        raise CompressError(f"unknown format '{format}'; allowed: {', '.join(SAVE_FORMATS)}")
    folder = Path(folder)
    if is_packed(model):
        raise CompressError("this model runs packed kernels (runtime='packed') and is for inference only; load the "
                            "folder with the default runtime to save or change it")
    if not is_quantized(model):
        model.save_pretrained(folder)
    elif format == "gptq":
        state, quantization_config = gptq_state_dict(model)
        model.save_pretrained(folder, state_dict=state)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config},
                                                       indent=2, sort_keys=True) + "\n")
        (folder / "quantize_config.json").write_text(json.dumps(quantization_config, indent=2) + "\n")
    else:
        state, compressor = compressed_tensors_state_dict(model)
        model.save_pretrained(folder, state_dict=state)
        compressor.update_config(str(folder))
    tokenizer.save_pretrained(folder)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically: a temp file, fsync, rename."""
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    _fsync(tmp)
    os.replace(tmp, path)


def write_step(folder: Path, write_contents: Callable[[Path], None], record: dict) -> dict:
    """Create `folder` atomically: contents and step.json (with file hashes) go to a temp folder first."""
    partial = folder.with_name(folder.name + PARTIAL_SUFFIX)
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        write_contents(partial)
        files = folder_files(partial)
        for path in files:
            _fsync(path)
        record = dict(record, size_bytes=sum(p.stat().st_size for p in files),
                      files={str(p.relative_to(partial)): sha256_file(p) for p in files})
        write_json(partial / STEP_FILE, record)
        if folder.exists():  # a stale or corrupt earlier attempt: already judged invalid by the caller
            shutil.rmtree(folder)
        os.rename(partial, folder)
        _fsync(folder.parent)
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(folder.parent).free / 2**30 if folder.parent.exists() else 0.0
            raise CompressError(f"disk full while writing {folder} ({free:.1f} GiB free): completed steps are kept; "
                                f"free some space and rerun the same command to continue") from error
        raise CompressError(f"cannot write {folder}: {error.strerror or error}; choose a writable --output-dir") from error
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return record


def read_step(folder: Path, fingerprint: str) -> tuple[dict | None, str]:
    """The step's record if the folder is complete, unchanged and intact; else (None, why it must be redone)."""
    if not folder.is_dir():
        return None, "not run yet"
    try:
        record = json.loads((folder / STEP_FILE).read_text())
    except (OSError, ValueError):
        return None, f"{STEP_FILE} is missing or unreadable"
    if record.get("fingerprint") != fingerprint:
        return None, "its config (or an earlier step's) changed"
    expected = record.get("files") or {}
    present = {str(p.relative_to(folder)) for p in folder_files(folder)}
    if not expected or present != set(expected):
        return None, "its files differ from those recorded in step.json"
    for name, digest in expected.items():
        if sha256_file(folder / name) != digest:
            return None, f"{name} is corrupt or truncated (sha256 mismatch)"
    return record, "complete"

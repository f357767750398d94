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

from compress.config.data import cache_root
from compress.config.quantize import SAVE_FORMATS
from compress.errors import CompressError
from compress.modules import is_packed, is_quantized
from compress.quantize.formats import compressed_tensors_state_dict, gptq_state_dict
from compress.quantize.kv_cache import kv_quantized

STEP_FILE = "step.json"
PARTIAL_SUFFIX = ".partial"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# Files at least this large have their sha256 kept in the cache, keyed on path, size and mtime: hashing a 1 GB
# weights file takes seconds on every rerun, a small file less than the lookup.
CACHED_HASH_BYTES = 16 * 2**20
HASH_CACHE_FILE = "sha256.json"


def _hash_cache_path() -> Path:
    return cache_root() / HASH_CACHE_FILE


def _read_hash_cache() -> dict:
    try:
        return json.loads(_hash_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def sha256_cached(path: Path) -> str:
    """The file's sha256, remembered in $COMPRESS_CACHE/sha256.json for large files: a later call for the same path
    with the same size and mtime reads no byte of it. A cache that cannot be written only costs the rehash."""
    path = Path(path).resolve()
    stat = path.stat()
    if stat.st_size < CACHED_HASH_BYTES:
        return sha256_file(path)
    key, stamp = str(path), [stat.st_size, stat.st_mtime_ns]
    entry = _read_hash_cache().get(key)
    if entry and entry[:2] == stamp:
        return entry[2]
    digest = sha256_file(path)
    cache = {name: value for name, value in _read_hash_cache().items() if Path(name).exists()}  # drop deleted files
    cache[key] = [*stamp, digest]
    target = _hash_cache_path()
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")  # per process: concurrent runs never mix
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(cache) + "\n")
        os.replace(partial, target)
    except OSError:  # a read-only home: the next run hashes again
        partial.unlink(missing_ok=True)
    return digest


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
    if not is_quantized(model) and not kv_quantized(model):
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
        raise CompressError(f"cannot write {folder}: {error.strerror or error}; choose a writable "
                            f"--output-dir") from error
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return record


def fingerprint(inputs: dict) -> str:
    """The key of a step: a hash of everything that made it (`inputs`: the previous step's fingerprint, the step's
    kind, config and seed, and the identity of what it read: input weights, data contents, a teacher)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def recorded_inputs(inputs: dict) -> dict:
    """What step.json keeps of a step's inputs, beside its `kind` and `config` (recorded under their own keys)."""
    return {key: value for key, value in inputs.items() if key not in ("kind", "config")}


def _short(digest) -> str:
    return str(digest)[:12] if digest else "none"


def _describe_identity(identity: dict | None) -> str:
    if not identity:
        return "nothing"
    source = identity.get("source")
    if source == "folder":
        return f"the folder {identity['name']}"
    if source == "gguf":
        return f"the GGUF file {identity['file']} (sha256 {_short(identity['sha256'])})"
    if source == "hub":
        return f"hub {identity['id']} at commit {_short(identity['commit'])}"
    return f"{source} weights"


def _weights_change(before: dict | None, now: dict | None) -> str:
    """How a model source's identity changed, in a few words: which files, which commit."""
    if not before or not now or before.get("source") != now.get("source") or before.get("source") == "random":
        return f"was {_describe_identity(before)}, now {_describe_identity(now)}"
    if now["source"] == "folder":
        old, new = before.get("files", {}), now.get("files", {})
        changed = [f"{name} sha256 {_short(old.get(name))} -> {_short(new.get(name))}"
                   for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        return f"{now['name']}: {shown}" if changed else f"was the folder {before['name']}, now {now['name']}"
    if now["source"] == "hub":
        return f"{now['id']} commit {_short(before.get('commit'))} -> {_short(now.get('commit'))}"
    return f"{now['file']} sha256 {_short(before.get('sha256'))} -> {_short(now.get('sha256'))}"


def what_changed(record: dict, inputs: dict) -> list[str]:
    """Why a step folder's record no longer matches the step's inputs, one phrase per change of the step's own
    inputs (its config, seed, input weights, data, teacher); empty when only an earlier step differs."""
    if "inputs" not in record:
        return ["it was written by an earlier compress, which did not record its inputs"]
    before = {**record["inputs"], "kind": record.get("kind"), "config": record.get("config")}
    reasons = []
    if before["kind"] != inputs.get("kind"):
        reasons.append(f"it was a {before['kind']} step")
    elif before["config"] != inputs.get("config"):
        old, new = before["config"] or {}, inputs.get("config") or {}
        keys = sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))
        reasons.append(f"its config changed ({', '.join(keys)})")
    if before.get("seed") != inputs.get("seed"):
        reasons.append(f"the seed changed ({before.get('seed')} -> {inputs.get('seed')})")
    for key, whose in (("model", "the input"), ("teacher", "the teacher's")):
        if before.get(key) != inputs.get(key):
            reasons.append(f"{whose} weights changed ({_weights_change(before.get(key), inputs.get(key))})")
    old_data, new_data = before.get("data") or {}, inputs.get("data") or {}
    for name in sorted(set(old_data) | set(new_data)):
        if name not in new_data:
            reasons.append(f"it no longer reads {name}")
        elif name not in old_data:
            reasons.append(f"it now reads {name}")
        elif old_data[name] != new_data[name]:
            reasons.append(f"its data {name} changed (sha256 {_short(old_data[name])} -> {_short(new_data[name])})")
    compared = {"kind", "config", "seed", "model", "teacher", "data", "previous"}
    reasons += [f"its {key} changed" for key in sorted((set(before) | set(inputs)) - compared)
                if before.get(key) != inputs.get(key)]
    return reasons


def read_step(folder: Path, key: str, inputs: dict | None = None) -> tuple[dict | None, str]:
    """The step's record if the folder is complete, unchanged and intact; else (None, why it must be redone).
    `key`: the step's fingerprint now; `inputs`: what it was computed from (to say what changed)."""
    if not folder.is_dir():
        return None, "not run yet"
    try:
        record = json.loads((folder / STEP_FILE).read_text())
    except (OSError, ValueError):
        return None, f"{STEP_FILE} is missing or unreadable"
    if record.get("fingerprint") != key:
        reasons = what_changed(record, inputs) if inputs is not None else []
        return None, "; ".join(reasons) or "an earlier step changed"
    expected = record.get("files") or {}
    present = {str(p.relative_to(folder)) for p in folder_files(folder)}
    if not expected or present != set(expected):
        return None, "its files differ from those recorded in step.json"
    for name, digest in expected.items():
        if sha256_file(folder / name) != digest:
            return None, f"{name} is corrupt or truncated (sha256 mismatch)"
    return record, "complete"

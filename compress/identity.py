"""What a model source's weights are, for step fingerprints and reports: names and hashes only, no local path."""

from __future__ import annotations

from pathlib import Path

from compress.checkpoint import STEP_FILE, sha256_cached
from compress.config.sources import ARCHITECTURES, RandomInit
from compress.hub_download import hub_commit
from compress.sources import resolve_source


def _folder_digests(folder: Path) -> dict[str, str]:
    """sha256 of each top-level file of a model folder (weights, config, tokenizer: what a loader may read), but
    step.json, which changes when a step is re-evaluated, and hidden files."""
    return {path.name: sha256_cached(path) for path in sorted(folder.iterdir())
            if path.is_file() and path.name != STEP_FILE and not path.name.startswith(".")}


def source_identity(source: str | RandomInit) -> dict:
    """What a model source's weights are, for step fingerprints and reports (names and hashes only, no local path):
    a folder's files' sha256s, a GGUF file's sha256, a hub model's commit, or a random draw's shape, seed and
    tokenizer. A registry name is identified by what it resolves to (the embedded GGUF file or the hub)."""
    resolved = resolve_source(source)
    if resolved.random:
        spec = resolved.random
        shape = spec.config if spec.config in ARCHITECTURES else {
            "folder": Path(spec.config).resolve().name,
            "config.json": sha256_cached(Path(spec.config).expanduser() / "config.json")}
        return {"source": "random", "config": shape, "seed": spec.seed, "tokenizer": source_identity(spec.tokenizer)}
    if resolved.kind == "gguf":
        return {"source": "gguf", "file": resolved.gguf_file,
                "sha256": sha256_cached(Path(resolved.location) / resolved.gguf_file)}
    if resolved.kind == "hub":
        return {"source": "hub", "id": resolved.location, "commit": hub_commit(resolved)}
    folder = Path(resolved.location)
    return {"source": "folder", "name": folder.resolve().name, "files": _folder_digests(folder)}

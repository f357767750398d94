"""What went wrong while loading a model, in one line: the network and the login are named only when the Hub or the
network failed."""

from __future__ import annotations

from compress.config.sources import REGISTRY
from compress.errors import CompressError


def one_line(error: BaseException) -> str:
    """An error's first line; its type where the message alone would not say what it is (KeyError('x') is 'x')."""
    lines = str(error).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if not isinstance(error, OSError) or not text:
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _hub_refused(error: BaseException) -> BaseException | None:
    """The error in the chain (the error, or one it was raised from) that is the Hub or the network failing: host
    unreachable, offline mode with nothing cached, no such repo or no access, the Hub's own error; None when every
    file was had and the failure is in what was read (a missing file in the repo is not the network's fault)."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
    )

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, RemoteEntryNotFoundError):
            return None
        if isinstance(error, (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError,
                              TimeoutError)):
            return error
        if type(error).__module__.split(".")[0].startswith(("httpx", "httpcore", "requests", "urllib3")):
            return error  # the HTTP library's own connection and timeout errors
        error = error.__cause__ or error.__context__
    return None


def _hub_error(source, error: BaseException) -> CompressError:
    hint = ""
    for entry in REGISTRY.values():
        if entry.hub_id == source.location and entry.install:
            hint = f" (or {entry.install})"
    return CompressError(
        f"could not load '{source.location}' from the Hugging Face Hub: {one_line(error)}; "
        f"check the network and your login, or use a local folder / .gguf file{hint}"
    )


def load_error(source, error: BaseException, what: str = "the model") -> CompressError:
    """One line saying what went wrong while loading `source` (a compress.sources.ModelSource)."""
    if source.kind == "hub" and _hub_refused(error) is not None:
        return _hub_error(source, _hub_refused(error))
    return CompressError(f"could not load {what} of {source.describe()}: {one_line(error)}")

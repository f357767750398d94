"""What the algorithms need to know about a model's modules, in one place: its decoder layers, which Linears are
quantized (and on which grid), and the guard that keeps training and surgery off quantized weights.

The quantized flag is `linear.weight_quant` (a WeightQuant). Quantizers set it, and `compress.load` restores it
from a quantized checkpoint's scales, so a model loaded back from a quantized step folder is known as quantized
on every path (resume, `compress.load`, the Python API)."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch
from typing import TYPE_CHECKING, Iterator

import torch

from compress.errors import CompressError

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationArgs

QUANT_ATTR = "weight_quant"
PACKED_ATTR = "packed_kernel"  # on every module of the packed runtime (compress.quantize.packed): its kernel
# The output head stays in full precision: it is tied to the embedding in most small models, and quantizing it
# costs far more quality per byte saved than any decoder Linear.
# MoE routers stay float too (a Linear named gate or shared_expert_gate in some families; compress.moe).
DEFAULT_IGNORE = ("lm_head", "gate", "shared_expert_gate")


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise CompressError(f"{type(model).__name__} has no decoder layer list (model.get_decoder().layers); "
                            f"compress supports decoder-only transformers models")
    return layers


def compute_rotary_frequencies(model: torch.nn.Module) -> None:
    """Fill the rotary embeddings' inverse frequencies of a model built on the meta device: checkpoints do not hold
    them, the config does (transformers names every family's rotary module *RotaryEmbedding)."""
    for module in model.modules():
        if "RotaryEmbedding" in type(module).__name__:
            model._init_weights(module)


def available_memory(device: torch.device) -> int:
    """Bytes free on `device` (the CPU: MemAvailable), 0 where it cannot be told. On CUDA that includes the blocks
    PyTorch's allocator holds but does not use (after an earlier step, nothing has called empty_cache)."""
    if device.type == "cuda":
        free, reserved = torch.cuda.mem_get_info(device)[0], torch.cuda.memory_reserved(device)
        return free + reserved - torch.cuda.memory_allocated(device)
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class WeightQuant:
    """The grid a Linear's (already rounded) weight lies on; kept on the module until it is saved."""

    args: "QuantizationArgs"
    scale: torch.Tensor  # [out, in // group] (or [out, 1] per channel)
    zero_point: torch.Tensor | None
    input_args: "QuantizationArgs | None" = None  # activations quantized at run time (FP8 W8A8), else None
    # sensitivity: ||(Q − W) X||² / ||W X||² on the calibration inputs X, where the quantizer saw any; not saved
    output_error: float | None = None
    global_scale: torch.Tensor | None = None  # NVFP4: the weight's FP32 scale of its group scales, else None
    input_global_scale: torch.Tensor | None = None  # NVFP4 W4A4: the inputs' FP32 global scale, else None


def quantizable_linears(model: torch.nn.Module, ignore=DEFAULT_IGNORE, keep_float: tuple[str, ...] = ()
                        ) -> Iterator[tuple[str, torch.nn.Linear]]:
    """Every Linear but those named in `ignore` (last name component) and those whose full name matches a
    `keep_float` pattern (fnmatch)."""
    for name, module in model.named_modules():
        if (isinstance(module, torch.nn.Linear) and name.split(".")[-1] not in ignore
                and not any(fnmatch(name, pattern) for pattern in keep_float)):
            yield name, module


def kept_float(model: torch.nn.Module, patterns: tuple[str, ...]) -> set[int]:
    """id() of every Linear a config's `ignore` patterns keep in full precision: for per-layer loops, which see
    names relative to the layer."""
    if not patterns:
        return set()
    everything = {id(m) for _, m in quantizable_linears(model)}
    return everything - {id(m) for _, m in quantizable_linears(model, keep_float=patterns)}


def quantized_linears(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Linear, WeightQuant]]:
    for name, module in model.named_modules():
        quant = getattr(module, QUANT_ATTR, None)
        if isinstance(module, torch.nn.Linear) and quant is not None:
            yield name, module, quant


def quantized_modules(model: torch.nn.Module
                      ) -> Iterator[tuple[str, torch.nn.Linear | torch.nn.Embedding, WeightQuant]]:
    """Every module whose weight lies on a grid: the quantized Linears and a quantized input embedding (whose weight
    [vocab, hidden] is saved and sized as a Linear's [out, in]: compress.quantize.head_embed)."""
    for name, module in model.named_modules():
        quant = getattr(module, QUANT_ATTR, None)
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and quant is not None:
            yield name, module, quant


def grids_to_weights(model: torch.nn.Module) -> None:
    """Move each quantized Linear's grid (plain attributes, not buffers: `model.to` leaves them) to its weight's
    device."""
    for _, linear, quant in quantized_modules(model):
        device = linear.weight.device
        quant.scale = quant.scale.to(device)
        quant.zero_point = None if quant.zero_point is None else quant.zero_point.to(device)
        for name in ("global_scale", "input_global_scale"):
            if getattr(quant, name) is not None:
                setattr(quant, name, getattr(quant, name).to(device))


def is_packed(model: torch.nn.Module) -> bool:
    """Whether the model runs packed low-bit kernels (compress.load(..., runtime="packed")): for inference only."""
    return any(hasattr(module, PACKED_ATTR) for module in model.modules())


def is_quantized(model: torch.nn.Module) -> bool:
    return next(quantized_linears(model), None) is not None or is_packed(model)


def require_float(model: torch.nn.Module, step: str, why: str) -> None:
    """Refuse to run `step` on a quantized model (one quantized in memory or loaded from a quantized folder)."""
    if is_quantized(model):
        raise CompressError(f"{step} on a quantized model: {why}; put the {step} step before quantize, start "
                            f"from a step folder written before quantization, or dequantize first "
                            f"(`- dequantize: {{}}`, compress.dequantize: the weights keep their values)")

"""The integer weight grid every quantizer in compress writes (RTN now, GPTQ and QAT later).

The grid is compressed-tensors' own (`QuantizationArgs` + `calculate_qparams` + `fake_quantize`), so what we
compute in memory is bit-for-bit what stock transformers and vLLM decompress from the saved checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as _ct_fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams

from compress.errors import CompressError

SUPPORTED_BITS = (2, 3, 4, 8)
# The output head stays in full precision: it is tied to the embedding in most small models, and quantizing it
# costs far more quality per byte saved than any decoder Linear.
DEFAULT_IGNORE = ("lm_head",)


def weight_args(bits: int, group_size: int, sym: bool) -> QuantizationArgs:
    """compressed-tensors args for weight-only int quantization; group_size -1 means one scale per output row."""
    if group_size == -1:
        return QuantizationArgs(num_bits=bits, symmetric=sym, strategy="channel")
    return QuantizationArgs(num_bits=bits, symmetric=sym, strategy="group", group_size=group_size)


@dataclass
class WeightQuant:
    """The grid a Linear's (already rounded) weight lies on; kept on the module until it is saved."""

    args: QuantizationArgs
    scale: torch.Tensor  # [out, in // group] (or [out, 1] per channel)
    zero_point: torch.Tensor


QUANT_ATTR = "weight_quant"


def quantizable_linears(model: torch.nn.Module, ignore=DEFAULT_IGNORE) -> Iterator[tuple[str, torch.nn.Linear]]:
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] not in ignore:
            yield name, module


def quantized_linears(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Linear, WeightQuant]]:
    for name, module in model.named_modules():
        quant = getattr(module, QUANT_ATTR, None)
        if isinstance(module, torch.nn.Linear) and quant is not None:
            yield name, module, quant


def check_group_size(model: torch.nn.Module, group_size: int, ignore=DEFAULT_IGNORE) -> None:
    """Raise a clear error if group_size does not divide every quantized Linear's input width."""
    if group_size == -1:
        return
    widths = {name: m.in_features for name, m in quantizable_linears(model, ignore)}
    if not widths:
        raise CompressError("the model has no Linear layers to quantize")
    bad = {name: w for name, w in widths.items() if w % group_size}
    if bad:
        name, width = next(iter(bad.items()))
        common = math.gcd(*widths.values())
        fits = [g for g in range(8, common + 1, 8) if common % g == 0] or [common]
        raise CompressError(
            f"group_size {group_size} does not divide the input width {width} of {name} "
            f"({len(bad)} of {len(widths)} layers affected); use one of {', '.join(map(str, fits))}, "
            f"or -1 for one scale per output channel"
        )


def _grouped(weight: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    rows, cols = weight.shape
    group = cols if args.group_size is None else args.group_size
    return weight.reshape(rows, cols // group, group)


def minmax_qparams(weight: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each group from its min and max: the round-to-nearest choice."""
    groups = _grouped(weight.float(), args)
    return calculate_qparams(groups.amin(-1), groups.amax(-1), args)


def fake_quantize(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, args: QuantizationArgs):
    """Round onto the grid and back to floats, exactly as the checkpoint's loader will dequantize it."""
    return _ct_fake_quantize(weight.float(), scale, zero_point, args).to(weight.dtype)

"""The integer weight grid every quantizer in compress writes (RTN now, GPTQ and QAT later).

The grid is compressed-tensors' own (`QuantizationArgs` + `calculate_qparams` + `fake_quantize`), so what we
compute in memory is bit-for-bit what stock transformers and vLLM decompress from the saved checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as _ct_fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compress.errors import CompressError

SUPPORTED_BITS = (2, 3, 4, 8)
# The output head stays in full precision: it is tied to the embedding in most small models, and quantizing it
# costs far more quality per byte saved than any decoder Linear.
DEFAULT_IGNORE = ("lm_head",)


class WeightOnlyConfig(BaseModel):
    """What every integer weight-only method shares: the grid (bits, group size, symmetry) and the saved format."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = Field(128, description="input columns per scale; -1 = one scale per output channel")
    sym: bool = True
    format: Literal["compressed-tensors", "gptq"] = Field(
        "compressed-tensors", description="compressed-tensors (stock transformers, vLLM) or the GPTQ v1 layout")

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int) -> int:
        if value != -1 and value < 1:
            raise ValueError(f"got {value}; allowed: a positive number of columns, or -1 for per-channel")
        return value

    @model_validator(mode="after")
    def _gptq_layout(self):
        if self.format == "gptq" and self.bits == 3:
            raise ValueError("format gptq packs 2, 4 or 8 bits into int32 words; for 3 bits use format "
                             "compressed-tensors")
        if self.format == "gptq" and not self.sym:
            raise ValueError("format gptq (v1) stores zero points minus one, so an asymmetric zero point of 0 "
                             "cannot be written; use sym: true, or format compressed-tensors for asymmetric grids")
        return self

    def quantization_args(self, actorder: str | None = None) -> QuantizationArgs:
        # GPTQ-format checkpoints store float16 scales: quantize on that grid so the saved model is the one measured
        scale_dtype = torch.float16 if self.format == "gptq" else None
        return weight_args(self.bits, self.group_size, self.sym, actorder, scale_dtype)

    def grid(self) -> str:
        group = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"W{self.bits} {group} {'sym' if self.sym else 'asym'}"


def weight_args(bits: int, group_size: int, sym: bool, actorder: str | None = None,
                scale_dtype: torch.dtype | None = None) -> QuantizationArgs:
    """compressed-tensors args for weight-only int quantization; group_size -1 means one scale per output row.
    actorder "weight" records that GPTQ visited columns by activation order with groups kept in place."""
    common = dict(num_bits=bits, symmetric=sym, actorder=actorder, scale_dtype=scale_dtype)
    if group_size == -1:
        return QuantizationArgs(strategy="channel", **common)
    return QuantizationArgs(strategy="group", group_size=group_size, **common)


@dataclass
class WeightQuant:
    """The grid a Linear's (already rounded) weight lies on; kept on the module until it is saved."""

    args: QuantizationArgs
    scale: torch.Tensor  # [out, in // group] (or [out, 1] per channel)
    zero_point: torch.Tensor
    input_args: QuantizationArgs | None = None  # activations quantized at run time (FP8 W8A8), else None


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

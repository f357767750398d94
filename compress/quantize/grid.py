"""The integer weight grid every quantizer in compress writes (RTN now, GPTQ and QAT later).

The grid is compressed-tensors' own (`QuantizationArgs` + `calculate_qparams` + `fake_quantize`), so what we
compute in memory is bit-for-bit what stock transformers and vLLM decompress from the saved checkpoint.
"""

from __future__ import annotations

import math

import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as _ct_fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams

from compress.config.quantize import WeightOnlyConfig
from compress.errors import CompressError
from compress.modules import DEFAULT_IGNORE, QUANT_ATTR, WeightQuant, quantizable_linears, quantized_linears

__all__ = ["DEFAULT_IGNORE", "QUANT_ATTR", "WeightQuant", "check_group_size", "fake_quantize", "minmax_qparams",
           "quantizable_linears", "quantization_args", "quantized_linears", "relative_output_error", "weight_args",
           "output_energy_per_row", "error_ratio"]



def quantization_args(config: WeightOnlyConfig, actorder: str | None = None) -> QuantizationArgs:
    """compressed-tensors args of a weight-only config's grid. GPTQ-format checkpoints store float16 scales:
    quantize on that grid so the saved model is the one measured. FP4 grids (`grid: nvfp4 | mxfp4`) are
    compressed-tensors' presets (compress.quantize.fp4); their groups stay in place under act-order, so nothing
    records it."""
    if getattr(config, "grid", "int") != "int":
        from compress.quantize.fp4 import weight_args as fp4_weight_args

        return fp4_weight_args(config.grid)
    scale_dtype = torch.float16 if config.format == "gptq" else None
    return weight_args(config.bits, config.group_size, config.sym, actorder, scale_dtype)


def weight_args(bits: int, group_size: int, sym: bool, actorder: str | None = None,
                scale_dtype: torch.dtype | None = None) -> QuantizationArgs:
    """compressed-tensors args for weight-only int quantization; group_size -1 means one scale per output row.
    actorder "weight" records that GPTQ visited columns by activation order with groups kept in place."""
    common = dict(num_bits=bits, symmetric=sym, actorder=actorder, scale_dtype=scale_dtype)
    if group_size == -1:
        return QuantizationArgs(strategy="channel", **common)
    return QuantizationArgs(strategy="group", group_size=group_size, **common)


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


def minmax_qparams(weight: torch.Tensor, args: QuantizationArgs, global_scale: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each group from its min and max: the round-to-nearest choice. With NVFP4's
    `global_scale` the scales are stored multiplied by it (on e4m3's range); the step is scale / global_scale."""
    groups = _grouped(weight.float(), args)
    scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args, global_scale)
    if args.type == "float" and args.num_bits == 4:  # symmetric: no zero point, kept as float zeros
        zero_point = torch.zeros_like(scale)
    return scale, zero_point


def fake_quantize(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, args: QuantizationArgs,
                  global_scale: torch.Tensor | None = None):
    """Round onto the grid and back to floats, exactly as the checkpoint's loader will dequantize it."""
    return _ct_fake_quantize(weight.float(), scale, zero_point, args, global_scale).to(weight.dtype)


def output_energy_per_row(weight: torch.Tensor, quantized: torch.Tensor, gram: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output row: ||(Q − W) X||² and ||W X||² over calibration inputs X, from their XᵀX."""
    weight = weight.float()
    difference = quantized.float() - weight
    return ((difference @ gram) * difference).sum(1), ((weight @ gram) * weight).sum(1)


def error_ratio(changed: torch.Tensor, kept: torch.Tensor) -> float:
    total = kept.sum()
    return (changed.sum() / total).item() if total > 0 else 0.0


def relative_output_error(weight: torch.Tensor, quantized: torch.Tensor, gram: torch.Tensor) -> float:
    """||(Q − W) X||² / ||W X||² over calibration inputs X, from their XᵀX (any positive multiple of it): how much of
    the Linear's output the rounding changes. Columns no input reached count for nothing."""
    return error_ratio(*output_energy_per_row(weight, quantized, gram))

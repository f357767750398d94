"""Round-to-nearest weight-only quantization: each group of input columns gets a scale (and, asymmetric, a zero
point) from its min and max, and every weight is rounded to the nearest grid point. No calibration data."""

from __future__ import annotations

import torch
from rich.progress import track

from compress.config.quantize import RTN, WeightOnlyConfig
from compress.modules import require_float
from compress.moe import unfuse_experts
from compress.quantize.grid import (
    QUANT_ATTR,
    WeightQuant,
    check_group_size,
    fake_quantize,
    minmax_qparams,
    quantizable_linears,
    quantization_args,
)


@torch.no_grad()
def quantize_rtn(model: torch.nn.Module, config: RTN | WeightOnlyConfig, *, show_progress: bool = True
                 ) -> torch.nn.Module:
    """Round every decoder Linear onto the grid in place; the grid is recorded on the module for saving."""
    require_float(model, "quantize", "its weights already lie on a quantization grid")
    unfuse_experts(model)  # MoE: one Linear per expert projection (compress.moe)
    check_group_size(model, config.group_size)
    args = quantization_args(config)
    linears = list(quantizable_linears(model, keep_float=config.ignore))
    for _, linear in track(linears, description="RTN rounding", disable=not show_progress, transient=True):
        scale, zero_point = minmax_qparams(linear.weight, args)
        linear.weight.copy_(fake_quantize(linear.weight, scale, zero_point, args))
        setattr(linear, QUANT_ATTR, WeightQuant(args, scale, zero_point))
    return model

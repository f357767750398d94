"""Round-to-nearest weight-only quantization: each group of input columns gets a scale (and, asymmetric, a zero
point) from its min and max, and every weight is rounded to the nearest grid point. No calibration data."""

from __future__ import annotations

from typing import Literal

import torch
from rich.progress import track

from compress.quantize.grid import (
    QUANT_ATTR,
    WeightOnlyConfig,
    WeightQuant,
    check_group_size,
    fake_quantize,
    minmax_qparams,
    quantizable_linears,
)


class RTN(WeightOnlyConfig):
    """Recipe: `quantize: {method: rtn, bits: 4, group_size: 64, sym: true}`."""

    method: Literal["rtn"] = "rtn"

    def describe(self) -> str:
        return f"rtn {self.grid()}"


@torch.no_grad()
def quantize_rtn(model: torch.nn.Module, config: RTN, show_progress: bool = True) -> torch.nn.Module:
    """Round every decoder Linear onto the grid in place; the grid is recorded on the module for saving."""
    check_group_size(model, config.group_size)
    args = config.quantization_args()
    linears = list(quantizable_linears(model))
    for _, linear in track(linears, description="RTN rounding", disable=not show_progress, transient=True):
        scale, zero_point = minmax_qparams(linear.weight, args)
        linear.weight.copy_(fake_quantize(linear.weight, scale, zero_point, args))
        setattr(linear, QUANT_ATTR, WeightQuant(args, scale, zero_point))
    return model

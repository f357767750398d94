"""Round-to-nearest weight-only quantization: each group of input columns gets a scale (and, asymmetric, a zero
point) from its min and max, and every weight is rounded to the nearest grid point. No calibration data."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from rich.progress import track

from compress.quantize.grid import (
    QUANT_ATTR,
    WeightQuant,
    check_group_size,
    fake_quantize,
    minmax_qparams,
    quantizable_linears,
    weight_args,
)


class RTN(BaseModel):
    """Recipe: `quantize: {method: rtn, bits: 4, group_size: 64, sym: true}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["rtn"] = "rtn"
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = Field(128, description="input columns per scale; -1 = one scale per output channel")
    sym: bool = True

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int) -> int:
        if value != -1 and value < 1:
            raise ValueError(f"got {value}; allowed: a positive number of columns, or -1 for per-channel")
        return value

    def describe(self) -> str:
        group = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"rtn W{self.bits} {group} {'sym' if self.sym else 'asym'}"


@torch.no_grad()
def quantize_rtn(model: torch.nn.Module, config: RTN, show_progress: bool = True) -> torch.nn.Module:
    """Round every decoder Linear onto the grid in place; the grid is recorded on the module for saving."""
    check_group_size(model, config.group_size)
    args = weight_args(config.bits, config.group_size, config.sym)
    linears = list(quantizable_linears(model))
    for _, linear in track(linears, description="RTN rounding", disable=not show_progress, transient=True):
        scale, zero_point = minmax_qparams(linear.weight, args)
        linear.weight.copy_(fake_quantize(linear.weight, scale, zero_point, args))
        setattr(linear, QUANT_ATTR, WeightQuant(args, scale, zero_point))
    return model

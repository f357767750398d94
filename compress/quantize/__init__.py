"""`quantize(model, config, calibration)`: one verb, one config class per method (RTN now; GPTQ, FP8, QAT next)."""

from __future__ import annotations

import torch

from compress.quantize.rtn import RTN, quantize_rtn

QuantizeConfig = RTN  # a pydantic union discriminated on `method` once more methods land


def quantize(
    model: torch.nn.Module, config: QuantizeConfig, calibration: torch.Tensor | None = None, show_progress: bool = True
) -> torch.nn.Module:
    """Quantize `model` in place and return it; RTN needs no calibration batches."""
    if isinstance(config, RTN):
        return quantize_rtn(model, config, show_progress=show_progress)
    raise TypeError(f"unsupported quantization config {type(config).__name__}")


__all__ = ["RTN", "QuantizeConfig", "quantize"]

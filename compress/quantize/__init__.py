"""`quantize(model, config, calibration)`: one verb, one config class per method (RTN, GPTQ, FP8; QAT next)."""

from __future__ import annotations

from typing import Annotated, Union

import torch
from pydantic import Field

from compress.errors import CompressError
from compress.quantize.fp8 import FP8, quantize_fp8
from compress.quantize.gptq import GPTQ, quantize_gptq
from compress.quantize.rtn import RTN, quantize_rtn

QuantizeConfig = Annotated[Union[RTN, GPTQ, FP8], Field(discriminator="method")]


def quantize(model: torch.nn.Module, config: RTN | GPTQ | FP8, calibration: torch.Tensor | None = None,
             show_progress: bool = True) -> torch.nn.Module:
    """Quantize `model` in place and return it. GPTQ needs `calibration`, token ids [samples, seq_len]
    (`compress.data.calibration_batches`); RTN needs none."""
    if isinstance(config, RTN):
        return quantize_rtn(model, config, show_progress=show_progress)
    if isinstance(config, FP8):
        return quantize_fp8(model, config, show_progress=show_progress)
    if isinstance(config, GPTQ):
        if calibration is None:
            raise CompressError("GPTQ needs calibration token ids [samples, seq_len]: "
                                "compress.data.calibration_batches(tokenizer, 'wikitext2-valid', 128, 512)")
        return quantize_gptq(model, config, calibration, show_progress=show_progress)
    raise TypeError(f"unsupported quantization config {type(config).__name__}")


__all__ = ["FP8", "GPTQ", "RTN", "QuantizeConfig", "quantize"]

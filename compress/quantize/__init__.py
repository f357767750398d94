"""`quantize(model, config, data)`: one verb, one config class per method (RTN, GPTQ, FP8, QAT)."""

from __future__ import annotations

from typing import Annotated, Union

import torch
from pydantic import Field

from compress.errors import CompressError
from compress.quantize.fp8 import FP8, quantize_fp8
from compress.quantize.gptq import GPTQ, quantize_gptq
from compress.quantize.qat import QAT, QATCallback, quantize_qat
from compress.quantize.rtn import RTN, quantize_rtn

QuantizeConfig = Annotated[Union[RTN, GPTQ, FP8, QAT], Field(discriminator="method")]


def quantize(model: torch.nn.Module, config: RTN | GPTQ | FP8 | QAT, calibration: torch.Tensor | None = None,
             show_progress: bool = True, teacher: torch.nn.Module | None = None, seed: int = 0) -> torch.nn.Module:
    """Quantize `model` in place and return it. GPTQ needs `calibration`, token ids [samples, seq_len]
    (`compress.data.calibration_batches`); QAT trains on token windows passed the same way
    (`compress.data.training_windows`, or `compress.training.training_examples`), distilling from `teacher` when given; RTN and FP8 need no data."""
    if isinstance(config, RTN):
        return quantize_rtn(model, config, show_progress=show_progress)
    if isinstance(config, FP8):
        return quantize_fp8(model, config, show_progress=show_progress)
    if isinstance(config, GPTQ):
        if calibration is None:
            raise CompressError("GPTQ needs calibration token ids [samples, seq_len]: "
                                "compress.data.calibration_batches(tokenizer, 'wikitext2-valid', 128, 512)")
        return quantize_gptq(model, config, calibration, show_progress=show_progress)
    if isinstance(config, QAT):
        if calibration is None:
            raise CompressError("QAT needs training token ids [windows, seq_len]: "
                                "compress.data.training_windows(tokenizer, 'wikitext2-valid', 256)")
        return quantize_qat(model, config, calibration, teacher, seed=seed, show_progress=show_progress)
    raise TypeError(f"unsupported quantization config {type(config).__name__}")


__all__ = ["FP8", "GPTQ", "QAT", "QATCallback", "RTN", "QuantizeConfig", "quantize"]

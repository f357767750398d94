"""`dequantize(model, Dequantize())`: a quantized model becomes a float model with the same weights — the grid each
Linear carries (compress.modules.QUANT_ATTR) is dropped, FP8 W8A8 Linears compute in float again — so the steps that
need a float model can start from a quantized checkpoint another tool wrote."""

from __future__ import annotations

import torch

from compress.config.quantize import Dequantize
from compress.errors import CompressError
from compress.modules import QUANT_ATTR, is_packed, quantized_modules
from compress.moe import fuse_experts


def dequantize(model: torch.nn.Module, config: Dequantize, *, show_progress: bool = True) -> torch.nn.Module:
    if is_packed(model):
        raise CompressError("this model runs packed kernels (runtime='packed'); load it with the default runtime to "
                            "dequantize it")
    for _, linear, _ in list(quantized_modules(model)):  # a quantized embedding too
        delattr(linear, QUANT_ATTR)
        if "forward" in vars(linear):  # FP8 W8A8: the per-token input rounding (compress.quantize.fp8)
            del linear.forward
    fuse_experts(model)  # MoE: transformers' own fused experts again (what pruning works on)
    return model

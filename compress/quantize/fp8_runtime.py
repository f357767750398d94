"""FP8 W8A8 at run time: an FP8 Linear quantizes its input to e4m3 per token on every call, through
`torch._scaled_mm` on GPUs with FP8 tensor cores, elsewhere simulated in floating point (the same rounding, then an
ordinary matmul). Quantizing a model is compress.quantize.fp8; loading an FP8 checkpoint needs only this."""

from __future__ import annotations

import types

import torch

from compress.modules import QUANT_ATTR, WeightQuant

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448



def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token e4m3 values and float32 scales [tokens, 1] of a [tokens, features] activation."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / E4M3_MAX).clamp(min=1e-12)
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def _has_fp8_tensor_cores(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _fp8_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """W8A8 forward: per-token FP8 input × per-channel FP8 weight, accumulated in float32."""
    shape = x.shape
    x_fp8, x_scale = quantize_activation(x.reshape(-1, shape[-1]))
    quant: WeightQuant = getattr(self, QUANT_ATTR)
    w_scale = quant.scale.float()  # [out, 1]
    if (_has_fp8_tensor_cores(x.device) and x.dtype == torch.bfloat16
            and self.in_features % 16 == 0 and self.out_features % 16 == 0):  # _scaled_mm's layout needs these
        if getattr(self, "_weight_fp8", None) is None:  # e4m3 copy of the (already e4m3-valued) weight, once
            self._weight_fp8 = (self.weight.float() / w_scale).to(E4M3)
        out = torch._scaled_mm(x_fp8, self._weight_fp8.T, scale_a=x_scale, scale_b=w_scale.T, out_dtype=x.dtype)
    else:  # simulated: identical rounding, float matmul
        out = ((x_fp8.float() * x_scale) @ self.weight.float().T).to(x.dtype)
    if self.bias is not None:
        out = out + self.bias
    return out.reshape(*shape[:-1], -1)


def enable_fp8_activations(linear: torch.nn.Linear) -> None:
    """Quantize this Linear's input to FP8 per token on every call (its weight must already be FP8)."""
    linear.forward = types.MethodType(_fp8_forward, linear)
    linear._weight_fp8 = None

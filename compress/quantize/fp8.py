"""FP8 W8A8: weights in float8 e4m3 with one scale per output channel, activations quantized to e4m3 per token at
run time (dynamic, so no calibration). Saved as compressed-tensors `float-quantized`, which vLLM serves with FP8
tensor-core GEMMs on Hopper and Ada GPUs.

In memory, an FP8 Linear computes exactly what those kernels compute: on GPUs with FP8 tensor cores through
`torch._scaled_mm` (row-wise scales), elsewhere simulated in floating point (the same rounding of weights and
activations onto the e4m3 grid, then an ordinary matmul), so CPU tests and evals measure the FP8 model's accuracy.
"""

from __future__ import annotations

import types

import torch
from compressed_tensors.quantization import QuantizationArgs
from rich.progress import track

from compress.config.quantize import FP8
from compress.modules import require_float
from compress.moe import unfuse_experts
from compress.quantize.grid import (
    QUANT_ATTR,
    WeightQuant,
    fake_quantize,
    minmax_qparams,
    quantizable_linears,
)

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448


WEIGHT_ARGS = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
ACTIVATION_ARGS = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True)


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


@torch.no_grad()
def quantize_fp8(model: torch.nn.Module, config: FP8, *, show_progress: bool = True) -> torch.nn.Module:
    """Round every decoder Linear's weight onto the e4m3 grid (per-channel scale) and, for W8A8, switch its
    forward to dynamic per-token FP8 activations."""
    require_float(model, "quantize", "its weights already lie on a quantization grid")
    unfuse_experts(model)  # MoE: one Linear per expert projection (compress.moe)
    input_args = ACTIVATION_ARGS if config.activations == "dynamic" else None
    for _, linear in track(list(quantizable_linears(model)), description="FP8", disable=not show_progress,
                           transient=True):
        scale, zero_point = minmax_qparams(linear.weight, WEIGHT_ARGS)
        linear.weight.copy_(fake_quantize(linear.weight, scale, zero_point, WEIGHT_ARGS))
        setattr(linear, QUANT_ATTR, WeightQuant(WEIGHT_ARGS, scale, zero_point, input_args))
        if input_args is not None:
            enable_fp8_activations(linear)
    return model

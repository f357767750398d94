"""FP8 W8A8: weights in float8 e4m3 with one scale per output channel, activations quantized to e4m3 per token at
run time (dynamic, so no calibration). Saved as compressed-tensors `float-quantized`, which vLLM serves with FP8
tensor-core GEMMs on Hopper and Ada GPUs.

In memory, an FP8 Linear computes exactly what those kernels compute: on GPUs with FP8 tensor cores through
`torch._scaled_mm` (row-wise scales), elsewhere simulated in floating point (the same rounding of weights and
activations onto the e4m3 grid, then an ordinary matmul), so CPU tests and evals measure the FP8 model's accuracy.
"""

from __future__ import annotations

import torch
from compressed_tensors.quantization import QuantizationArgs
from rich.progress import track

from compress.config.quantize import FP8
from compress.modules import require_float
from compress.moe import unfuse_experts
from compress.quantize.fp8_runtime import (  # noqa: F401 -- re-exported: the FP8 format's numbers live with its runtime
    E4M3,
    E4M3_MAX,
    _has_fp8_tensor_cores,
    enable_fp8_activations,
    quantize_activation,
)
from compress.quantize.grid import (
    QUANT_ATTR,
    WeightQuant,
    fake_quantize,
    minmax_qparams,
    quantizable_linears,
)

WEIGHT_ARGS = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
ACTIVATION_ARGS = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True)


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

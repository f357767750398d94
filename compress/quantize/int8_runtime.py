"""W8A8 int8 at run time: a Linear whose weight is int8 per output channel quantizes its input to int8 per token on
every call (dynamic, symmetric: compressed-tensors' own rounding, scale = max|x| / 127.5 and codes clamped to
[−128, 127], so stock transformers computes the same logits; vLLM's kernel divides by 127, a step 0.4 % wider) and
multiplies the two int8 matrices with an int32 accumulator. Quantizing a model is compress.quantize.smoothquant;
loading a W8A8 int8 checkpoint needs only this.

Two forms:
- a dense model's Linear (compress.load's default runtime, every eval): the same rounding of the input, then an
  ordinary float matmul with the float weight that lies on the int8 grid. It computes the int8 GEMM's result up to
  float summation order, so CPU tests and evals measure the W8A8 model's accuracy.
- the packed runtime's `Int8W8A8Linear` (compress.quantize.packed, with its other packed Linears): the int8 codes
  alone in memory and `torch._int_mm` (oneDNN's int8 GEMM on CPUs, cuBLASLt's on CUDA, through `int8_matmul` here),
  the int32 result scaled by the token's and the channel's scales.
"""

from __future__ import annotations

import types

import torch
from compressed_tensors.quantization import QuantizationArgs

INT8_MIN, INT8_MAX = -128, 127
HALF_RANGE = (INT8_MAX - INT8_MIN) / 2  # compressed-tensors' symmetric scale: max|x| / 127.5
SCALE_FLOOR = 1e-12  # an all-zero token's scale
WEIGHT_ARGS = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
ACTIVATION_ARGS = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
# torch._int_mm on CUDA (aten/src/ATen/native/cuda/Blas.cpp): more than 16 rows, and both widths multiples of 8
CUDA_MIN_ROWS = 17
CUDA_WIDTH_MULTIPLE = 8


def is_int8_activations(input_args: QuantizationArgs | None) -> bool:
    """Whether a grid's inputs are quantized to int8 at run time (else FP8, or none)."""
    return input_args is not None and str(getattr(input_args.type, "value", input_args.type)) == "int"


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 values and float32 scales [tokens, 1] of a [tokens, features] activation."""
    x = x.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / HALF_RANGE).clamp(min=SCALE_FLOOR)
    return torch.round(x / scale).clamp_(INT8_MIN, INT8_MAX).to(torch.int8), scale


def int_mm_tiles(device: torch.device, in_features: int, out_features: int) -> bool:
    """Whether torch._int_mm takes a Linear of these widths on `device` (on CPUs, any; on CUDA, multiples of 8)."""
    return device.type != "cuda" or (in_features % CUDA_WIDTH_MULTIPLE == 0
                                     and out_features % CUDA_WIDTH_MULTIPLE == 0)


def int8_matmul(x_int8: torch.Tensor, weight_int8: torch.Tensor) -> torch.Tensor:
    """x [tokens, in] · weightᵀ ([out, in] int8, row-major) → int32 [tokens, out]. The weight is passed as its
    transposed view: oneDNN reads the column-major operand directly (a contiguous [in, out] copy was 1.5x slower)."""
    rows = x_int8.shape[0]
    if x_int8.is_cuda and rows < CUDA_MIN_ROWS:  # decode: pad to the kernel's smallest row count
        padded = x_int8.new_zeros(CUDA_MIN_ROWS, x_int8.shape[1])
        padded[:rows] = x_int8
        return torch._int_mm(padded, weight_int8.T)[:rows]
    return torch._int_mm(x_int8, weight_int8.T)


def _w8a8_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The dense model's W8A8 forward: the input rounded to int8 per token, then a float matmul (see the module)."""
    shape = x.shape
    x_int8, x_scale = quantize_activation(x.reshape(-1, shape[-1]))
    out = ((x_int8.float() * x_scale) @ self.weight.float().T).to(x.dtype)
    if self.bias is not None:
        out = out + self.bias
    return out.reshape(*shape[:-1], -1)


def enable_int8_activations(linear: torch.nn.Linear) -> None:
    """Quantize this Linear's input to int8 per token on every call (its weight must already lie on the int8 grid)."""
    linear.forward = types.MethodType(_w8a8_forward, linear)

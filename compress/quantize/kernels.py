"""Our Triton kernels: GPTQ's inner loop (gptq.quantize_block), and the int4 dequantization of the packed runtime's
long inputs (dequantize_int4).

GPTQ's inner loop.

Why ours: the inner loop quantizes one column at a time, and in eager PyTorch each column costs about ten tiny
kernel launches. At Llama-2-7B shape that is ~750k columns and most of the run (eval/bench_gptq.py on an H100: 147 s
eager). Every row is independent within a block (the update W[:, i:] -= err ⊗ U[i, i:] touches only its own row), so
one program holds a tile of rows × the whole block in registers and runs the column loop on it: one launch per block.
The arithmetic is the eager loop's, with IEEE division and round-half-to-even, so the two agree (tests compare them).
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU-only installs: gptq.py falls back to the eager loop
    triton = None

ROWS_PER_PROGRAM = 16


def available(tensor: torch.Tensor) -> bool:
    return triton is not None and tensor.is_cuda


if triton is not None:

    @triton.jit
    def _quantize_block_kernel(block_ptr, upper_ptr, scale_ptr, zero_ptr, quantized_ptr, errors_ptr,
                               rows, columns, block_stride, upper_stride, qmin, qmax,
                               ROWS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        col = tl.arange(0, BLOCK)
        tile = (row[:, None] < rows) & (col[None, :] < columns)
        offsets = row[:, None] * block_stride + col[None, :]
        w = tl.load(block_ptr + offsets, mask=tile, other=0.0)
        scale = tl.load(scale_ptr + offsets, mask=tile, other=1.0)
        zero = tl.load(zero_ptr + offsets, mask=tile, other=0.0)
        quantized = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
        errors = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
        for i in range(columns):
            here = col[None, :] == i
            w_i = tl.sum(tl.where(here, w, 0.0), axis=1)
            s_i = tl.sum(tl.where(here, scale, 0.0), axis=1)
            z_i = tl.sum(tl.where(here, zero, 0.0), axis=1)
            q_i = (tl.clamp(libdevice.rint(tl.math.div_rn(w_i, s_i)) + z_i, qmin, qmax) - z_i) * s_i
            u = tl.load(upper_ptr + i * upper_stride + col, mask=col < columns, other=0.0)  # row i of U
            error = tl.math.div_rn(w_i - q_i, tl.load(upper_ptr + i * upper_stride + i))
            w = w - error[:, None] * u[None, :]  # U is upper triangular: columns before i are untouched
            quantized = tl.where(here, q_i[:, None], quantized)
            errors = tl.where(here, error[:, None], errors)
        tl.store(quantized_ptr + offsets, quantized, mask=tile)
        tl.store(errors_ptr + offsets, errors, mask=tile)


def quantize_block(block: torch.Tensor, upper: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   qmin: float, qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as gptq.quantize_block (float32 CUDA tensors; `block` is not updated in place here, since
    only the quantized columns and errors are used afterwards)."""
    rows, columns = block.shape
    block, upper = block.contiguous(), upper.contiguous()
    scale, zero = scale.contiguous(), zero.contiguous()
    quantized, errors = torch.empty_like(block), torch.empty_like(block)
    width = max(16, triton.next_power_of_2(columns))
    grid = (triton.cdiv(rows, ROWS_PER_PROGRAM),)
    _quantize_block_kernel[grid](block, upper, scale, zero, quantized, errors, rows, columns, block.stride(0),
                                 upper.stride(0), float(qmin), float(qmax), ROWS=ROWS_PER_PROGRAM, BLOCK=width)
    return quantized, errors


# The packed runtime's long inputs (compress.quantize.packed): the int4 weight dequantized to bf16 by one kernel, then
# cuBLAS. Why ours: torch.compile's kernel for the same expression reached a quarter of the memory bandwidth that this
# element-wise pass should run at on an H200, and gemlite's own GEMM was several times slower than cuBLAS at 2048 rows
# (eval/results/bench_kernels_h200.json). Each program writes a tile of the [in, out] weight; the word holding
# input k is row k // 8 of gemlite's (= compressed-tensors' transposed) layout, its code at bits 4·(k % 8).
if triton is not None:

    @triton.jit
    def _dequantize_int4_kernel(packed_ptr, scale_ptr, zero_ptr, out_ptr, K, N, group, zero_constant,
                                HAS_ZERO: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        tile = (k[:, None] < K) & (n[None, :] < N)
        words = tl.load(packed_ptr + (k[:, None] // 8) * N + n[None, :], mask=tile, other=0)
        codes = ((words >> ((k[:, None] % 8) * 4)) & 15).to(tl.float32)
        meta = (k[:, None] // group) * N + n[None, :]
        scale = tl.load(scale_ptr + meta, mask=tile, other=0.0).to(tl.float32)
        if HAS_ZERO:
            zero = tl.load(zero_ptr + meta, mask=tile, other=0.0).to(tl.float32)
        else:
            zero = zero_constant
        tl.store(out_ptr + k[:, None] * N + n[None, :], ((codes - zero) * scale).to(out_ptr.dtype.element_ty),
                 mask=tile)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | int, group: int
                    ) -> torch.Tensor:
    """[in, out] weight (scales' dtype) from gemlite's int4 words [in/8, out] (int32) and per-group [in/group, out]
    scales and zero points (a tensor, or one integer for every group)."""
    words, columns = packed.shape
    rows = words * 8
    out = torch.empty(rows, columns, dtype=scales.dtype, device=packed.device)
    has_zero = isinstance(zeros, torch.Tensor)
    grid = (triton.cdiv(rows, 32), triton.cdiv(columns, 256))
    _dequantize_int4_kernel[grid](packed, scales, zeros if has_zero else scales, out, rows, columns, group,
                                  0.0 if has_zero else float(zeros), HAS_ZERO=has_zero, BLOCK_K=32, BLOCK_N=256,
                                  num_warps=4)
    return out


# SmoothQuant W8A8 int8 in the packed runtime (compress.quantize.packed.Int8W8A8Linear) around torch._int_mm: the
# input's per-token rounding and the int32 result's scaling, each one kernel. In eager PyTorch they are ~7 kernels
# with two float32 copies of the input, and four passes over the [tokens, out] result (to float, two products, to
# bf16) plus the bias; a 7B-shape 2048-token prefill took 1.9x bf16's time that way on an H200
# (eval/results/bench_inference_7b_h200_int8_partial.json). The arithmetic is int8_runtime's, operation for
# operation on a GPU (the scale as PyTorch's CUDA kernel computes a division by a number, IEEE division of the
# input by it, round half to even, the products in the same order, the bias added to the rounded output), so that the
# two give the same bits, which tests/test_smoothquant.py's GPU test asks for.
if triton is not None:

    @triton.jit
    def _round_half_even(v):
        """torch.round for |v| < 2^22, exactly: v − floor(v) is exact there (the same as libdevice.rint, which
        Triton's CPU interpreter lacks)."""
        low = tl.math.floor(v)
        rest = v - low
        odd = (low - 2.0 * tl.math.floor(low * 0.5)) == 1.0
        return tl.where((rest > 0.5) | ((rest == 0.5) & odd), low + 1.0, low)

    @triton.jit
    def _int8_per_token_kernel(x_ptr, codes_ptr, scale_ptr, columns, x_stride, reciprocal_range, floor,
                               BLOCK: tl.constexpr):
        row = tl.program_id(0)
        col = tl.arange(0, BLOCK)
        inside = col < columns
        x = tl.load(x_ptr + row * x_stride + col, mask=inside, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0) * reciprocal_range, floor)
        codes = tl.clamp(_round_half_even(tl.math.div_rn(x, scale)), -128.0, 127.0)
        tl.store(codes_ptr + row * columns + col, codes.to(tl.int8), mask=inside)
        tl.store(scale_ptr + row, scale)

    @triton.jit
    def _int8_scale_output_kernel(acc_ptr, token_scale_ptr, channel_scale_ptr, bias_ptr, out_ptr, rows, columns,
                                  HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        tile = (m[:, None] < rows) & (n[None, :] < columns)
        acc = tl.load(acc_ptr + m[:, None] * columns + n[None, :], mask=tile, other=0).to(tl.float32)
        token_scale = tl.load(token_scale_ptr + m, mask=m < rows, other=0.0)
        channel_scale = tl.load(channel_scale_ptr + n, mask=n < columns, other=0.0)
        out = ((acc * token_scale[:, None]) * channel_scale[None, :]).to(out_ptr.dtype.element_ty)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + n, mask=n < columns, other=0.0)
            out = (out.to(tl.float32) + bias.to(tl.float32)[None, :]).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + m[:, None] * columns + n[None, :], out, mask=tile)


@functools.cache
def _float32_reciprocal(value: float) -> float:
    """1 / value rounded to float32, as PyTorch's CUDA division computes a number's reciprocal."""
    return (torch.tensor(1.0) / torch.tensor(float(value))).item()


def int8_per_token(x: torch.Tensor, half_range: float, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """int8_runtime.quantize_activation in one kernel: int8 codes [tokens, features] and float32 scales [tokens, 1]
    of a 2-D activation whose rows are contiguous."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    rows, columns = x.shape
    codes = torch.empty(rows, columns, dtype=torch.int8, device=x.device)
    scales = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(columns)
    # PyTorch's CUDA division by a Python number multiplies by the number's float32 reciprocal
    # (aten/src/ATen/native/cuda/BinaryDivTrueKernel.cu: "may lose one bit"), and quantize_activation divides the
    # absolute maximum by HALF_RANGE so: the same product gives the same scale (with a true division here, the GPU
    # test found whole tokens off by a bit on an H100: one scale's last bit moves every code of its token)
    _int8_per_token_kernel[(rows,)](x, codes, scales, columns, x.stride(0), _float32_reciprocal(half_range), floor,
                                    BLOCK=block, num_warps=max(4, min(16, block // 1024)))
    return codes, scales


def int8_scale_output(accumulated: torch.Tensor, token_scales: torch.Tensor, channel_scales: torch.Tensor,
                      bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """(float(acc) · token scale) · channel scale, rounded to `dtype`, then + bias (rounded again), in one pass over the
    int32 result [tokens, out] of torch._int_mm; token_scales [tokens, 1], channel_scales [1, out] float32."""
    accumulated = accumulated.contiguous()
    rows, columns = accumulated.shape
    out = torch.empty(rows, columns, dtype=dtype, device=accumulated.device)
    grid = (triton.cdiv(rows, 32), triton.cdiv(columns, 128))
    _int8_scale_output_kernel[grid](accumulated, token_scales, channel_scales, bias if bias is not None else out, out,
                                    rows, columns, HAS_BIAS=bias is not None, BLOCK_M=32, BLOCK_N=128, num_warps=4)
    return out

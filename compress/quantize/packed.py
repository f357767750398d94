"""The packed runtime: quantized Linears kept packed in memory and run with low-bit kernels, so a 4-bit model is 4 bits
when it runs, not only on disk, and faster than its source. Built from the grid's integer codes, scales and zero points
(the values are exactly the checkpoint's); pruned layers keep their widths.

Kernels, chosen by measurement (eval/bench_kernels.py, eval/results/bench_kernels_h200.json, 7B shapes on an H200):

    int4, groups of 64..256, CUDA   ours (compress.quantize.int4_mma: tensor cores, built at run time by NVRTC) for
                                    up to DEQUANTIZE_ABOVE_ROWS rows (decode); above, the weight dequantized by one
                                    kernel and multiplied by cuBLAS (vLLM's rule for Marlin: a large input is
                                    compute-bound, and cuBLAS is the fastest GEMM there). INT4_CUDA_KERNELS says why.
    int4, groups of 32, or no NVRTC gemlite (Triton; the optional extra `compress-llm[cuda]`): its GEMV / split-K
                                    kernels, and the same dequantize-then-cuBLAS rule. Without it: tinygemm
                                    (aten._weight_int4pack_mm, what torchao's int4 weight-only path calls), with one
                                    warning naming the extra; tinygemm is 3-16x slower than bf16 on long prompts and
                                    has no dequantize path, since its tile layout is private. COMPRESS_INT4_KERNEL
                                    names one of them for comparisons in one run.
    int4, CPU                       tinygemm's CPU kernel for few rows; above CPU_DEQUANTIZE_ABOVE_ROWS its layout is
                                    unpacked (a rule checked exactly at pack time) and oneDNN's bf16 GEMM runs.
    int8, one scale per row         aten._weight_int8pack_mm (CPU and CUDA; bf16 compute)
    int8 W8A8 (int8 inputs)         torch._int_mm on the int8 codes and per-token int8 inputs (compress.quantize.
                                    int8_runtime)
    FP8 e4m3 (W8A8 or weight-only)  the e4m3 weight alone is kept (1 byte); W8A8 runs torch._scaled_mm with per-token x
                                    per-row scales and fast accumulation on GPUs with FP8 tensor cores, its activation
                                    quantization one compiled kernel; elsewhere the same rounding simulated
Anything else (3 or 2 bits, int8 in groups, asymmetric int8) has no kernel here: it stays dequantized, and
`pack_model` says so once per setting.

Grids: ours (compressed-tensors) is w = (c − z)·s with c in [−8, 7]. The kernels take unsigned codes q = c + 8 in
[0, 15]: gemlite as w = (q − (z + 8))·s, tinygemm as w = (q − 8)·s + m with m = −z·s, exactly."""

from __future__ import annotations

import functools
import gc
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from compress.architectures import known_family
from compress.modules import PACKED_ATTR, QUANT_ATTR, WeightQuant
from compress.quantize.int8_runtime import HALF_RANGE, SCALE_FLOOR, int8_matmul, int_mm_tiles
from compress.quantize.int8_runtime import quantize_activation as quantize_int8_activation

INT4_GROUP_SIZES = (32, 64, 128, 256)
# The int4 and int8 kernels take their input, scales and output in bf16: the CUDA kernels only so, and on the CPU their
# float32 paths are reference loops, tens of times slower than bf16 and than a float32 matmul. So a packed model
# computes these Linears in bf16 whatever its dtype.
KERNEL_DTYPE = torch.bfloat16
# Rows above which a 4-bit Linear dequantizes its weight and calls the dense GEMM: where the low-bit kernel's time
# crosses dequantize + GEMM (measured: eval/results/bench_kernels_h200.json, bench_kernels_cpu.json).
DEQUANTIZE_ABOVE_ROWS = 64
CPU_DEQUANTIZE_ABOVE_ROWS = 128
# The CUDA int4 kernels, the first available one that holds the Linear's shape runs (eval/results/
# bench_int4_mma_h200_v2.json, 7B shapes on an H200, g128): ours (int4_mma) is 1.32-1.36x gemlite's speed at 1 row,
# 1.38-1.82x at 16 and 2.1-2.4x at 32, and decodes the 7B model 1.77x bf16 at batch 1 against gemlite's 1.54x
# (eval/results/bench_inference_7b_h200_mma.json); its dequantize kernel for long prompts is ~3 % slower end to end than
# gemlite's. Groups that are not a multiple of 64 (32) run on gemlite; tinygemm is the last resort.
INT4_CUDA_KERNELS = ("mma", "gemlite", "tinygemm")
# Set, it names the int4 kernel to run on CUDA (for comparisons in one run); unset, INT4_CUDA_KERNELS decides.
INT4_KERNEL_VARIABLE = "COMPRESS_INT4_KERNEL"
CUDA_EXTRA = 'pip install "compress-llm[cuda]" (in a clone: pip install -e ".[cuda]")'


def integer_codes(weight: torch.Tensor, quant: WeightQuant) -> torch.Tensor:
    """The grid's integers of a weight that lies on it: clamp(⌊W/s⌉ + z) (int32)."""
    columns = weight.shape[1] // quant.scale.shape[1]
    scale = quant.scale.float().repeat_interleave(columns, 1)
    zero = 0 if quant.zero_point is None else quant.zero_point.float().repeat_interleave(columns, 1)
    bits = quant.args.num_bits
    return torch.clamp(torch.round(weight.float() / scale) + zero, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1).int()


# gemlite's kernel settings tuned for GPUs its own tables do not cover (it matches them by the device's name), written
# by eval/tune_gemlite.py in gemlite's cache format: without them every shape there runs its small run-time autotune.
GEMLITE_SETTINGS = Path(__file__).parent / "gemlite_configs"


@functools.cache
def gemlite_module():
    """gemlite, imported on first use (its import reads the GPU's properties) with our tuned settings for this GPU
    where we have them, or None where it is not installed."""
    try:
        import gemlite
    except ImportError:
        return None
    device = torch.cuda.get_device_name().lower().replace(" ", "_") if torch.cuda.is_available() else ""
    for table in sorted(GEMLITE_SETTINGS.glob("*.json")):
        if table.stem in device:
            gemlite.load_config(str(table))
    return gemlite


@functools.cache
def _mma_unavailable(device: torch.device) -> str | None:
    from compress.quantize.int4_mma import available

    return available(device)


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


class _PackedLinear(torch.nn.Module):
    """What every packed Linear shares: its widths, its bias and the grid it came from (for `is_quantized`)."""

    kernel = ""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, quant: WeightQuant):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)
        setattr(self, QUANT_ATTR, quant)

    def _finish(self, out: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def output_slices(self, x: torch.Tensor, widths: list[int]) -> list[torch.Tensor] | None:
        """This Linear's output for a long input as one tensor per consecutive slice of `widths` output features,
        each computed into its own memory (see FusedLinears.take), or None where it has no such path."""
        return None

    def _sliced(self, x: torch.Tensor, widths: list[int], matmul: Callable[[int, int], torch.Tensor]
                ) -> list[torch.Tensor]:
        """matmul(first, last): the [rows, last − first] product with the weight's rows first..last."""
        outputs, first = [], 0
        for width in widths:
            out = matmul(first, first + width)
            if self.bias is not None:
                out = out + self.bias[first:first + width]
            outputs.append(out.to(x.dtype).reshape(*x.shape[:-1], width))
            first += width
        return outputs

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


def _inner_k_tiles(in_features: int) -> int:
    return next(tiles for tiles in (8, 4, 2) if in_features % (16 * tiles) == 0)


# tinygemm's CPU layout (aten/src/ATen/native/cpu/int4mm_kernel.cpp, weight_to_int4pack_kernel): rows in blocks of 64,
# each block stored as [in, 32] bytes whose low nibbles are the block's rows 0-31 and high nibbles rows 32-63; a last
# block of fewer rows pairs rows (2i, 2i+1) in a byte. The block width depends on the CPU's vector width, so the rule is
# checked against the codes at pack time and the dequantize path is used only where it holds.
CPU_BLOCK_ROWS = 64


def pack_tinygemm_cpu(unsigned: torch.Tensor, inner_k_tiles: int, rows: int = 64 * CPU_BLOCK_ROWS) -> torch.Tensor:
    """aten._convert_weight_to_int4pack_for_cpu of unsigned codes [out, in] (uint8), `rows` rows at a time: it takes
    int32 codes, 4 bytes a weight, which whole would be the largest temporary of a load; its blocks of 64 rows are
    stored one after another, so the slices' results stacked are the whole's (tested)."""
    parts = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned[first:first + rows].int(), inner_k_tiles)
             for first in range(0, unsigned.shape[0], rows)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def unpack_tinygemm_cpu(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The unsigned codes [out, in] (uint8) of a weight packed by aten._convert_weight_to_int4pack_for_cpu; written
    straight into place (one byte per weight; no float temporaries: this runs on every long input)."""
    flat = packed.reshape(-1)
    full = out_features // CPU_BLOCK_ROWS * CPU_BLOCK_ROWS
    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=packed.device)
    blocks = flat[:full * in_features // 2].view(-1, in_features, CPU_BLOCK_ROWS // 2)
    halves = codes[:full].view(-1, 2, CPU_BLOCK_ROWS // 2, in_features)
    torch.bitwise_and(blocks, 15, out=halves[:, 0].transpose(1, 2))
    torch.bitwise_right_shift(blocks, 4, out=halves[:, 1].transpose(1, 2))
    if out_features > full:
        tail = flat[full * in_features // 2:].view(in_features, (out_features - full) // 2)
        codes[full:] = torch.stack([tail & 15, tail >> 4], 2).reshape(in_features, -1).T
    return codes


# The most inputs one pass of gemlite's split-K kernel covers: BLOCK_SIZE_K × SPLIT_K, at most 512 × 16 in its
# autotune space and tables. Its blocks past the last input load their group's scale and zero point unmasked (gemlite
# 0.6.0, gemm_splitK_kernels.py), so where that span does not divide the inputs they read past the end of those
# tensors: the inputs there are masked to zero, but zero times a stray inf or NaN is NaN (seen on the tiny test model,
# 64 inputs, at 8-16 rows).
GEMLITE_MAX_SPAN = 512 * 16


def _zeros_after(meta: torch.Tensor, in_features: int, group_size: int) -> torch.nn.Parameter:
    """gemlite's [groups, out] scales or zero points as a view of a tensor with zero rows after them, up to the next
    multiple of GEMLITE_MAX_SPAN inputs: what the kernel reads past the end is then zero, never garbage. (Up to twice
    the scales' bytes, on the groups of 32 that only gemlite runs.)"""
    covered = -(-in_features // GEMLITE_MAX_SPAN) * GEMLITE_MAX_SPAN
    padded = torch.zeros(covered // group_size, meta.shape[1], dtype=meta.dtype, device=meta.device)
    padded[:meta.shape[0]] = meta
    return torch.nn.Parameter(padded[:meta.shape[0]], requires_grad=False)  # gemlite keeps them as Parameters


def dequantize_gemlite_reference(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | int,
                                 group: int) -> torch.Tensor:
    """gemlite's int4 layout back to the [in, out] weight: `packed` is [in/8, out] int32, code i of a word at bits
    4i..4i+3 (compressed-tensors' packing, transposed); per-group [in/group, out] scales and zero points. The CUDA path
    runs this arithmetic in one Triton kernel (kernels.dequantize_int4); this is its reference."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    codes = ((packed[:, None, :] >> shifts[None, :, None]) & 15).view(-1, packed.shape[1])
    columns, rows = codes.shape
    grouped = codes.view(columns // group, group, rows).to(scales.dtype)
    zero = zeros[:, None, :] if isinstance(zeros, torch.Tensor) else zeros
    return ((grouped - zero) * scales[:, None, :]).view(columns, rows)


class Int4Linear(_PackedLinear):
    """4-bit weights (half a byte each) with one scale and zero point per group: gemlite on CUDA where installed, else
    tinygemm; long inputs dequantize and call the dense GEMM (see the module's table)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, group_size: int,
                 bias: torch.Tensor | None, quant: WeightQuant, backend: str):
        """codes: the grid's signed integers [out, in] (c in [−8, 7]); scale, zero_point: [out, in/group]."""
        out_features, in_features = codes.shape
        super().__init__(in_features, out_features, bias, quant)
        self.group_size, self.backend = group_size, backend
        # unsigned codes in one byte each: int8 codes (a checkpoint's) shift in place of a 4-byte-a-weight int32 copy,
        # the largest temporary of a packed load (a fused gate/up of a 7B model: 360 MB)
        unsigned = codes.view(torch.uint8) + 8 if codes.dtype == torch.int8 else (codes + 8).to(torch.uint8)
        symmetric = zero_point is None or not zero_point.any()
        if backend == "mma":
            self._pack_mma(unsigned, scale, zero_point, symmetric)
        elif backend == "gemlite":
            self._pack_gemlite(unsigned, scale, zero_point, symmetric)
        else:
            self._pack_tinygemm(unsigned, scale, zero_point)
        setattr(self, PACKED_ATTR, self.kernel)

    def _pack_mma(self, unsigned, scale, zero_point, symmetric: bool) -> None:
        from compress.quantize.int4_mma import pack

        tensors = pack(unsigned, scale, None if symmetric else zero_point.int() + 8)
        self.register_buffer("words", tensors["words"])
        self.register_buffer("mma_scales", tensors["scales"])
        self.register_buffer("mma_zeros", tensors["zeros"])
        self.kernel = "int4 mma"

    def _pack_gemlite(self, unsigned, scale, zero_point, symmetric: bool) -> None:
        gemlite = gemlite_module()
        self.gemlite = gemlite.GemLiteLinearTriton(4, group_size=self.group_size, in_features=self.in_features,
                                                   out_features=self.out_features, input_dtype=gemlite.DType.BF16,
                                                   output_dtype=gemlite.DType.BF16)
        zero = 8 if symmetric else (zero_point.float() + 8).to(KERNEL_DTYPE)
        # fma_mode=False: w = (q − z)·s exactly as the checkpoint defines it (the fma form rounds −z·s to bf16)
        self.gemlite.pack(unsigned, scale.to(KERNEL_DTYPE), zero, bias=None, fma_mode=False)
        self.gemlite.scales = _zeros_after(self.gemlite.scales, self.in_features, self.group_size)
        if isinstance(self.gemlite.zeros, torch.Tensor) and self.gemlite.zeros.numel() > 1:
            self.gemlite.zeros = _zeros_after(self.gemlite.zeros, self.in_features, self.group_size)
        self.kernel = "int4 gemlite"

    def _pack_tinygemm(self, unsigned, scale, zero_point) -> None:
        tiles = _inner_k_tiles(self.in_features)
        if unsigned.is_cuda:  # the CUDA packer takes two codes per byte, high nibble first
            pairs = unsigned[:, ::2] << 4 | unsigned[:, 1::2]
            packed = torch.ops.aten._convert_weight_to_int4pack(pairs, tiles)
        else:
            packed = pack_tinygemm_cpu(unsigned, tiles)
        scale = scale.float()
        offset = torch.zeros_like(scale) if zero_point is None else -zero_point.float() * scale
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_offsets", torch.stack([scale, offset], -1).transpose(0, 1).contiguous()
                             .to(KERNEL_DTYPE))  # [groups, out, 2]
        # the CPU layout is unpacked for long inputs only where the unpacking rule gives back these exact codes
        self.cpu_dequantize = (not packed.is_cuda and torch.equal(
            unpack_tinygemm_cpu(packed, self.out_features, self.in_features), unsigned))
        self.kernel = "int4 tinygemm"

    def dequantized_weight(self) -> torch.Tensor:
        """The [out, in] bf16 weight (for long inputs, and for tests)."""
        if self.backend == "mma":
            from compress.quantize.int4_mma import dequantize

            return dequantize(self.words, self.mma_scales, self.mma_zeros, self.group_size)
        if self.backend == "gemlite":
            from compress.quantize.kernels import dequantize_int4

            gemlite = self.gemlite
            zeros = gemlite.zeros if gemlite.zeros.numel() > 1 else 8
            return dequantize_int4(gemlite.W_q, gemlite.scales, zeros, self.group_size).T
        groups = self.in_features // self.group_size
        scales, offsets = self.scales_and_offsets.transpose(0, 1).unbind(-1)  # [out, groups]: w = (q − 8)·s + m
        weight = torch.empty(self.out_features, groups, self.group_size, dtype=KERNEL_DTYPE)
        weight.copy_(unpack_tinygemm_cpu(self.packed, self.out_features, self.in_features).view_as(weight))
        return weight.mul_(scales[:, :, None]).add_((offsets - 8 * scales)[:, :, None]).view(self.out_features, -1)

    def _dequantizes(self, flat: torch.Tensor) -> bool:
        """Whether an input of these rows runs as the dequantized weight and the dense GEMM (the module's table; the
        mma kernel's own rule, int4_mma.MAX_ROWS, is the same count)."""
        if flat.is_cuda:
            return self.backend != "tinygemm" and flat.shape[0] > DEQUANTIZE_ABOVE_ROWS
        return self.cpu_dequantize and flat.shape[0] > CPU_DEQUANTIZE_ABOVE_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(KERNEL_DTYPE)
        if self.backend == "mma":  # the bias is added inside the kernel
            out = torch.ops.compress.int4_mma(flat, self.words, self.mma_scales, self.mma_zeros, self.bias,
                                              self.group_size)
            return out.to(x.dtype).reshape(*shape[:-1], self.out_features)
        if self.backend == "gemlite":
            if self._dequantizes(flat):
                out = flat @ self.dequantized_weight().T
            else:
                out = self.gemlite(flat)
        elif self.packed.is_cuda:
            out = torch.ops.aten._weight_int4pack_mm(flat, self.packed, self.group_size, self.scales_and_offsets)
        elif self._dequantizes(flat):
            out = F.linear(flat, self.dequantized_weight())
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size,
                                                             self.scales_and_offsets)
        return self._finish(out.to(x.dtype), shape)

    def output_slices(self, x: torch.Tensor, widths: list[int]) -> list[torch.Tensor] | None:
        """Where a long input dequantizes the weight (above the row counts of the module's table): dequantized once,
        then one GEMM per slice of its rows."""
        flat = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE)
        if not self._dequantizes(flat):
            return None
        weight = self.dequantized_weight()
        return self._sliced(x, widths, lambda first, last: F.linear(flat, weight[first:last]))


class Int8Linear(_PackedLinear):
    """8-bit weights (one byte each) with one scale per output row."""

    kernel = "int8 weight-only"

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, quant: WeightQuant):
        super().__init__(codes.shape[1], codes.shape[0], bias, quant)
        setattr(self, PACKED_ATTR, self.kernel)
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("scales", scale.reshape(-1).to(KERNEL_DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(self.scales.dtype), self.codes,
                                                 self.scales)
        return self._finish(out.to(x.dtype), shape)


# SmoothQuant W8A8 int8 Linears packed on a GPU round their inputs and scale their int32 outputs with one Triton kernel
# each (compress.quantize.kernels.int8_per_token, int8_scale_output: the same arithmetic, bit for bit: the GPU test
# passed on an H100) in eager runs, in place of eager PyTorch's ~7 + 5 kernels around torch._int_mm: a 7B-shape
# 2048-token prefill took 67.0 against 122.0 ms (eval/results/bench_prefill_int8_fused_h100.json). "0" keeps the
# PyTorch form (for comparisons in one run); inside torch.compile Inductor fuses the PyTorch form anyway.
FUSED_INT8_VARIABLE = "COMPRESS_FUSED_INT8"


class Int8W8A8Linear(_PackedLinear):
    """The packed runtime's W8A8 int8 Linear: int8 codes [out, in] (one byte per weight), one float32 scale per output
    row; the input quantized per token and multiplied by torch._int_mm. Shapes the CUDA kernel cannot tile run the
    same arithmetic as a float matmul (`kernel` says which)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, quant: WeightQuant):
        super().__init__(codes.shape[1], codes.shape[0], bias, quant)
        self.register_buffer("codes", codes.to(torch.int8).contiguous())
        self.register_buffer("scales", scale.float().reshape(1, -1))  # [1, out]
        self.int_mm = int_mm_tiles(codes.device, self.in_features, self.out_features)
        self.kernel = "int8 W8A8 _int_mm" if self.int_mm else "int8 W8A8 (float matmul)"
        setattr(self, PACKED_ATTR, self.kernel)
        from compress.quantize.kernels import triton

        self.fused = os.environ.get(FUSED_INT8_VARIABLE) != "0" and self.int_mm and codes.is_cuda and triton is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.fused and x.is_cuda and not torch.compiler.is_compiling():
            from compress.quantize.kernels import int8_per_token, int8_scale_output

            x_int8, x_scale = int8_per_token(x.reshape(-1, shape[-1]), HALF_RANGE, SCALE_FLOOR)
            out = int8_scale_output(int8_matmul(x_int8, self.codes), x_scale, self.scales, self.bias, x.dtype)
            return out.reshape(*shape[:-1], self.out_features)
        x_int8, x_scale = quantize_int8_activation(x.reshape(-1, shape[-1]))
        if self.int_mm:
            accumulated = int8_matmul(x_int8, self.codes).float()
        else:
            accumulated = x_int8.float() @ self.codes.float().T
        return self._finish(accumulated.mul_(x_scale).mul_(self.scales).to(x.dtype), shape)  # in place: no temporaries


def _quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from compress.quantize.fp8 import quantize_activation

    return quantize_activation(x)


@functools.cache
def _fused_fp8_activation():
    """gemlite's per-token e4m3 rounding of an activation, one Triton kernel (amax, scale, divide, clamp, cast), or
    None without gemlite. In eager PyTorch the same rounding is ~7 kernels and two float32 copies of the input, which
    cost a 2048-token FP8 prefill more than its GEMMs saved (eval/results/bench_inference_7b_h200_asym_fp8.json).
    Its arithmetic is ours (amax / 448 in float32, x / scale, clamped, cast rounding to nearest) except the floor of
    the scale, 1e-6 against quantize_activation's 1e-12 (which changes only tokens whose largest magnitude is below
    4.5e-4), and perhaps the division's last bit (see FUSED_FP8_INPUT_VARIABLE)."""
    if gemlite_module() is None:
        return None
    from gemlite.quant_utils import scale_activations_per_token

    return scale_activations_per_token


# FP8 Linears packed while it is "0" round their inputs with the PyTorch form in eager runs too (for comparisons in one
# run). On by default: on an H100 its codes and scales equal the PyTorch form's (tests/test_packed.py's GPU test) and a
# 2048-token prefill of the 7B shape took 48.2 ms against bf16's 61.9 (1.28x; eval/results/
# bench_inference_7b_h100_table.json), where the PyTorch form's took 68.7 ms against 60.4 (0.88x, an earlier run).
FUSED_FP8_INPUT_VARIABLE = "COMPRESS_FUSED_FP8_INPUT"


def _quantize_fp8_input(x: torch.Tensor, fused_allowed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token e4m3 values and float32 scales [tokens, 1]: with `fused_allowed`, gemlite's fused kernel when run
    eagerly on a GPU; otherwise, and inside torch.compile (the decode step, where Inductor fuses it into the kernels
    around it), the PyTorch form."""
    if (fused_allowed and x.is_cuda and not torch.compiler.is_compiling()
            and (fused := _fused_fp8_activation()) is not None):
        return fused(x.contiguous(), w_dtype=torch.float8_e4m3fn)  # it writes its output at the input's strides
    return _quantize_activation(x)


class FP8Linear(_PackedLinear):
    """e4m3 weights (one byte each) with one scale per output row; W8A8 also rounds its input to e4m3 per token."""

    def __init__(self, weight_fp8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, quant: WeightQuant,
                 dtype: torch.dtype):
        super().__init__(weight_fp8.shape[1], weight_fp8.shape[0], bias, quant)
        from compress.quantize.fp8 import _has_fp8_tensor_cores

        self.register_buffer("weight_fp8", weight_fp8)  # [out, in] e4m3
        self.register_buffer("scales", scale.float().reshape(-1, 1))  # [out, 1]
        self.dynamic_inputs = quant.input_args is not None
        self.tensor_cores = (self.dynamic_inputs and _has_fp8_tensor_cores(weight_fp8.device)
                             and dtype == torch.bfloat16 and self.in_features % 16 == 0
                             and self.out_features % 16 == 0)
        self.kernel = "fp8 _scaled_mm" if self.tensor_cores else "fp8 (simulated matmul)"
        self.fused_input = os.environ.get(FUSED_FP8_INPUT_VARIABLE, "1") != "0"
        setattr(self, PACKED_ATTR, self.kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if self.tensor_cores:
            # FP8 tensor cores with fast accumulation (gemlite's FP8 GEMV was slower at every row count measured). The
            # activation's rounding is plain PyTorch (a compiled decode step fuses it; wrapping it in its own
            # torch.compile added a guard check per Linear that dominated eager prefill), or asked for, gemlite's
            x_fp8, x_scale = _quantize_fp8_input(flat, self.fused_input)
            out = torch._scaled_mm(x_fp8, self.weight_fp8.T, scale_a=x_scale, scale_b=self.scales.T,
                                   out_dtype=x.dtype, use_fast_accum=True)
        else:
            if self.dynamic_inputs:
                x_fp8, x_scale = _quantize_activation(flat)
                flat = x_fp8.float() * x_scale
            out = (flat.float() @ (self.weight_fp8.float() * self.scales).T).to(x.dtype)
        return self._finish(out, shape)

    def output_slices(self, x: torch.Tensor, widths: list[int]) -> list[torch.Tensor] | None:
        """On FP8 tensor cores, for a long input: rounded to e4m3 once, then one _scaled_mm per slice of the
        weight's rows (each a multiple of 16, as _scaled_mm's layout needs)."""
        flat = x.reshape(-1, x.shape[-1])
        if not self.tensor_cores or flat.shape[0] <= DEQUANTIZE_ABOVE_ROWS or any(w % 16 for w in widths):
            return None
        x_fp8, x_scale = _quantize_fp8_input(flat, self.fused_input)
        return self._sliced(x, widths, lambda first, last: torch._scaled_mm(
            x_fp8, self.weight_fp8[first:last].T, scale_a=x_scale, scale_b=self.scales[first:last].T,
            out_dtype=x.dtype, use_fast_accum=True))


def _int4_kernel_unavailable(kernel: str, device: torch.device, shape: tuple[int, int, int] | None) -> str | None:
    if kernel == "gemlite":
        return None if gemlite_module() is not None else f"gemlite is not installed ({CUDA_EXTRA})"
    if kernel == "mma":
        from compress.quantize.int4_mma import supports

        if shape is not None and not supports(*shape):
            return f"int4_mma's layout cannot hold {shape[0]} inputs x {shape[1]} outputs in groups of {shape[2]}"
        return _mma_unavailable(device)
    return None


def int4_backend(device: torch.device, shape: tuple[int, int, int] | None = None) -> str:
    """The first of INT4_CUDA_KERNELS that runs here (or the one COMPRESS_INT4_KERNEL names) on CUDA, for a Linear
    of `shape` (inputs, outputs, group size) when given; tinygemm on the CPU. Falling back to tinygemm on CUDA warns
    once, naming the extra."""
    if device.type != "cuda":
        return "tinygemm"
    chosen = os.environ.get(INT4_KERNEL_VARIABLE, "")
    if chosen and chosen not in INT4_CUDA_KERNELS:
        raise ValueError(f"{INT4_KERNEL_VARIABLE}={chosen!r}: use {', '.join(INT4_CUDA_KERNELS[:-1])} or "
                         f"{INT4_CUDA_KERNELS[-1]} (or leave it unset)")
    for kernel in ((chosen,) if chosen else ()) + INT4_CUDA_KERNELS:
        reason = _int4_kernel_unavailable(kernel, device, shape)
        if reason and kernel == chosen:
            _warn_once(f"{INT4_KERNEL_VARIABLE}={chosen}: {reason}; the next available int4 kernel runs")
        if reason is None:
            if kernel == "tinygemm" and not chosen:
                _warn_once(f"no faster int4 kernel runs here: 4-bit Linears run on tinygemm, 3-16x slower than bf16 "
                           f"on long prompts; {CUDA_EXTRA} for gemlite")
            return kernel
    raise AssertionError("tinygemm is always available")


def packed_kind(in_features: int, out_features: int, quant: WeightQuant) -> tuple[str | None, str]:
    """Which packed kernel family runs this grid ("int4", "int8", "int8 w8a8", "fp8"), or (None, why it stays
    dequantized)."""
    args = quant.args
    strategy = str(getattr(args.strategy, "value", args.strategy))
    kind = str(getattr(args.type, "value", args.type))
    if kind == "float" and args.num_bits == 8 and strategy == "channel":
        return "fp8", ""
    if kind == "int" and args.num_bits == 4 and strategy == "group" and args.group_size in INT4_GROUP_SIZES:
        if out_features % 8 or in_features % 32 or in_features % args.group_size:
            return None, f"int4 with {in_features} inputs x {out_features} outputs (the int4 kernels need outputs " \
                         f"in multiples of 8 and inputs in multiples of 32 and of the group size)"
        return "int4", ""
    symmetric = quant.zero_point is None or not quant.zero_point.any()
    if kind == "int" and args.num_bits == 8 and strategy == "channel" and symmetric:
        return ("int8 w8a8" if quant.input_args is not None else "int8"), ""
    group = f" g{args.group_size}" if strategy == "group" else f" per {strategy}"
    return None, f"{kind}{args.num_bits}{group}{'' if args.symmetric else ' asymmetric'}"


def linear_codes(linear: torch.nn.Linear, kind: str, quant: WeightQuant) -> torch.Tensor:
    """A dequantized Linear's grid values in the form the packed modules take."""
    weight = linear.weight.detach()
    if kind == "fp8":
        from compress.quantize.fp8 import E4M3

        return (weight.float() / quant.scale.float()).to(E4M3)
    return integer_codes(weight, quant)


@dataclass
class Grid:
    """One quantized Linear as its grid values, from a dense model or straight from a checkpoint's packed tensors:
    `codes()` gives its integer codes [out, in] (for FP8 the e4m3 weight), `release()` frees the source."""

    kind: str
    in_features: int
    out_features: int
    quant: WeightQuant
    bias: torch.Tensor | None
    dtype: torch.dtype
    codes: Callable[[], torch.Tensor]
    release: Callable[[], None] = lambda: None


def packed_linear(grid: Grid) -> _PackedLinear:
    """The packed module of one grid."""
    codes, quant = grid.codes(), grid.quant
    grid.release()
    if grid.kind == "fp8":
        return FP8Linear(codes, quant.scale, grid.bias, quant, grid.dtype)
    if grid.kind == "int8":
        return Int8Linear(codes, quant.scale, grid.bias, quant)
    if grid.kind == "int8 w8a8":
        return Int8W8A8Linear(codes, quant.scale, grid.bias, quant)
    backend = int4_backend(codes.device, (grid.in_features, grid.out_features, quant.args.group_size))
    if backend == "mma":
        return Int4Linear(codes, quant.scale, quant.zero_point, quant.args.group_size, grid.bias, quant, backend)
    if backend == "gemlite":
        try:
            return Int4Linear(codes, quant.scale, quant.zero_point, quant.args.group_size, grid.bias, quant, backend)
        except Exception as error:  # noqa: BLE001 -- a shape or setting gemlite refuses: tinygemm runs it instead
            _warn_once(f"gemlite cannot run int4 g{quant.args.group_size} with {grid.in_features} inputs x "
                       f"{grid.out_features} outputs ({type(error).__name__}: {str(error)[:120]}); tinygemm runs "
                       f"these Linears")
    return Int4Linear(codes, quant.scale, quant.zero_point, quant.args.group_size, grid.bias, quant, "tinygemm")


def fused_groups(model: torch.nn.Module) -> tuple[tuple[str, ...], ...]:
    """Linears that read the same input (the families table's, compress.architectures), run as one packed Linear where
    their grids agree: one launch instead of three or two, and a wider GEMV (k/v of GQA models are narrow). A family
    the table does not know packs each Linear alone."""
    known = known_family(model)
    return known.same_input_linears if known else ()


def _grid_signature(grid: Grid) -> tuple:
    args = grid.quant.args
    return (grid.kind, grid.in_features, args.num_bits, str(args.type), str(args.strategy), args.group_size,
            args.symmetric, grid.quant.input_args is not None, grid.dtype)


def _concatenated(grids: list[Grid]) -> Grid:
    """The grids of Linears with one input as one grid over their outputs stacked."""
    def cat(tensors, like):
        if all(t is None for t in tensors):
            return None
        return torch.cat([torch.zeros_like(like(g)) if t is None else t for t, g in zip(tensors, grids)])

    first = grids[0].quant
    quant = WeightQuant(first.args, torch.cat([g.quant.scale for g in grids]),
                        cat([g.quant.zero_point for g in grids], lambda g: g.quant.scale.to(torch.int8)),
                        first.input_args)
    bias = cat([g.bias for g in grids], lambda g: torch.empty(g.out_features, device=g.quant.scale.device,
                                                              dtype=g.dtype))

    def codes():
        parts = []
        for grid in grids:
            parts.append(grid.codes())
            grid.release()
        return torch.cat(parts)

    return Grid(grids[0].kind, grids[0].in_features, sum(g.out_features for g in grids), quant, bias,
                grids[0].dtype, codes)


# A long input's fused outputs each in their own memory where the kernel allows (one GEMM per projection after one
# dequantization or rounding) in place of slices of one output: slices have strided rows, and the eager element-wise
# kernels after them (SiLU, the product with up) lose vectorization, ~2 ms of a 7B model's 2048-token prefill on an
# H100 (eval/results/profile_7b_h100.json: 2.09 against 0.92 ms for SiLU). Measured in one invocation on an H100
# (eval/results/bench_prefill_sliced_ab_h100.json): W4 g128 69.68 -> 68.06 ms, FP8 W8A8 48.12 -> 46.60 ms, bf16 61.21.
# Groups packed while the variable is "0" keep the slices of one output.
SLICED_OUTPUTS_VARIABLE = "COMPRESS_SLICED_OUTPUTS"


class FusedLinears(torch.nn.Module):
    """One packed Linear standing for several that read the same input (q/k/v, gate/up). The family's own forward still
    calls each projection (a FusedPart): the first call computes every output, the others take their slice, and the
    last one drops the outputs (so nothing outlives the layer's forward, compiled or not)."""

    def __init__(self, linear: _PackedLinear, widths: list[int]):
        super().__init__()
        self.linear, self.widths = linear, widths
        self.sliced = os.environ.get(SLICED_OUTPUTS_VARIABLE, "1") != "0"
        self._input, self._outputs, self._taken = None, None, 0

    def take(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self._outputs is None or self._input is not x:
            outputs = self.linear.output_slices(x, self.widths) if self.sliced else None
            if outputs is None:
                outputs = self.linear(x).split(self.widths, -1)
            self._input, self._outputs, self._taken = x, outputs, 0
        out = self._outputs[index]
        self._taken += 1
        if self._taken == len(self.widths):
            self._input, self._outputs = None, None
        return out


class FusedPart(torch.nn.Module):
    """Where one of a fused group's Linears was: its slice of the group's output."""

    def __init__(self, fused: FusedLinears, index: int):
        super().__init__()
        self.fused, self.index = fused, index
        self.in_features, self.out_features = fused.linear.in_features, fused.widths[index]
        setattr(self, PACKED_ATTR, fused.linear.kernel)
        setattr(self, QUANT_ATTR, getattr(fused.linear, QUANT_ATTR))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.take(x, self.index)

    def extra_repr(self) -> str:
        return f"part {self.index} of {len(self.fused.widths)}, out_features={self.out_features}"


def install_packed(model: torch.nn.Module, grids: dict[str, Grid]) -> None:
    """Put the packed module of each grid (by module name) in its place in `model`, fusing the groups of
    `fused_groups` whose grids agree. Each module is built and its source released before the next."""
    groups = fused_groups(model)
    for parent_name, parent in list(model.named_modules()):
        prefix = f"{parent_name}." if parent_name else ""
        for group in groups:
            members = [grids.get(prefix + child) for child in group]
            if None in members or len({_grid_signature(g) for g in members}) != 1:
                continue
            fused = FusedLinears(packed_linear(_concatenated(members)), [g.out_features for g in members])
            for index, child in enumerate(group):
                setattr(parent, child, FusedPart(fused, index))
                del grids[prefix + child]
            _return_freed_host_memory()
    for name, grid in grids.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, packed_linear(grid))
        _return_freed_host_memory()


@functools.cache
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


def _return_freed_host_memory() -> None:
    """Give the temporaries of the module just packed back to the OS. glibc keeps freed blocks in its heaps (in the
    heap of whichever thread allocated them, and its mmap threshold rises as large blocks are freed), so without this a
    packed load's resident peak depended on thread timing and could reach several times the packed bytes."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# a lookup reads one row per token: nothing to gain from a low-bit GEMM, so a quantized embedding is kept dequantized
EMBEDDING_NOTE = "{name} is int8 on disk and runs dequantized (a lookup table; the packed kernels are for Linears)"


@torch.no_grad()
def pack_model(model: torch.nn.Module) -> list[str]:
    """Replace every quantized Linear of `model` by its packed module, in place; returns one note per setting that has
    no kernel here (those Linears stay dequantized), and one per quantized embedding (it stays dequantized)."""
    from compress.modules import quantized_linears

    missing: Counter = Counter()
    grids = {}
    for name, linear, quant in list(quantized_linears(model)):
        kind, why = packed_kind(linear.in_features, linear.out_features, quant)
        if kind is None:
            missing[why] += 1
            continue

        def release(linear=linear):
            linear.weight = None  # free the float weight at once: a 7B model must not hold both

        grids[name] = Grid(kind, linear.in_features, linear.out_features, quant, linear.bias, linear.weight.dtype,
                           functools.partial(linear_codes, linear, kind, quant), release)
    install_packed(model, grids)
    gc.collect()  # the replaced Linears sit in reference cycles: free what is left of them now
    embeddings = [name for name, module in model.named_modules()
                  if isinstance(module, torch.nn.Embedding) and hasattr(module, QUANT_ATTR)]
    return [f"no packed kernel for {why}: {count} Linear(s) run dequantized" for why, count in missing.items()] + \
        [EMBEDDING_NOTE.format(name=name) for name in embeddings]


def packed_kernels(model: torch.nn.Module) -> dict[str, int]:
    """How many Linears each packed kernel runs (a fused group counts as the Linears it stands for)."""
    inside_fused = {id(m.linear) for m in model.modules() if isinstance(m, FusedLinears)}
    return dict(Counter(getattr(m, PACKED_ATTR) for m in model.modules()
                        if hasattr(m, PACKED_ATTR) and id(m) not in inside_fused))


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer in memory (tied tensors and views of one tensor once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total

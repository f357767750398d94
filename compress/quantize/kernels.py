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
import json
from dataclasses import dataclass
from pathlib import Path

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
# cuBLAS. Why ours: torch.compile's kernel for the same expression reached 1.3 TB/s on an H200 (eval/results/
# bench_kernels_h200.json), a quarter of the memory bandwidth that this element-wise pass should run at, and gemlite's
# own GEMM was 3x slower than cuBLAS at 2048 rows. Each program writes a tile of the [in, out] weight; the word holding
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


# The packed runtime's int4 kernels on CUDA: y = x · Wᵀ with W in compressed-tensors' own packed layout (words
# [out, in/8] int32, code i of a word at bits 4i, unsigned q = c + 8; per-group [out, in/group] scales and zero points,
# w = (q − z)·s). Why ours: gemlite's one-row kernel moved 1.0-1.5 TB/s of weights on an H200 (eval/results/
# tune_gemlite_h200_part1.json), a third of the memory bandwidth, its few-row split-K kernel less, and it needs its own
# transposed layout. Here each program reads a [outputs, words] tile along the rows of the weight, the input's 8 values
# of a word in one vector load, and turns a code into a float without an int-to-float instruction (those run at an
# eighth of the FMA rate): the 4 bits are placed in the mantissa of 2^23, whose float is then 2^23 + q exactly.
# Split-K programs write fp32 partial sums and the last one to arrive (an atomic counter per output tile, reset by that
# program) adds them up: no zero-filled buffer and no extra launch, so a decode step's CUDA graph keeps one kernel per
# Linear.
if triton is not None:

    @triton.jit
    def _codes_as_floats(words):
        """[a, b] int32 words → [a, b, 8] float32 codes q (exact), code i from bits 4i."""
        codes = ((words[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 15) | 0x4B000000
        return codes.to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _finish_split(total, out_ptrs, partial_ptrs, arrivals_ptr, split, mask,
                      SPLIT_K: tl.constexpr, SPLIT_STRIDE):
        """Store one program's sum; with split-K, the last program of the tile adds up the partial sums."""
        if SPLIT_K == 1:
            tl.store(out_ptrs, total.to(out_ptrs.dtype.element_ty), mask=mask)
        else:
            tl.store(partial_ptrs + split * SPLIT_STRIDE, total, mask=mask)
            tl.debug_barrier()  # every thread's partial sums written before the release below
            arrived = tl.atomic_add(arrivals_ptr, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                summed = tl.zeros_like(total)
                for other in tl.static_range(SPLIT_K):
                    summed += tl.load(partial_ptrs + other * SPLIT_STRIDE, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(out_ptrs, summed.to(out_ptrs.dtype.element_ty), mask=mask)
                tl.atomic_xchg(arrivals_ptr, 0)  # ready for the next call

    @triton.jit
    def _load_grid(words_ptr, scale_ptr, zero_ptr, n, w, tile, WORDS, zero_constant,
                   GROUP: tl.constexpr, HAS_ZERO: tl.constexpr):
        """A [outputs, words] tile of words with each word's scale and zero point."""
        words = tl.load(words_ptr + n[:, None] * WORDS + w[None, :], mask=tile, other=0,
                        eviction_policy="evict_first")
        meta = n[:, None] * (WORDS // (GROUP // 8)) + (w // (GROUP // 8))[None, :]
        scale = tl.load(scale_ptr + meta, mask=tile, other=0.0).to(tl.float32)
        if HAS_ZERO:
            zero = tl.load(zero_ptr + meta, mask=tile, other=0.0).to(tl.float32)
        else:
            zero = tl.zeros_like(scale) + zero_constant
        return words, scale, zero

    @triton.jit
    def _int4_gemv_kernel(x_ptr, words_ptr, scale_ptr, zero_ptr, out_ptr, partial_ptr, arrivals_ptr,
                          N, WORDS, words_per_split, zero_constant,
                          GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_W: tl.constexpr, SPLIT_K: tl.constexpr):
        """One input row: Σ_k x_k (q_k − z) s = Σ_words s (Σ_i x_i q_i − z Σ_i x_i)."""
        pid_n, split = tl.program_id(0), tl.program_id(1)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_in = n < N
        start = split * words_per_split
        stop = tl.minimum(start + words_per_split, WORDS)
        acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
        for first in range(start, stop, BLOCK_W):
            w = first + tl.arange(0, BLOCK_W)
            w_in = w < stop
            words, scale, zero = _load_grid(words_ptr, scale_ptr, zero_ptr, n, w, n_in[:, None] & w_in[None, :],
                                            WORDS, zero_constant, GROUP, HAS_ZERO)
            x8 = tl.load(x_ptr + w[:, None] * 8 + tl.arange(0, 8)[None, :], mask=w_in[:, None],
                         other=0.0).to(tl.float32)  # [words, 8]
            dot = tl.sum(_codes_as_floats(words) * x8[None, :, :], axis=2)
            acc += scale * (dot - zero * tl.sum(x8, axis=1)[None, :])
        _finish_split(tl.sum(acc, axis=1), out_ptr + n, partial_ptr + n, arrivals_ptr + pid_n, split, n_in,
                      SPLIT_K, N)

    @triton.jit
    def _int4_mm_kernel(x_ptr, words_ptr, scale_ptr, zero_ptr, out_ptr, partial_ptr, arrivals_ptr,
                        M, N, WORDS, words_per_split, stride_xm, zero_constant,
                        GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_W: tl.constexpr, SPLIT_K: tl.constexpr):
        """A few input rows: the weight tile dequantized to the input's dtype ((q − z)·s is exact in float32 for 4-bit
        codes and bf16 scales, then rounded once) and multiplied on the tensor cores."""
        pid_n, split, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_in, n_in = m < M, n < N
        start = split * words_per_split
        stop = tl.minimum(start + words_per_split, WORDS)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for first in range(start, stop, BLOCK_W):
            w = first + tl.arange(0, BLOCK_W)
            words, scale, zero = _load_grid(words_ptr, scale_ptr, zero_ptr, n, w, n_in[:, None] & (w < stop)[None, :],
                                            WORDS, zero_constant, GROUP, HAS_ZERO)
            weight = ((_codes_as_floats(words) - zero[:, :, None]) * scale[:, :, None]).to(x_ptr.dtype.element_ty)
            k = first * 8 + tl.arange(0, BLOCK_W * 8)
            x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=m_in[:, None] & (k < stop * 8)[None, :],
                        other=0.0)
            acc = tl.dot(x, tl.trans(tl.reshape(weight, (BLOCK_N, BLOCK_W * 8))), acc)
        outputs = m[:, None] * N + n[None, :]
        _finish_split(acc, out_ptr + outputs, partial_ptr + outputs, arrivals_ptr + pid_m * tl.num_programs(0) + pid_n,
                      split, m_in[:, None] & n_in[None, :], SPLIT_K, M * N)

    @triton.jit
    def _dequantize_int4_rows_kernel(words_ptr, scale_ptr, zero_ptr, out_ptr, N, WORDS, zero_constant,
                                     GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr,
                                     BLOCK_W: tl.constexpr):
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        tile = (n < N)[:, None] & (w < WORDS)[None, :]
        words, scale, zero = _load_grid(words_ptr, scale_ptr, zero_ptr, n, w, tile, WORDS, zero_constant, GROUP,
                                        HAS_ZERO)
        weight = tl.reshape((_codes_as_floats(words) - zero[:, :, None]) * scale[:, :, None], (BLOCK_N, BLOCK_W * 8))
        k = tl.program_id(1) * BLOCK_W * 8 + tl.arange(0, BLOCK_W * 8)
        tl.store(out_ptr + n[:, None] * (WORDS * 8) + k[None, :], weight.to(out_ptr.dtype.element_ty),
                 mask=(n < N)[:, None] & (k < WORDS * 8)[None, :])


def pack_int4_rows(unsigned: torch.Tensor) -> torch.Tensor:
    """Unsigned codes [out, in] (0..15) → compressed-tensors' words [out, in/8] int32, code i at bits 4i."""
    shifts = torch.arange(0, 32, 4, device=unsigned.device, dtype=torch.int64)
    words = (unsigned.reshape(unsigned.shape[0], -1, 8).long() << shifts).sum(-1)
    return (words - (words >= 2**31).long() * 2**32).int()


def dequantize_int4_rows(words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group: int
                         ) -> torch.Tensor:
    """[out, in] weight (scales' dtype) from words [out, in/8] and per-group [out, in/group] scales and zero points
    (None: 8, the symmetric grid's)."""
    rows, word_count = words.shape
    out = torch.empty(rows, word_count * 8, dtype=scales.dtype, device=words.device)
    grid = (triton.cdiv(rows, 32), triton.cdiv(word_count, 32))
    _dequantize_int4_rows_kernel[grid](words, scales, scales if zeros is None else zeros, out, rows, word_count, 8.0,
                                       GROUP=group, HAS_ZERO=zeros is not None, BLOCK_N=32, BLOCK_W=32, num_warps=4)
    return out


@dataclass(frozen=True)
class Int4Tiling:
    """One launch setting of the few-row int4 kernels (block_m 0: the one-row kernel)."""

    block_m: int
    block_n: int
    block_w: int  # packed words (8 inputs each) per loop step
    split_k: int
    num_warps: int
    num_stages: int


def _tilings(block_ms, block_ns, block_ws, splits, warps, stages, most_values) -> list[Int4Tiling]:
    return [Int4Tiling(m, n, w, s, nw, st) for m in block_ms for n in block_ns for w in block_ws for s in splits
            for nw in warps for st in stages if n * w * 8 <= most_values * 32 * nw]


# Settings searched where the table has none: each keeps a tile's codes as floats in registers (at most 64, resp. 128
# values per thread).
GEMV_TILINGS = _tilings((0,), (16, 32, 64, 128), (16, 32, 64), (1, 2, 4, 8), (4, 8), (2, 3), 512 // 8)
MM_TILINGS = _tilings((16,), (32, 64, 128), (4, 8, 16), (1, 2, 4, 8), (4,), (2, 3, 4), 1024 // 8)
MAX_SPLIT_K = 8
MM_MAX_ROWS = 64  # above this the packed runtime dequantizes and calls cuBLAS
INT4_TILINGS = Path(__file__).parent / "int4_tilings"


def int4_shape_key(rows: int, out_features: int, in_features: int, group: int, has_zero: bool) -> str:
    """The tuning table's key: rows bucketed as the kernels tile them (1; up to 16, 32 or 64)."""
    bucket = 1 if rows == 1 else next(b for b in (16, 32, 64) if rows <= b)
    return f"{bucket}x{out_features}x{in_features} g{group} {'asym' if has_zero else 'sym'}"


@functools.cache
def _tuned_table(device_name: str) -> dict[str, Int4Tiling]:
    """Our measured settings for this GPU (eval/tune_int4.py writes them), matched by the device's name."""
    name = device_name.lower().replace(" ", "_")
    for table in sorted(INT4_TILINGS.glob("*.json")):
        if table.stem in name:
            return {key: Int4Tiling(**value) for key, value in json.loads(table.read_text()).items()}
    return {}


_chosen: dict[str, Int4Tiling] = {}
_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def reserve_int4_workspace(device: torch.device, out_features: int) -> None:
    """Split-K's partial sums and arrival counters, one set per GPU shared by every Linear (kernels on one stream run
    one after another). Reserved when a Linear is packed, before any decode step is captured in a CUDA graph: a
    graph keeps the addresses it was recorded with, so the workspace must not move afterwards."""
    values = MAX_SPLIT_K * MM_MAX_ROWS * out_features
    tiles = triton.cdiv(out_features, 16) * triton.cdiv(MM_MAX_ROWS, 16)
    partials, arrivals = _workspaces.get(device, (None, None))
    if partials is None or partials.numel() < values or arrivals.numel() < tiles:
        _workspaces[device] = (torch.empty(values, dtype=torch.float32, device=device),
                               torch.zeros(tiles, dtype=torch.int32, device=device))


def _launch(tiling: Int4Tiling, x, words, scales, zeros, zero_constant, group, out) -> None:
    rows, (columns, word_count) = x.shape[0], words.shape
    partials, arrivals = _workspaces[x.device]
    per_split = triton.cdiv(triton.cdiv(word_count, tiling.split_k), tiling.block_w) * tiling.block_w
    has_zero = zeros is not None
    zeros = zeros if has_zero else scales
    if tiling.block_m == 0:
        grid = (triton.cdiv(columns, tiling.block_n), tiling.split_k)
        _int4_gemv_kernel[grid](x, words, scales, zeros, out, partials, arrivals, columns, word_count, per_split,
                                zero_constant, GROUP=group, HAS_ZERO=has_zero, BLOCK_N=tiling.block_n,
                                BLOCK_W=tiling.block_w, SPLIT_K=tiling.split_k, num_warps=tiling.num_warps,
                                num_stages=tiling.num_stages)
    else:
        grid = (triton.cdiv(columns, tiling.block_n), tiling.split_k, triton.cdiv(rows, tiling.block_m))
        _int4_mm_kernel[grid](x, words, scales, zeros, out, partials, arrivals, rows, columns, word_count, per_split,
                              x.stride(0), zero_constant, GROUP=group, HAS_ZERO=has_zero, BLOCK_M=tiling.block_m,
                              BLOCK_N=tiling.block_n, BLOCK_W=tiling.block_w, SPLIT_K=tiling.split_k,
                              num_warps=tiling.num_warps, num_stages=tiling.num_stages)


def _fastest(candidates: list[Int4Tiling], launch) -> Int4Tiling:
    """The candidate with the shortest median time (triton.testing.do_bench); settings that fail to compile are
    skipped."""
    best, best_ms = None, float("inf")
    for tiling in candidates:
        try:
            ms = triton.testing.do_bench(lambda tiling=tiling: launch(tiling), warmup=5, rep=20, return_mode="median")
        except Exception:  # noqa: BLE001 -- a setting this GPU cannot run (registers, shared memory)
            continue
        if ms < best_ms:
            best, best_ms = tiling, ms
    return best


def int4_tiling(x, words, scales, zeros, zero_constant, group, out) -> Int4Tiling:
    """This shape's setting: from our table for this GPU, else measured once (not while a CUDA graph is being
    recorded: there the first candidate runs, and the shape is measured on its next eager call)."""
    key = int4_shape_key(x.shape[0], words.shape[0], words.shape[1] * 8, group, zeros is not None)
    if key in _chosen:
        return _chosen[key]
    tiling = _tuned_table(torch.cuda.get_device_name(x.device)).get(key)
    candidates = GEMV_TILINGS if x.shape[0] == 1 else MM_TILINGS
    if tiling is None and torch.cuda.is_current_stream_capturing():
        return candidates[0]
    if tiling is None:
        tiling = _fastest(candidates, lambda t: _launch(t, x, words, scales, zeros, zero_constant, group, out))
    _chosen[key] = tiling
    return tiling


@torch.library.custom_op("compress::int4_matmul", mutates_args=())
def int4_matmul(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                zero_constant: float, group: int) -> torch.Tensor:
    """x [rows ≤ MM_MAX_ROWS, in] (bf16) times the int4 weight (words [out, in/8], see above) → [rows, out]."""
    x = x.contiguous()
    out = torch.empty(x.shape[0], words.shape[0], dtype=x.dtype, device=x.device)
    reserve_int4_workspace(x.device, words.shape[0])  # no-op once the Linear's packing reserved it
    tiling = int4_tiling(x, words, scales, zeros, zero_constant, group, out)
    _launch(tiling, x, words, scales, zeros, zero_constant, group, out)
    return out


@int4_matmul.register_fake
def _(x, words, scales, zeros, zero_constant, group):
    return x.new_empty(x.shape[0], words.shape[0])

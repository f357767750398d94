"""A W4A16 matmul in Triton for the packed runtime's int4 Linears on CUDA: y = x · Wᵀ with W = (q − z)·s, q in
[0, 15], one (s, z) per group of input columns and output row.

Why ours and not only tinygemm (aten._weight_int4pack_mm): at batch 1 a decode step is a stream of matrix-vector
products, and tinygemm reaches about a quarter of the H200's bandwidth there (issue 17's probe: Llama-2-7B int4 decodes
1.63x bf16, where the bytes allow ~3.5x). `eval/bench_inference.py` runs both kernels in the same invocation.

Layout (made once, from the checkpoint's codes): `packed` is uint8 [K/2, N], byte p of column n holding the codes of
inputs 2p (low nibble) and 2p + 1 (high nibble) — so one load of a [BLOCK_K/2, BLOCK_N] tile is contiguous along N —
and `scales`, `zeros` are [K/group, N]. The kernel splits x into its even and odd columns and, within a group, takes
the scale out of the sum:

    Σ_k x_k (q_nk − z_n) s_n = s_n · (Σ_k x_k q_nk − z_n Σ_k x_k)

so a weight costs two integer ops and one conversion before the tensor cores see it (the dequantize-then-dot form
spends the CUDA cores' time that the memory stream needs at batch 1). Few rows (decode) split K across programs so
that every SM streams weights; partial sums go to a float32 [split, M, N] buffer whose sum is fused by
torch.compile into the next operation."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int4_matmul_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, out_ptr, M, N, K, stride_xm, M_BUCKET,
                        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pairs = tl.arange(0, BLOCK_K // 2)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    span = K // SPLIT_K
    for start in range(pid_k * span, (pid_k + 1) * span, BLOCK_K):
        x_row = x_ptr + rows[:, None] * stride_xm + start + 2 * pairs[None, :]
        x_even = tl.load(x_row, mask=row_ok[:, None], other=0.0)
        x_odd = tl.load(x_row + 1, mask=row_ok[:, None], other=0.0)
        byte = tl.load(packed_ptr + (start // 2 + pairs[:, None]) * N + cols[None, :], mask=col_ok[None, :], other=0)
        low = (byte & 0xF).to(x_even.dtype)
        high = (byte >> 4).to(x_even.dtype)
        codes_dot = tl.dot(x_even, low) + tl.dot(x_odd, high)  # Σ x q, exact integers times x, float32 sums
        x_sum = tl.sum(x_even.to(tl.float32), 1) + tl.sum(x_odd.to(tl.float32), 1)
        group = start // GROUP
        scale = tl.load(scale_ptr + group * N + cols, mask=col_ok, other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + group * N + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc += (codes_dot - x_sum[:, None] * zero[None, :]) * scale[None, :]
    out = out_ptr + pid_k * M * N + rows[:, None] * N + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


_TUNED = [triton.Config({}, num_warps=warps, num_stages=stages) for warps in (2, 4) for stages in (2, 3, 4)]
# decode: block sizes chosen below from the shape (they set the grid and the split), only warps and stages tuned
_few_rows = triton.autotune(configs=_TUNED, key=["N", "K", "BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K"])(
    _int4_matmul_kernel)
# prefill: tiles tuned too, no split
_many_rows = triton.autotune(
    configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
             for m, n, w, s in ((64, 128, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4), (64, 64, 4, 4))],
    key=["N", "K", "M_BUCKET"])(_int4_matmul_kernel)

FEW_ROWS = 16  # up to this many rows (tokens) a call is a decode step: one row tile, K split across programs
_SMS: dict[int, int] = {}


def _multiprocessors(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def _split(n_tiles: int, k_blocks: int, sms: int) -> int:
    """How many programs share one column tile's K: enough for two waves over the SMs, dividing K evenly."""
    want = max(1, -(-2 * sms // n_tiles))
    return max(d for d in range(1, k_blocks + 1) if k_blocks % d == 0 and d <= want)


@torch.library.triton_op("compress::int4_matmul", mutates_args=())
def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """x [M, K] (bf16 or fp16) times the packed int4 weight [K/2, N] → [M, N] in x's dtype."""
    x = x.contiguous()
    M, K = x.shape
    N = packed.shape[1]
    block_k = min(group_size, 128)
    if M <= FEW_ROWS:
        block_n = 64
        n_tiles = triton.cdiv(N, block_n)
        split = _split(n_tiles, K // block_k, _multiprocessors(x.device))
        out = torch.empty((split, M, N), device=x.device, dtype=torch.float32 if split > 1 else x.dtype)
        torch.library.wrap_triton(_few_rows)[(n_tiles, 1, split)](
            x, packed, scales, zeros, out, M, N, K, x.stride(0), 1, GROUP=group_size, BLOCK_M=16, BLOCK_N=block_n,
            BLOCK_K=block_k, SPLIT_K=split)
        return out[0] if split == 1 else out.sum(0).to(x.dtype)
    out = torch.empty((1, M, N), device=x.device, dtype=x.dtype)
    block_k = min(group_size, 64)

    def grid(meta):
        return triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]), 1

    torch.library.wrap_triton(_many_rows)[grid](
        x, packed, scales, zeros, out, M, N, K, x.stride(0), triton.next_power_of_2(M), GROUP=group_size,
        BLOCK_K=block_k, SPLIT_K=1)
    return out[0]


def pack_int4(unsigned_codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes in 0..15 → uint8 [K/2, N]: inputs 2p (low nibble) and 2p + 1 (high) of each output in byte p."""
    codes = unsigned_codes.to(torch.uint8)
    return (codes[:, 0::2] | codes[:, 1::2] << 4).T.contiguous()

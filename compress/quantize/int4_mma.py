"""Our int4 × bf16 kernel for a few rows (decode), on the tensor cores, and the dequantization that serves long inputs.

Why our own: the maintained kernels measured at the 7B shapes on an H200 (gemlite's GEMV, tinygemm) read their 4-bit
weights at about a third of the memory's rate at one row, which caps a W4 model's batch 1 far below what its bytes
allow (eval/results/tune_int4_h200.json). vLLM's Marlin, which reads near the memory's rate, is a C++ extension
built with vLLM; this is the same idea, small enough to compile at run time with NVRTC (`torch.cuda._compile_kernel`,
no CUDA toolkit build step): eval/bench_int4_mma.py measures it against gemlite and cuBLAS at every shape.

The idea (Marlin's, "swap AB" as TensorRT-LLM calls it for small batches): one `mma.m16n8k16` multiplies 16 output
rows of the weight (the A operand) by 8 rows of the input (the B operand), so a decode step's 1-8 rows waste at most
7/8 of a tensor-core instruction instead of 15/16, and nothing is dequantized outside registers. A code q in the low
4 bits of a bf16 whose bits are 0x4300 (128.0) is the number 128 + q exactly, so one bitwise op makes two A operands
of the codes; a second mma with the constant −(128 + z) on the same inputs takes the offset and the zero point back
out, so the tensor cores sum Σ (q − z)·x in float32 with no other arithmetic, and one multiply by the group's scale
per 64 inputs follows. The inputs' order inside each block of 64 is permuted (the same way in both operands, which
leaves the sum alone) so that a lane reads its 16 inputs as two 16-byte loads.

Layout (`pack`): the weight is stored so that each lane of a warp reads its A operand for the four 16-wide k tiles of
a block of 64 inputs as one 16-byte load, and a warp's 32 loads are 512 consecutive bytes. For 16 output rows
n0..n0+15 and 64 inputs k0..k0+63, lane (g = lane / 4, p = lane % 4) holds four words, one per k tile t; nibble
i + 4·e of word t is the code of row n0 + g + 8·(i % 2), input k0 + 16·p + 4·t + 2·(i // 2) + e: in the A fragment of
`mma.m16n8k16.row` (PTX ISA, "Matrix Fragments for mma.m16n8k16") it is register i, half e, whose fragment column
2·p + e + 8·(i // 2) stands for that input. Scales and zero points are stored [N/16, K/group, 16] so that one 32-byte
sector holds a tile's 16. The packed bytes are the checkpoint's: half a byte per weight.

Limits: outputs a multiple of 16, inputs of 64, groups a multiple of 64 (32 runs on gemlite); up to MAX_ROWS rows;
an NVIDIA GPU of compute capability 8.0 or newer (bf16 `mma.sync`)."""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import warnings
from pathlib import Path

import torch

MAX_ROWS = 64  # above this the runtime dequantizes (`dequantize`) and calls cuBLAS
# Above MAX_ROWS, the weight is dequantized this many output rows at a time, each slice multiplied as soon as it is
# written, so that it is read back from the L2 cache instead of memory (0: the whole weight at once). Measured by
# eval/bench_int4_mma.py's prefill rows; a GPU's table below may set it.
DEQUANTIZE_CHUNK = 0
# Launch settings measured per GPU by eval/bench_int4_mma.py (--table-out): {"settings": {"row tiles,out,in": setting},
# "dequantize_chunk": n}. The table whose file name is in the GPU's name is read, or the file TABLE_VARIABLE names.
TABLES = Path(__file__).parent / "int4_mma_configs"
TABLE_VARIABLE = "COMPRESS_INT4_MMA_TABLE"
# Programmatic dependent launch (Hopper and newer): "1" launches the matmul so that it starts while the kernel before it
# ends, pulling its codes into L2 meanwhile (up to PREFETCH_BLOCKS k blocks a warp); with TORCHINDUCTOR_ENABLE_PDL=1
# the compiled graph's own kernels do the same. Off: measured slower on an H100 (7B shape, W4 g128 decode 362.9 against
# 371.9 tok/s at batch 1, 3,824 against 4,104 at 16; eval/results/bench_inference_7b_h100_pdl.json).
PDL_VARIABLE = "COMPRESS_INT4_PDL"
PREFETCH_BLOCKS = 32
TILE_N, TILE_K, MIN_GROUP = 16, 64, 64
STATIC_SHARED_BYTES = 48 * 1024  # the most a kernel may declare without opting in to more

_COMMON = r"""
typedef unsigned short bf16_t;

__device__ __forceinline__ unsigned bf16x2_fma(unsigned a, unsigned b, unsigned c) {
    unsigned d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// 8 codes of `word` as 4 bf16 pairs (nibbles i and i + 4 of the word), each (q - z)·s, rounded once.
// neg_zero_a/b hold -(128 + z) twice (the bits 0xC300 | z), scale_a/b the scale twice, for rows g and g + 8.
__device__ __forceinline__ void dequantize_word(unsigned word, unsigned neg_zero_a, unsigned neg_zero_b,
                                                unsigned scale_a, unsigned scale_b, unsigned (&a)[4]) {
    const unsigned ONE2 = 0x3F803F80u, NEG_ZERO2 = 0x80008000u;
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        unsigned pair = ((word >> (4 * i)) & 0x000F000Fu) | 0x43004300u;   // 128 + q, two of them
        unsigned centred = bf16x2_fma(pair, ONE2, (i & 1) ? neg_zero_b : neg_zero_a);  // q - z, exact
        a[i] = bf16x2_fma(centred, (i & 1) ? scale_b : scale_a, NEG_ZERO2);
    }
}

__device__ __forceinline__ uint4 load_streaming(const uint4* pointer) {
    uint4 v;  // read once: keep it out of L1, where the input stays
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(pointer));
    return v;
}

__device__ __forceinline__ unsigned twice(unsigned short half) { return (unsigned)half * 0x00010001u; }

__device__ __forceinline__ float bf16_to_float(bf16_t v) { return __uint_as_float(((unsigned)v) << 16); }

__device__ __forceinline__ void mma_bf16(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ bf16_t to_bf16(float f) {  // round to nearest even (no NaN can arise here)
    unsigned u = __float_as_uint(f);
    return (bf16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
"""

_MATMUL = r"""
// y[M, N] = x[M, K] · w[N, K]ᵀ (+ bias) for M <= 8·MT. A block = 16 output rows; its SPLIT_K warps share K
// (warp w takes k blocks w, w + SPLIT_K, ...) and add their partial tiles in shared memory at the end.
// Per k block: the codes enter the tensor cores as 128 + q (no arithmetic), a second mma adds −(128 + z) times the
// same inputs, so the block's sum is Σ (q − z)·x exactly in float32, and one multiply by the group's scale follows.
// With ZERO_IN_ALU one bf16x2 fma per register makes q − z (exact) before a single mma instead: half the tensor-core
// work and a shorter chain of dependent mma, for more integer-unit work; which is faster is measured per shape.
//
// Loads (PIPELINE): 0, a round of UNROLL k blocks is loaded into registers, then multiplied; 1, the next round's
// loads are issued into a second set of registers before this round's arithmetic; 2 or more, a ring of PIPELINE
// rounds in shared memory filled by cp.async (each lane copies the bytes it will read, and two lanes the group's
// scales), PIPELINE − 1 rounds ahead: loads in flight without registers to hold them, which cap the warps a
// multiprocessor keeps (ncu: 60 registers, 50 % occupancy, a third of the stalls on loads).

// One k block's product into acc: w is this lane's 16-byte word of the block's codes, s_a/s_b and z_a/z_b the scales
// and zero points of rows g and g + 8, x_low/x_high this lane's inputs (16p .. 16p+15 of the block, per 8-row tile).
__device__ __forceinline__ void block_product(float (&acc)[MT][4], uint4 w, unsigned short s_a, unsigned short s_b,
                                              unsigned char z_a, unsigned char z_b, const uint4 (&x_low)[MT],
                                              const uint4 (&x_high)[MT]) {
    const unsigned neg_zero_a = ASYMMETRIC ? twice(0xC300u | z_a) : 0xC308C308u;
    const unsigned neg_zero_b = ASYMMETRIC ? twice(0xC300u | z_b) : 0xC308C308u;
    const unsigned neg_zero[4] = {neg_zero_a, neg_zero_b, neg_zero_a, neg_zero_b};  // rows g, g+8, g, g+8
    float block[MT][4];
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        #pragma unroll
        for (int r = 0; r < 4; ++r) block[mt][r] = 0.f;
    const unsigned word[4] = {w.x, w.y, w.z, w.w};
    #pragma unroll
    for (int t = 0; t < 4; ++t) {
        unsigned a[4];
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
            a[i] = ((word[t] >> (4 * i)) & 0x000F000Fu) | 0x43004300u;  // 128 + q
            if (ZERO_IN_ALU) a[i] = bf16x2_fma(a[i], 0x3F803F80u, neg_zero[i]);  // q - z, exact
        }
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const uint4 inputs = t < 2 ? x_low[mt] : x_high[mt];
            const unsigned b0 = (t & 1) ? inputs.z : inputs.x, b1 = (t & 1) ? inputs.w : inputs.y;
            mma_bf16(block[mt], a, b0, b1);
            if (!ZERO_IN_ALU) mma_bf16(block[mt], neg_zero, b0, b1);
        }
    }
    const float scale_a = bf16_to_float(s_a), scale_b = bf16_to_float(s_b);
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt) {   // C fragment: registers 0, 1 are row g, 2, 3 row g + 8
        acc[mt][0] = fmaf(scale_a, block[mt][0], acc[mt][0]);
        acc[mt][1] = fmaf(scale_a, block[mt][1], acc[mt][1]);
        acc[mt][2] = fmaf(scale_b, block[mt][2], acc[mt][2]);
        acc[mt][3] = fmaf(scale_b, block[mt][3], acc[mt][3]);
    }
}

__device__ __forceinline__ void cp_async16(void* shared, const void* global, bool keep_in_l1, bool valid) {
    const unsigned at = (unsigned)__cvta_generic_to_shared(shared);
    const int bytes = valid ? 16 : 0;  // 0: the 16 bytes are filled with zeros
    if (keep_in_l1) asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;" :: "r"(at), "l"(global), "r"(bytes));
    else asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(at), "l"(global), "r"(bytes));
}

extern "C" __global__ void __launch_bounds__(SPLIT_K * 32, MIN_BLOCKS)
int4_mma(const uint4* __restrict__ words, const bf16_t* __restrict__ scales, const unsigned char* __restrict__ zeros,
         const bf16_t* __restrict__ bias, const bf16_t* __restrict__ x, bf16_t* __restrict__ y,
         int M, int N, int K, int group) {
    __shared__ float partial[SPLIT_K][MT * 4 * 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, p = lane & 3;
    const int tile = blockIdx.x, k_blocks = K / 64, groups = K / group, blocks_per_group = group / 64;
    const uint4* tile_words = words + (size_t)tile * k_blocks * 32 + lane;
    const bf16_t* tile_scales = scales + (size_t)tile * groups * 16;
    const unsigned char* tile_zeros = zeros + (size_t)tile * groups * 16;
    float acc[MT][4];
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        #pragma unroll
        for (int r = 0; r < 4; ++r) acc[mt][r] = 0.f;
#if PDL
    // Programmatic dependent launch: this grid may start while the kernel before it (which computes x, and may read
    // the buffer y will be) still runs. The codes depend on nothing, so until then each warp pulls its k blocks into
    // L2, up to PREFETCH_BLOCKS of them (a lane one 128-byte line: 8 k blocks a pass; at the 7B shapes that is the
    // block's whole tile), then waits for that kernel to complete; x is read and y written only after the wait.
    for (int i = lane >> 2; i < PREFETCH_BLOCKS; i += 8) {
        const int kb = warp + i * SPLIT_K;
        const uint4* line = words + ((size_t)tile * k_blocks + kb) * 32 + (lane & 3) * 8;
        if (kb < k_blocks) asm volatile("prefetch.global.L2 [%0];" :: "l"(line));
    }
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif

#if PIPELINE >= 2
    // The ring: per warp, PIPELINE rounds of UNROLL k blocks, each its words (a lane's 16 bytes), its group's 16
    // scales (32 bytes) and zero points (16 bytes) and, for one 8-row tile, this lane's inputs (2 × 16 bytes). More
    // tiles' inputs would take the shared memory that lets 8 warps a block run ahead; they are read with __ldg at the
    // start of their round (from L1 or L2: every block reads the same inputs), before the wait for the ring.
#define INPUTS_IN_RING (MT == 1)
    __shared__ uint4 ring_words[SPLIT_K][PIPELINE][UNROLL][32];
    __shared__ uint4 ring_scales[SPLIT_K][PIPELINE][UNROLL][ASYMMETRIC ? 3 : 2];
    __shared__ uint4 ring_x[SPLIT_K][PIPELINE][UNROLL][INPUTS_IN_RING ? MT : 1][2][INPUTS_IN_RING ? 32 : 1];
    const int rounds = warp < k_blocks ? ((k_blocks - warp + SPLIT_K - 1) / SPLIT_K + UNROLL - 1) / UNROLL : 0;
    auto issue = [&](int round) {  // every lane commits a group, empty past the end, so the counts stay aligned
        const int slot = round % PIPELINE;
        #pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int kb = warp + (round * UNROLL + u) * SPLIT_K;
            if (kb < k_blocks) {  // past the last round every kb is too
                cp_async16(&ring_words[warp][slot][u][lane], tile_words + (size_t)kb * 32, false, true);
                const int at = (kb / blocks_per_group) * 16;
                if (lane < 2) cp_async16(&ring_scales[warp][slot][u][lane], tile_scales + at + 8 * lane, false, true);
                if (ASYMMETRIC && lane == 2) cp_async16(&ring_scales[warp][slot][u][2], tile_zeros + at, false, true);
                if (INPUTS_IN_RING) {
                    const bf16_t* row = x + (size_t)(g < M ? g : 0) * K + kb * 64 + 16 * p;
                    cp_async16(&ring_x[warp][slot][u][0][0][lane], row, true, g < M);
                    cp_async16(&ring_x[warp][slot][u][0][1][lane], row + 8, true, g < M);
                }
            }
        }
        asm volatile("cp.async.commit_group;\n" ::);
    };
    #pragma unroll
    for (int round = 0; round < PIPELINE - 1; ++round) issue(round);
    for (int round = 0; round < rounds; ++round) {
        issue(round + PIPELINE - 1);  // into the slot the last round read (every lane is past it: __syncwarp below)
        uint4 x_low[UNROLL][MT], x_high[UNROLL][MT];
        #pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int kb = warp + (round * UNROLL + u) * SPLIT_K;
            #pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const int m = mt * 8 + g;
                x_low[u][mt] = make_uint4(0u, 0u, 0u, 0u);
                x_high[u][mt] = x_low[u][mt];
                if (!INPUTS_IN_RING && kb < k_blocks && m < M) {
                    const uint4* row = reinterpret_cast<const uint4*>(x + (size_t)m * K + kb * 64 + 16 * p);
                    x_low[u][mt] = __ldg(row);
                    x_high[u][mt] = __ldg(row + 1);
                }
            }
        }
        asm volatile("cp.async.wait_group %0;\n" :: "n"(PIPELINE - 1));
        __syncwarp();  // the scales two lanes copied are visible to the warp
        const int slot = round % PIPELINE;
        #pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (warp + (round * UNROLL + u) * SPLIT_K >= k_blocks) break;
            const bf16_t* s = reinterpret_cast<const bf16_t*>(&ring_scales[warp][slot][u][0]);
            const unsigned char* z = reinterpret_cast<const unsigned char*>(&ring_scales[warp][slot][u][2]);
            if (INPUTS_IN_RING) {
                x_low[u][0] = ring_x[warp][slot][u][0][0][lane];
                x_high[u][0] = ring_x[warp][slot][u][0][1][lane];
            }
            block_product(acc, ring_words[warp][slot][u][lane], s[g], s[g + 8], ASYMMETRIC ? z[g] : 0,
                          ASYMMETRIC ? z[g + 8] : 0, x_low[u], x_high[u]);
        }
        __syncwarp();
    }
#else
    // One round: UNROLL k blocks of this warp, every load first, then the arithmetic. With PIPELINE the next round's
    // loads are issued before this round's arithmetic (two rounds of registers), so a warp never waits on memory with
    // nothing of its own in flight.
    uint4 w[UNROLL];
    unsigned short s_a[UNROLL], s_b[UNROLL];
    unsigned char z_a[UNROLL], z_b[UNROLL];
#define LOAD_ROUND(FIRST, W, SA, SB, ZA, ZB)                                                   \
    _Pragma("unroll") for (int u = 0; u < UNROLL; ++u) {                                     \
        const int kb = (FIRST) + u * SPLIT_K;                                                 \
        if (kb < k_blocks) {                                                                  \
            W[u] = load_streaming(tile_words + (size_t)kb * 32);                              \
            const int at = (kb / blocks_per_group) * 16 + g;                                  \
            SA[u] = tile_scales[at];                                                          \
            SB[u] = tile_scales[at + 8];                                                      \
            if (ASYMMETRIC) { ZA[u] = tile_zeros[at]; ZB[u] = tile_zeros[at + 8]; }           \
        }                                                                                     \
    }
#if PIPELINE
    LOAD_ROUND(warp, w, s_a, s_b, z_a, z_b)
#endif
    for (int first = warp; first < k_blocks; first += SPLIT_K * UNROLL) {
#if PIPELINE
        uint4 w_next[UNROLL];
        unsigned short s_a_next[UNROLL], s_b_next[UNROLL];
        unsigned char z_a_next[UNROLL], z_b_next[UNROLL];
        LOAD_ROUND(first + SPLIT_K * UNROLL, w_next, s_a_next, s_b_next, z_a_next, z_b_next)
#else
        LOAD_ROUND(first, w, s_a, s_b, z_a, z_b)
#endif
        #pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int kb = first + u * SPLIT_K;
            if (kb >= k_blocks) break;
            // B operand: lane p holds inputs 16p .. 16p+15 of the k block for input row g (k order permuted to match)
            uint4 x_low[MT], x_high[MT];
            #pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const int m = mt * 8 + g;
                x_low[mt] = make_uint4(0u, 0u, 0u, 0u);
                x_high[mt] = x_low[mt];
                if (m < M) {
                    const uint4* row = reinterpret_cast<const uint4*>(x + (size_t)m * K + kb * 64 + 16 * p);
                    x_low[mt] = __ldg(row);
                    x_high[mt] = __ldg(row + 1);
                }
            }
            block_product(acc, w[u], s_a[u], s_b[u], ASYMMETRIC ? z_a[u] : 0, ASYMMETRIC ? z_b[u] : 0, x_low,
                          x_high);
        }
#if PIPELINE
        #pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            w[u] = w_next[u]; s_a[u] = s_a_next[u]; s_b[u] = s_b_next[u];
            if (ASYMMETRIC) { z_a[u] = z_a_next[u]; z_b[u] = z_b_next[u]; }
        }
#endif
    }
#undef LOAD_ROUND
#endif
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        #pragma unroll
        for (int r = 0; r < 4; ++r) partial[warp][(mt * 4 + r) * 32 + lane] = acc[mt][r];
    __syncthreads();
#if PDL
    // every load of this block is done: the next kernel may be scheduled (its own wait still holds its reads of y
    // until this grid completes). After the wait above, so its start also implies the kernels before this one ended.
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
    for (int e = threadIdx.x; e < MT * 128; e += SPLIT_K * 32) {
        float sum = 0.f;
        #pragma unroll
        for (int v = 0; v < SPLIT_K; ++v) sum += partial[v][e];
        // C fragment: register r of lane l is output row g + 8·(r / 2), input row 2·p + r % 2 of its 8-row tile
        const int l = e & 31, r = (e >> 5) & 3, mt = e >> 7;
        const int n = tile * 16 + (l >> 2) + ((r & 2) ? 8 : 0);
        const int m = mt * 8 + 2 * (l & 3) + (r & 1);
        if (m < M) {
            if (HAS_BIAS) sum += bf16_to_float(bias[n]);
            y[(size_t)m * N + n] = to_bf16(sum);
        }
    }
}
"""

_DEQUANTIZE = r"""
// w[N, K] in bf16 from the packed layout, (q − z)·s rounded once: one thread per 16-byte word group, which holds
// inputs 16p .. 16p+15 of a k block for rows g and g + 8, 32 bytes of each row. Stored directly (LINES 0), each of
// a warp's four stores writes half of every 32-byte sector it touches (the other half by the next store); with
// LINES, the four lanes of a row first trade halves (to_lines), so that each store writes 64 contiguous bytes of 8
// rows, whole sectors. Threads come in whole warps (the count is a multiple of 32), so a warp returns whole and its
// shuffles see every lane.
__device__ __forceinline__ void to_lines(const unsigned (&row)[8], int r, unsigned (&first)[4],
                                         unsigned (&second)[4]) {
    // lane r of a row's four holds its outputs 16r .. 16r+15, halves row[0..3] and row[4..7]; lane r = 2q + h must
    // store outputs 8r .. 8r+7 (lane q's half h) and 32 + 8r .. (lane 2 + q's half h). Round 1: lanes 0, 1 offer
    // half 0 and lanes 2, 3 half 1; round 2 the other halves; so each lane gets both of its pieces in two rounds.
    const int q = r >> 1, h = r & 1, base = (threadIdx.x & 31) & ~3;
    #pragma unroll
    for (int j = 0; j < 4; ++j) {
        const unsigned offer1 = r < 2 ? row[j] : row[4 + j], offer2 = r < 2 ? row[4 + j] : row[j];
        const unsigned got1 = __shfl_sync(0xFFFFFFFFu, offer1, base + (h == 0 ? q : 2 + q));
        const unsigned got2 = __shfl_sync(0xFFFFFFFFu, offer2, base + (h == 1 ? q : 2 + q));
        first[j] = h == 0 ? got1 : got2;
        second[j] = h == 0 ? got2 : got1;
    }
}

extern "C" __global__ void int4_dequantize(const uint4* __restrict__ words, const bf16_t* __restrict__ scales,
                                           const unsigned char* __restrict__ zeros, uint4* __restrict__ out,
                                           int N, int K, int group) {
    const long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int k_blocks = K / 64, groups = K / group;
    if (index >= (long long)(N / 16) * k_blocks * 32) return;
    const int lane = index & 31, g = lane >> 2, p = lane & 3;
    const int block = (int)(index >> 5);  // < N·K / 2048: 32-bit division
    const int tile = block / k_blocks, kb = block % k_blocks;
    const int at = tile * groups * 16 + (kb / (group / 64)) * 16 + g;
    const unsigned scale_a = twice(scales[at]), scale_b = twice(scales[at + 8]);
    const unsigned neg_zero_a = ASYMMETRIC ? twice(0xC300u | zeros[at]) : 0xC308C308u;
    const unsigned neg_zero_b = ASYMMETRIC ? twice(0xC300u | zeros[at + 8]) : 0xC308C308u;
    const uint4 w = words[index];
    const unsigned word[4] = {w.x, w.y, w.z, w.w};
    unsigned row_a[8], row_b[8];   // inputs 16p + 4t + 2j, +1 at [2t + j]
    #pragma unroll
    for (int t = 0; t < 4; ++t) {
        unsigned a[4];
        dequantize_word(word[t], neg_zero_a, neg_zero_b, scale_a, scale_b, a);
        row_a[2 * t] = a[0]; row_b[2 * t] = a[1]; row_a[2 * t + 1] = a[2]; row_b[2 * t + 1] = a[3];
    }
#if LINES
    unsigned first_a[4], second_a[4], first_b[4], second_b[4];
    to_lines(row_a, p, first_a, second_a);
    to_lines(row_b, p, first_b, second_b);
    const size_t line_a = ((size_t)(tile * 16 + g) * K + kb * 64) / 8 + p, line_b = line_a + (size_t)K;  // +8 rows
    out[line_a] = make_uint4(first_a[0], first_a[1], first_a[2], first_a[3]);
    out[line_a + 4] = make_uint4(second_a[0], second_a[1], second_a[2], second_a[3]);
    out[line_b] = make_uint4(first_b[0], first_b[1], first_b[2], first_b[3]);
    out[line_b + 4] = make_uint4(second_b[0], second_b[1], second_b[2], second_b[3]);
#else
    const size_t at_a = ((size_t)(tile * 16 + g) * K + kb * 64 + 16 * p) / 8, at_b = at_a + (size_t)K;  // +8 rows
    out[at_a] = make_uint4(row_a[0], row_a[1], row_a[2], row_a[3]);
    out[at_a + 1] = make_uint4(row_a[4], row_a[5], row_a[6], row_a[7]);
    out[at_b] = make_uint4(row_b[0], row_b[1], row_b[2], row_b[3]);
    out[at_b + 1] = make_uint4(row_b[4], row_b[5], row_b[6], row_b[7]);
#endif
}
"""


def supports(in_features: int, out_features: int, group_size: int) -> bool:
    """Whether the layout can hold this Linear (see the module's limits)."""
    return (out_features % TILE_N == 0 and in_features % TILE_K == 0 and group_size % MIN_GROUP == 0
            and in_features % group_size == 0)


def pack(unsigned: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
         tiles_per_slice: int = 256) -> dict[str, torch.Tensor]:
    """The kernel's tensors from unsigned codes q [N, K] in [0, 15], scales [N, K/group] and the unsigned zero points
    z + 8 [N, K/group] (None: symmetric, z + 8 = 8): words [N/16, K/64, 32, 4] int32, scales and zeros
    [N/16, K/group, 16] (bf16, uint8). Tiles are independent, so `tiles_per_slice` tiles (16 rows each) are reordered
    at a time into the words: the reordering's temporaries (2 bytes a weight) stay a slice's, not a fused gate/up's,
    which would be the largest temporaries of a packed load."""
    n, k = unsigned.shape
    words = torch.empty(n // 16, k // 64, 32, 4, dtype=torch.int32, device=unsigned.device)
    for first in range(0, n // 16, tiles_per_slice):
        rows = unsigned[first * 16:(first + tiles_per_slice) * 16].to(torch.uint8)
        tiles = rows.shape[0] // 16
        # rows (tile, i % 2, g) x inputs (k block, p, t, i // 2, e) -> word (tile, k block, g, p, t), nibble i + 4·e
        codes = rows.view(tiles, 2, 8, k // 64, 4, 4, 2, 2)
        nibbles = codes.permute(0, 3, 2, 4, 5, 7, 6, 1).reshape(tiles, k // 64, 32, 4, 8)
        # nibble j of a word is bits 4j..4j+3: bytes (j even | j odd << 4), four little-endian bytes to an int32 (the
        # GPU's and the host's order), so packing holds 1.5 bytes a weight, not the 24 of int64 shifts and sums
        packed_bytes = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
        words[first:first + tiles] = packed_bytes.contiguous().view(torch.int32).squeeze(-1)

    def by_tile(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return values.to(dtype).reshape(n // 16, 16, -1).transpose(1, 2).contiguous()

    zeros = None if zero is None else by_tile(zero, torch.uint8)
    return {"words": words.contiguous(), "scales": by_tile(scale, torch.bfloat16), "zeros": zeros}


def unpack_codes(words: torch.Tensor) -> torch.Tensor:
    """The unsigned codes [N, K] of a packed weight (the inverse of `pack`'s reordering; for checks and the CPU)."""
    tiles, k_blocks = words.shape[:2]
    shifts = torch.arange(0, 32, 4, device=words.device)
    nibbles = (words.to(torch.int64)[..., None] >> shifts) & 15  # (tile, kb, g, p, t), nibble i + 4·e
    nibbles = nibbles.view(tiles, k_blocks, 8, 4, 4, 2, 2, 2)     # ..., p, t, e, i // 2, i % 2
    codes = nibbles.permute(0, 7, 2, 1, 3, 4, 6, 5)               # tile, i % 2, g, kb, p, t, i // 2, e
    return codes.reshape(tiles * 16, k_blocks * 64).to(torch.uint8)


def kernel_source(name: str, row_tiles: int, setting: tuple[int, int, bool, int, int], asymmetric: bool,
                  bias: bool, dependent: bool = False, lines: bool = False) -> str:
    """The CUDA source of kernel `name` ("int4_mma" or "int4_dequantize") for one launch setting; `dependent`: built
    for programmatic dependent launch (`launch_dependent`; compute capability 9.0 and newer); `lines`: the
    dequantization's stores as whole sectors (see _DEQUANTIZE)."""
    split_k, unroll, zero_in_alu, pipeline, warps_per_sm = setting
    defines = (f"#define MT {row_tiles}\n#define SPLIT_K {split_k}\n#define UNROLL {unroll}\n"
               f"#define MIN_BLOCKS {max(1, warps_per_sm // split_k)}\n"
               f"#define ZERO_IN_ALU {int(zero_in_alu)}\n#define PIPELINE {int(pipeline)}\n"
               f"#define ASYMMETRIC {int(asymmetric)}\n#define HAS_BIAS {int(bias)}\n"
               f"#define PDL {int(dependent)}\n#define PREFETCH_BLOCKS {PREFETCH_BLOCKS}\n#define LINES {int(lines)}\n")
    return defines + _COMMON + (_MATMUL if name == "int4_mma" else _DEQUANTIZE)


@functools.lru_cache(maxsize=None)
def _kernel(name: str, row_tiles: int, setting: tuple[int, int, bool, int, int], asymmetric: bool, bias: bool,
            device: int, dependent: bool = False, lines: bool = False):
    source = kernel_source(name, row_tiles, setting, asymmetric, bias, dependent, lines)
    with torch.cuda.device(device):
        major, minor = torch.cuda.get_device_capability(device)
        # torch.cuda._compile_kernel: PyTorch's NVRTC wrapper (private, present since 2.8): no toolkit build step
        return torch.cuda._compile_kernel(source, name, compute_capability=f"{major}{minor}",
                                          nvcc_options=["-std=c++17"])


def available(device: torch.device) -> str | None:
    """None where the kernel runs on `device`, else why not (compiles it once to find out)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "not a CUDA device"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "bf16 mma needs compute capability 8.0"
    if not hasattr(torch.cuda, "_compile_kernel"):
        return f"torch {torch.__version__} has no torch.cuda._compile_kernel (2.8 or newer)"
    try:
        _kernel("int4_mma", 1, (8, 2, False, 0, 0), False, False, device.index or 0)
    except Exception as error:  # noqa: BLE001 -- NVRTC missing or refusing: the caller falls back to another kernel
        return f"NVRTC could not build the kernel ({type(error).__name__}: {str(error)[:160]})"
    return None


@functools.cache
def tuned_table() -> dict:
    """This GPU's measured settings (see TABLES), or {} where none was measured."""
    path = os.environ.get(TABLE_VARIABLE)
    if not path and torch.cuda.is_available():
        device = torch.cuda.get_device_name().lower().replace(" ", "_")
        path = next((str(t) for t in sorted(TABLES.glob("*.json")) if t.stem in device), None)
    return json.loads(Path(path).read_text()) if path else {}


def dequantize_chunk(device: torch.device) -> int:
    return tuned_table().get("dequantize_chunk", DEQUANTIZE_CHUNK) if device.type == "cuda" else 0


def settings_for(row_tiles: int, out_features: int, in_features: int | None = None
                 ) -> tuple[int, int, bool, int, int]:
    """Warps sharing K in a block, k blocks each warp loads in a round, whether the zero point is taken out in the
    integer units (else by a second mma), how loads run ahead of the arithmetic (PIPELINE in the kernel), and the
    warps per multiprocessor asked of the register allocator (0: its own choice): more warps where there are few
    blocks (16 rows each). A table measured on this GPU (`tuned_table`) comes first; without one, the fastest
    measured by eval/bench_int4_mma.py on an H200 at the 7B shapes (eval/results/bench_int4_mma_h200_v2.json; up to 16
    rows with the zero point in the integer units, bench_int4_mma_alu_h200.json); any setting computes the same result.
    The warps' partial tiles (SPLIT_K x MT x 512 bytes of shared memory) must fit the 48 KB a kernel may declare
    statically, which caps the warps at 8 for 33-64 rows.

    Up to 16 rows the rule asks for 32 warps a multiprocessor, at most 64 registers a thread: the budget the kernel
    had when it was timed (no __launch_bounds__ then, so ptxas assumed 1,024 threads a block). Without it ptxas takes
    66-72 registers in four of the rule's eight settings at 1 and 16 rows, sym and asym, which leaves 16 or 24 warps
    resident instead of 32 (eval/ptxas_int4_mma.py, NVRTC for sm_90; no spills either way). Above 16 rows the same
    cap spills 400-900 bytes a thread, so there ptxas chooses."""
    tuned = tuned_table().get("settings", {}).get(f"{row_tiles},{out_features},{in_features}")
    if tuned is not None:
        return tuple(tuned)
    few_blocks = out_features <= 8192
    if row_tiles == 1:
        split_k, unroll = (16, 1) if few_blocks else (8, 4)
    elif row_tiles == 2:
        split_k, unroll = (16, 2) if few_blocks else (8, 2)
    else:
        split_k, unroll = (8, 4) if few_blocks else (8, 1) if out_features <= 16384 else (4, 2)
    decode = row_tiles <= 2
    return min(split_k, max_split_k(row_tiles)), unroll, decode, 0, 32 if decode else 0


def shared_bytes(row_tiles: int, setting: tuple[int, int, bool, int, int], asymmetric: bool) -> int:
    """Static shared memory the matmul declares: the warps' partial tiles, and with PIPELINE >= 2 the ring (per warp,
    round and k block: 512 bytes of words, 32 of scales (+16 of zero points), and 1,024 of inputs for one 8-row tile;
    with more tiles the inputs are not in the ring and ptxas drops its array)."""
    split_k, unroll, _, pipeline, _ = setting
    ring = 0 if pipeline < 2 else split_k * pipeline * unroll * (512 + 16 * (3 if asymmetric else 2)
                                                                 + (1024 if row_tiles == 1 else 0))
    return split_k * row_tiles * 4 * 32 * 4 + ring


def max_split_k(row_tiles: int) -> int:
    """The most warps whose partial tiles fit in 48 KB of static shared memory, a power of two."""
    fits = STATIC_SHARED_BYTES // (row_tiles * 4 * 32 * 4)
    return 1 << (fits.bit_length() - 1)


def _row_tiles(rows: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, -(-rows // 8)))))


def launch(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
           bias: torch.Tensor | None, group: int, out: torch.Tensor,
           settings: tuple[int, int, bool, int, int] | None = None) -> None:
    """out[M, N] = x[M, K] · wᵀ (+ bias), all bf16 and contiguous (x 16-byte aligned), M <= MAX_ROWS."""
    rows, k = x.shape
    n = words.shape[0] * TILE_N
    row_tiles = _row_tiles(rows)
    setting = settings or settings_for(row_tiles, n, k)
    split_k = setting[0]
    if (shared := shared_bytes(row_tiles, setting, zeros is not None)) > STATIC_SHARED_BYTES:
        raise ValueError(f"int4_mma setting {setting} needs {shared} bytes of shared memory for {rows} rows; at most "
                         f"{STATIC_SHARED_BYTES} may be declared statically")
    dependent = dependent_launch(x.device)
    kernel = _kernel("int4_mma", row_tiles, setting, zeros is not None, bias is not None, x.device.index or 0,
                     dependent)
    # unused pointers still take a device address: the launcher passes Python ints as 4-byte C ints
    args = [words, scales, scales if zeros is None else zeros, scales if bias is None else bias, x, out, rows, n, k,
            group]
    if dependent:
        launch_dependent(kernel, (n // TILE_N, 1, 1), (split_k * 32, 1, 1), args)
    else:
        kernel(grid=(n // TILE_N, 1, 1), block=(split_k * 32, 1, 1), args=args)


@functools.cache
def dependent_launch(device: torch.device) -> bool:
    """Whether the matmul is launched for programmatic dependent launch: asked for by PDL_VARIABLE (1), on compute
    capability 9.0 and newer, with a driver that keeps it in CUDA graphs (12.3; else one warning, plain launches)."""
    if os.environ.get(PDL_VARIABLE, "0") != "1" or torch.cuda.get_device_capability(device) < (9, 0):
        return False
    version = ctypes.c_int(0)
    if _driver().cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value < 12030:
        warnings.warn(f"{PDL_VARIABLE}=1 needs CUDA driver 12.3 or newer (this one: {version.value}): the int4 matmul "
                      f"is launched plainly", stacklevel=2)
        return False
    return True


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an id, then a 64-byte union aligned to 8 bytes
    _fields_ = [("id", ctypes.c_int), ("_pad", ctypes.c_int), ("value", ctypes.c_int), ("_rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_bytes", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attributes", ctypes.POINTER(_LaunchAttribute)),
                ("attribute_count", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


@functools.cache
def _driver() -> ctypes.CDLL:
    driver = ctypes.CDLL("libcuda.so.1")  # the driver PyTorch's CUDA context lives in
    driver.cuLaunchKernelEx.restype = ctypes.c_int
    driver.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p,
                                        ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
    return driver


def launch_dependent(kernel, grid: tuple[int, int, int], block: tuple[int, int, int], args: list) -> None:
    """Launch `kernel` (torch.cuda._compile_kernel's, built with dependent=True) on the current stream so that it may
    start before the kernel ahead of it ends (cuLaunchKernelEx with programmatic stream serialization, which a CUDA
    graph keeps as a programmatic edge). PyTorch's launcher takes no launch attributes, hence this one; its argument
    handling is PyTorch's: tensors as device pointers, ints as 4-byte C ints."""
    values = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(a) for a in args]
    pointers = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
    attribute = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
    config = _LaunchConfig(grid=(ctypes.c_uint * 3)(*grid), block=(ctypes.c_uint * 3)(*block), shared_bytes=0,
                           stream=torch.cuda.current_stream().cuda_stream, attributes=ctypes.pointer(attribute),
                           attribute_count=1)
    status = _driver().cuLaunchKernelEx(ctypes.byref(config), kernel.func, pointers, None)
    if status != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUDA driver error {status}")


# The dequantization's stores as whole sectors (LINES in _DEQUANTIZE) unless this is "0" (the direct stores, half
# sectors). Measured on an H100, two invocations, 7B shape, 2048-token prefill (eval/results/bench_prefill_lines_h100
# .json and _run2.json): W4 g128 68.36 -> 66.82 ms and 68.30 -> 67.67 ms against bf16's 61.98 and 61.59; the direct
# form ran at ~2.1-2.2 TB/s (eval/results/bench_int4_mma_h100_sweep.json's prefill rows).
DEQUANTIZE_LINES_VARIABLE = "COMPRESS_INT4_DEQUANTIZE_LINES"


def dequantize(words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group: int,
               lines: bool | None = None) -> torch.Tensor:
    """The [N, K] bf16 weight, computed as the matmul computes it (for long inputs: dequantize, then cuBLAS); on the
    CPU in PyTorch, for checks. `lines`: the kernel's store form (None: as COMPRESS_INT4_DEQUANTIZE_LINES says)."""
    n, k = words.shape[0] * TILE_N, words.shape[1] * TILE_K
    if not words.is_cuda:
        def by_row(values: torch.Tensor) -> torch.Tensor:  # [N/16, K/group, 16] -> [N, K]
            return values.transpose(1, 2).reshape(n, -1).float().repeat_interleave(group, 1)

        centred = unpack_codes(words).float() - (8 if zeros is None else by_row(zeros))
        return (centred * by_row(scales)).to(torch.bfloat16)  # (q − z) is exact, so one rounding, as the kernel
    out = torch.empty(n, k, dtype=torch.bfloat16, device=words.device)
    kernel = _kernel("int4_dequantize", 1, (1, 1, False, 0, 0), zeros is not None, False,
                     words.device.index or 0,
                     lines=os.environ.get(DEQUANTIZE_LINES_VARIABLE) != "0" if lines is None else lines)
    threads = words.numel() // 4
    kernel(grid=(-(-threads // 256), 1, 1), block=(256, 1, 1),
           args=[words, scales, scales if zeros is None else zeros, out, n, k, group])
    return out


def dequantized_matmul(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                       bias: torch.Tensor | None, group: int, chunk: int = 0) -> torch.Tensor:
    """x · wᵀ (+ bias) for long inputs: the weight dequantized, then cuBLAS; with `chunk`, `chunk` output rows of the
    weight at a time (a slice of the packed tensors is the slice of the weight: they are stored tile by tile), each
    multiplied into its columns of the output while it is still in the L2 cache."""
    n = words.shape[0] * TILE_N
    if not chunk or chunk >= n:
        weight = dequantize(words, scales, zeros, group)
        return x @ weight.T if bias is None else torch.addmm(bias, x, weight.T)
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    tiles = max(1, chunk // TILE_N)
    for first in range(0, words.shape[0], tiles):
        last = min(first + tiles, words.shape[0])
        part = dequantize(words[first:last], scales[first:last], None if zeros is None else zeros[first:last], group)
        columns = out[:, first * TILE_N:last * TILE_N]
        if bias is None:
            torch.mm(x, part.T, out=columns)
        else:
            torch.addmm(bias[first * TILE_N:last * TILE_N], x, part.T, out=columns)
    return out


@torch.library.custom_op("compress::int4_mma", mutates_args=())
def int4_mma(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
             bias: torch.Tensor | None, group: int) -> torch.Tensor:
    """x [M, K] bf16 times the packed weight: the few-row kernel up to MAX_ROWS rows, else dequantize + cuBLAS."""
    if x.shape[0] > MAX_ROWS or not x.is_cuda:
        return dequantized_matmul(x, words, scales, zeros, bias, group, dequantize_chunk(x.device))
    if not x.is_contiguous() or x.data_ptr() % 16:  # the kernel reads inputs 16 bytes at a time
        x = x.clone(memory_format=torch.contiguous_format)
    out = torch.empty(x.shape[0], words.shape[0] * TILE_N, dtype=torch.bfloat16, device=x.device)
    launch(x, words, scales, zeros, bias, group, out)
    return out


@int4_mma.register_fake
def _(x, words, scales, zeros, bias, group):
    return x.new_empty(x.shape[0], words.shape[0] * TILE_N)

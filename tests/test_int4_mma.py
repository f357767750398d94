"""The int4 tensor-core kernel's layout and arithmetic (compress.quantize.int4_mma). On the CPU: the packed words read
back as the kernel reads them, register by register, land where PTX's fragment table for mma.m16n8k16 puts them, and
the bf16 bit tricks give the numbers claimed. On a GPU: the kernel against the dequantized weight in float32."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest
import torch

from compress.quantize import int4_mma


def _grid(n: int, k: int, group: int, asymmetric: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    unsigned = torch.randint(0, 16, (n, k), generator=generator, dtype=torch.uint8)
    scale = (torch.rand(n, k // group, generator=generator) + 0.05).to(torch.bfloat16)
    zero = torch.randint(0, 16, (n, k // group), generator=generator) if asymmetric else None
    return unsigned, scale, zero


def _reference_weight(unsigned, scale, zero, group: int) -> torch.Tensor:
    """w = (q − z)·s (z = 8 when symmetric), rounded once to bf16, as the checkpoint defines it."""
    zero_points = torch.full_like(scale, 8, dtype=torch.int64) if zero is None else zero
    centred = unsigned.long() - zero_points.long().repeat_interleave(group, 1)
    return (centred.float() * scale.float().repeat_interleave(group, 1)).to(torch.bfloat16)


def _bf16(bits: int) -> float:
    return torch.tensor([bits], dtype=torch.int32).to(torch.int16).view(torch.bfloat16).item()


def _emulated_matmul(x: torch.Tensor, tensors: dict, group: int) -> torch.Tensor:
    """x · wᵀ computed the way the kernel does: for every 16-row tile, block of 64 inputs and k tile, each lane's A
    registers (bitwise ops on its word) and B registers (its inputs, loaded as the kernel indexes them) are placed
    where PTX's tables for mma.m16n8k16 put them (A: a_j at row groupID + 8 for j in {2,3,6,7}, column
    2·threadID_in_group + j % 2, + 8 for j >= 4; B: b_j at row 2·threadID_in_group + j % 2, + 8 for j >= 2, column
    groupID; register r holds elements 2r (low half) and 2r + 1), then the two mmas and the scale, in float64."""
    words, scales, zeros = tensors["words"], tensors["scales"], tensors["zeros"]
    tiles, k_blocks = words.shape[:2]
    rows, k = x.shape
    x_bits = x.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    out = torch.zeros(rows, tiles * 16, dtype=torch.float64)
    for tile in range(tiles):
        for kb in range(k_blocks):
            at = kb * 64 // group
            zero = torch.tensor([8 if zeros is None else int(zeros[tile, at, r]) for r in range(16)])
            scale = torch.tensor([float(scales[tile, at, r]) for r in range(16)], dtype=torch.float64)
            block = torch.zeros(16, rows, dtype=torch.float64)
            for t in range(4):
                a = torch.zeros(16, 16, dtype=torch.float64)
                b = torch.zeros(16, 8 * (-(-rows // 8)), dtype=torch.float64)
                for lane in range(32):
                    group_id, thread_in_group = lane // 4, lane % 4
                    word = int(words[tile, kb, lane, t]) & 0xFFFFFFFF
                    for j in range(8):   # A: register j // 2 = ((word >> 4·(j // 2)) & 0x000F000F) | 0x43004300
                        register = ((word >> (4 * (j // 2))) & 0x000F000F) | 0x43004300
                        row = group_id + (8 if j in (2, 3, 6, 7) else 0)
                        a[row, 2 * thread_in_group + j % 2 + (8 if j >= 4 else 0)] = \
                            _bf16((register >> (16 * (j % 2))) & 0xFFFF)
                    for m in range(group_id, b.shape[1], 8):   # B: inputs 16p + 4t + 2·(j // 2) + j % 2 of row m
                        for j in range(4):
                            column = kb * 64 + 16 * thread_in_group + 4 * t + j
                            value = _bf16(int(x_bits[m, column])) if m < rows else 0.0
                            b[2 * thread_in_group + j % 2 + (8 if j >= 2 else 0), m] = value
                neg_zero = -(128.0 + zero.double())[:, None].expand(16, 16)
                block += ((a + neg_zero) @ b)[:, :rows]
            out[:, tile * 16:(tile + 1) * 16] += (scale[:, None] * block).T
    return out


def test_bf16_bit_tricks_are_exact():
    for q in range(16):
        assert _bf16(0x4300 | q) == 128 + q       # a code in the low bits of 128.0
        assert _bf16(0xC300 | q) == -(128 + q)    # the zero point's negated offset
    assert _bf16(0x3F80) == 1.0 and _bf16(0xC308) == -136.0


@pytest.mark.parametrize("asymmetric,group", [(False, 128), (True, 64)])
def test_packed_layout_is_the_mma_fragment(asymmetric, group):
    unsigned, scale, zero = _grid(32, 256, group, asymmetric)
    tensors = int4_mma.pack(unsigned, scale, zero)
    assert tensors["words"].dtype == torch.int32 and tensors["words"].numel() * 4 == unsigned.numel() // 2
    x = torch.randn(3, 256).to(torch.bfloat16)
    centred = unsigned.double() - (8 if zero is None else zero.double().repeat_interleave(group, 1))
    expected = x.double() @ (centred * scale.double().repeat_interleave(group, 1)).T
    torch.testing.assert_close(_emulated_matmul(x, tensors, group), expected, rtol=1e-9, atol=1e-9)
    assert torch.equal(int4_mma.unpack_codes(tensors["words"]), unsigned)
    weight = _reference_weight(unsigned, scale, zero, group)
    assert torch.equal(int4_mma.dequantize(tensors["words"], tensors["scales"], tensors["zeros"], group), weight)


def test_supports_names_the_shapes_the_layout_holds():
    assert int4_mma.supports(4096, 12288, 128) and int4_mma.supports(576, 960, 64)
    assert not int4_mma.supports(4096, 12288, 32)    # groups below 64 run on gemlite
    assert not int4_mma.supports(4096 + 32, 4096, 64)
    assert not int4_mma.supports(4096, 4096 + 8, 128)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 5, 16, 33, 64, 100])
@pytest.mark.parametrize("asymmetric,group", [(False, 128), (True, 64)])
def test_kernel_matches_the_dequantized_weight(rows, asymmetric, group):
    """Up to MAX_ROWS rows the kernel sums (q − z)·x exactly and multiplies by the scale in float32, so it is checked
    against the weight in float32, unrounded (rounding (q − z)·s to bf16 first moves an output by up to ~0.3 here, which
    would hide an error of that size); above MAX_ROWS the op multiplies the bf16 weight that `dequantize` writes."""
    if reason := int4_mma.available(torch.device("cuda")):
        pytest.skip(reason)
    n, k = 96, 640  # 10 blocks of 64 inputs: no split-K setting divides them evenly
    unsigned, scale, zero = _grid(n, k, group, asymmetric)
    weight = _reference_weight(unsigned, scale, zero, group).cuda()
    zero_points = torch.full_like(scale, 8, dtype=torch.int64) if zero is None else zero
    exact = ((unsigned.float() - zero_points.float().repeat_interleave(group, 1))
             * scale.float().repeat_interleave(group, 1)).cuda()
    tensors = {key: None if t is None else t.cuda() for key, t in int4_mma.pack(unsigned, scale, zero).items()}
    bias = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
    out = torch.ops.compress.int4_mma(x, tensors["words"], tensors["scales"], tensors["zeros"], bias, group)
    expected = x.float() @ (exact if rows <= int4_mma.MAX_ROWS else weight.float()).T + bias.float()
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)  # the output is rounded to bf16
    assert torch.equal(int4_mma.dequantize(tensors["words"], tensors["scales"], tensors["zeros"], group), weight)
    with mock.patch.dict(os.environ, {int4_mma.DEQUANTIZE_LINES_VARIABLE: "0"}):  # the direct stores
        assert torch.equal(int4_mma.dequantize(tensors["words"], tensors["scales"], tensors["zeros"], group), weight)
    shifted = torch.empty(rows * k + 1, dtype=torch.bfloat16, device="cuda")[1:].view(rows, k)  # 2-byte aligned
    shifted.copy_(x)
    from_shifted = torch.ops.compress.int4_mma(shifted, tensors["words"], tensors["scales"], tensors["zeros"], bias,
                                               group)
    if rows <= int4_mma.MAX_ROWS:  # the kernel's input is realigned, so the same bits come out
        assert torch.equal(from_shifted, out)
    else:  # cuBLAS may pick another algorithm for an input of another alignment, rounding the product before the bias
        torch.testing.assert_close(from_shifted.float(), expected, rtol=1e-2, atol=expected.abs().max().item() / 128)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("setting", [(4, 1, False, 0, 0), (8, 4, False, 1, 48), (16, 2, True, 0, 0),
                                     (4, 4, True, 1, 0), (8, 8, True, 1, 48), (4, 1, True, 2, 0), (4, 1, False, 3, 40),
                                     (2, 2, True, 2, 0), (8, 1, True, 3, 0)])
@pytest.mark.parametrize("asymmetric,group", [(False, 128), (True, 64)])
@pytest.mark.parametrize("rows", [5, 9])  # one 8-row tile (its inputs in the ring) and two (theirs read directly)
def test_every_launch_setting_computes_the_same_product(setting, asymmetric, group, rows):
    """Warps, loads per round, where the zero point is taken out, loading ahead (in registers or a cp.async ring in
    shared memory, whose copies of the inputs are zero past the last row) and a register cap only change the order of
    float32 sums."""
    if reason := int4_mma.available(torch.device("cuda")):
        pytest.skip(reason)
    n, k = 48, 640
    unsigned, scale, zero = _grid(n, k, group, asymmetric)
    zero_points = torch.full_like(scale, 8, dtype=torch.int64) if zero is None else zero
    exact = ((unsigned.float() - zero_points.float().repeat_interleave(group, 1))
             * scale.float().repeat_interleave(group, 1)).cuda()
    tensors = {key: None if t is None else t.cuda() for key, t in int4_mma.pack(unsigned, scale, zero).items()}
    x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(rows, n, dtype=torch.bfloat16, device="cuda")
    int4_mma.launch(x, tensors["words"], tensors["scales"], tensors["zeros"], None, group, out, setting)
    torch.testing.assert_close(out.float(), x.float() @ exact.T, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("setting", [(16, 1, True, 0, 32), (8, 2, False, 1, 0), (4, 1, True, 2, 0)])
def test_a_dependent_launch_waits_for_the_kernel_that_writes_its_input(monkeypatch, setting):
    """Programmatic dependent launch (COMPRESS_INT4_PDL=1): the matmul may start before the kernel ahead of it ends and
    prefetches its codes meanwhile, but reads its input only once that kernel is done. Two matmuls in a chain, the
    second reading the first's output, launched back to back on the stream and inside a CUDA graph (where the launch
    attribute becomes a programmatic edge), equal the same chain launched plainly."""
    if reason := int4_mma.available(torch.device("cuda")):
        pytest.skip(reason)
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    n, k, group = 640, 640, 128
    packed = []
    for seed in (0, 1):
        unsigned, scale, zero = _grid(n, k, group, False, seed)
        packed.append({key: None if t is None else t.cuda() for key, t in int4_mma.pack(unsigned, scale * 0.05,
                                                                                         zero).items()})
    x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")

    def chain(into: list[torch.Tensor]) -> None:
        int4_mma.launch(x, packed[0]["words"], packed[0]["scales"], None, None, group, into[0], setting)
        int4_mma.launch(into[0], packed[1]["words"], packed[1]["scales"], None, None, group, into[1], setting)

    plain = [torch.empty(1, n, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    chain(plain)
    monkeypatch.setenv(int4_mma.PDL_VARIABLE, "1")
    int4_mma.dependent_launch.cache_clear()
    try:
        assert int4_mma.dependent_launch(torch.device("cuda", torch.cuda.current_device()))
        eager = [torch.full_like(t, float("nan")) for t in plain]
        chain(eager)
        graphed = [torch.full_like(t, float("nan")) for t in plain]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            chain(graphed)
        for t in graphed:
            t.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
    finally:
        int4_mma.dependent_launch.cache_clear()
    for result in (eager, graphed):
        assert torch.equal(result[0], plain[0]) and torch.equal(result[1], plain[1])


_LATE_COPY = r"""
extern "C" __global__ void late_copy(const unsigned short* __restrict__ source, unsigned short* __restrict__ target,
                                     int n, int delay_ns) {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");  // a dependent kernel may start at once
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now)); } while (now - start < (unsigned long long)delay_ns);
    for (int i = threadIdx.x; i < n; i += blockDim.x) target[i] = source[i];
}
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_dependent_launch_reads_and_writes_only_after_the_kernel_before_it(monkeypatch):
    """A kernel that lets dependents start at once, then copies 100 µs later: the matmul launched after it for
    programmatic dependent launch starts early, but reads its input only once that copy has written it (a NaN input
    before), and writes its output only after that copy has read the output's old contents."""
    if reason := int4_mma.available(torch.device("cuda")):
        pytest.skip(reason)
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    late_copy = torch.cuda._compile_kernel(_LATE_COPY, "late_copy")
    n, k, group = 640, 640, 128
    unsigned, scale, zero = _grid(n, k, group, False)
    packed = {key: None if t is None else t.cuda() for key, t in int4_mma.pack(unsigned, scale, zero).items()}
    x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
    plain = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
    int4_mma.launch(x, packed["words"], packed["scales"], None, None, group, plain)
    monkeypatch.setenv(int4_mma.PDL_VARIABLE, "1")
    int4_mma.dependent_launch.cache_clear()
    try:
        late_input = torch.full_like(x, float("nan"))
        out = torch.empty_like(plain)
        late_copy(grid=(1, 1, 1), block=(256, 1, 1), args=[x, late_input, k, 100_000])
        int4_mma.launch(late_input, packed["words"], packed["scales"], None, None, group, out)
        old = torch.full_like(plain, 7.0)
        seen = torch.empty_like(plain)
        late_copy(grid=(1, 1, 1), block=(256, 1, 1), args=[old, seen, n, 100_000])
        int4_mma.launch(x, packed["words"], packed["scales"], None, None, group, old)
        torch.cuda.synchronize()
    finally:
        int4_mma.dependent_launch.cache_clear()
    assert torch.equal(out, plain)
    assert torch.equal(seen, torch.full_like(plain, 7.0)) and torch.equal(old, plain)


def test_the_dependent_launch_structures_have_the_drivers_layout():
    """cuLaunchKernelEx reads CUlaunchConfig and CUlaunchAttribute by their C layout (cuda.h): six grid and block
    dimensions and the shared bytes (28 bytes), the stream at offset 32, the attributes at 40, their count at 48, 56 in
    all; an attribute is its 4-byte id, padding to 8 and a 64-byte value union, 72 in all."""
    import ctypes

    config, attribute = int4_mma._LaunchConfig, int4_mma._LaunchAttribute
    assert (config.stream.offset, config.attributes.offset, config.attribute_count.offset) == (32, 40, 48)
    assert ctypes.sizeof(config) == 56
    assert (attribute.value.offset, ctypes.sizeof(attribute)) == (8, 72)


def test_a_setting_over_the_static_shared_memory_is_refused_before_launch():
    """A ring of 4 rounds × 2 k blocks for 16 warps needs ~150 KB at one row: refused by name, nothing compiled (CPU
    tensors reach no GPU code); the bytes are those ptxas reports for the kernel (NVRTC, sm_90: 41,728 for 8 warps ×
    3 rounds × 1 block at one row, 16,896 for 8 × 2 × 1 at 16 rows, whose inputs are not in the ring)."""
    assert int4_mma.shared_bytes(1, (8, 1, True, 3, 0), False) == 41_728
    assert int4_mma.shared_bytes(2, (8, 1, True, 2, 0), False) == 16_896
    assert int4_mma.shared_bytes(1, (8, 4, True, 1, 0), False) == 8 * 512  # registers only: the partial tiles
    words = torch.zeros(3, 10, 32, 4, dtype=torch.int32)
    scales = torch.zeros(3, 5, 16, dtype=torch.bfloat16)
    x, out = torch.zeros(1, 640, dtype=torch.bfloat16), torch.empty(1, 48, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="shared memory"):
        int4_mma.launch(x, words, scales, None, None, 128, out, (16, 2, True, 4, 0))


def _ptxas_tool():
    """eval/ptxas_int4_mma.py, which compiles the kernel with NVRTC (no GPU needed; skipped where NVRTC is missing)."""
    pytest.importorskip("nvidia.cuda_nvrtc", reason="NVRTC not installed (pip install nvidia-cuda-nvrtc-cu12)")
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "eval" / "ptxas_int4_mma.py"
    spec = importlib.util.spec_from_file_location("ptxas_int4_mma", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_rules_decode_settings_keep_32_warps_resident_without_spilling():
    """ptxas (NVRTC, sm_90) on every setting the rule picks for 1-16 rows at the 7B widths, sym and asym: no spills and
    32 warps resident a multiprocessor. When the register cap became a launch setting, ptxas lost its 64-register
    budget and four of these took 66-72 registers, 16 or 24 warps (eval/results/ptxas_int4_mma_sm90.json)."""
    tool = _ptxas_tool()
    library = tool.nvrtc()
    settings = {(int4_mma._row_tiles(rows), int4_mma.settings_for(int4_mma._row_tiles(rows), n))
                for rows in (1, 16) for n in (4096, 12288)}
    assert len(settings) == 4
    for row_tiles, setting in sorted(settings):
        for asymmetric in (False, True):
            source = int4_mma.kernel_source("int4_mma", row_tiles, setting, asymmetric, True)
            report = tool.ptxas_report(library, source, "int4_mma", "sm_90")
            assert report["spill_store_bytes"] == 0, (row_tiles, setting, asymmetric, report)
            assert report["shared_bytes"] == int4_mma.shared_bytes(row_tiles, setting, asymmetric)
            warps = tool.resident_warps(setting[0], report["registers"], report["shared_bytes"])
            assert warps == 32, (row_tiles, setting, asymmetric, report)


def test_the_dependent_kernel_costs_the_rule_no_registers_and_needs_hopper():
    """The kernel built for programmatic dependent launch (an L2 prefetch of its first codes, griddepcontrol.wait and
    launch_dependents) compiles for sm_90 at the rule's decode settings with no more registers and no spills than the
    plain one (so the same warps stay resident), and not for sm_80, whose PTX has no griddepcontrol: the runtime only
    asks for it on compute capability 9.0 and newer."""
    tool = _ptxas_tool()
    library = tool.nvrtc()
    for row_tiles, n in ((1, 4096), (1, 12288), (2, 4096)):
        setting = int4_mma.settings_for(row_tiles, n)
        plain, dependent = (tool.ptxas_report(library, int4_mma.kernel_source("int4_mma", row_tiles, setting, False,
                                                                              True, pdl), "int4_mma", "sm_90")
                            for pdl in (False, True))
        assert dependent["spill_store_bytes"] == 0
        assert dependent["registers"] <= plain["registers"], (row_tiles, setting, plain, dependent)
    with pytest.raises(RuntimeError, match="griddepcontrol"):
        tool.ptxas_report(library, int4_mma.kernel_source("int4_mma", 1, (8, 2, False, 0, 0), False, False, True),
                          "int4_mma", "sm_80")


def test_the_dequantization_compiles_with_whole_sector_stores():
    """Both store forms of the dequantization kernel compile for sm_90 without spills (the GPU test above checks them
    equal bit for bit; eval/bench_int4_mma.py times both)."""
    tool = _ptxas_tool()
    library = tool.nvrtc()
    for lines in (False, True):
        for asymmetric in (False, True):
            source = int4_mma.kernel_source("int4_dequantize", 1, (1, 1, False, 0, 0), asymmetric, False, False, lines)
            assert ("#define LINES 1" in source) == lines
            report = tool.ptxas_report(library, source, "int4_dequantize", "sm_90")
            assert report["spill_store_bytes"] == 0 and report["shared_bytes"] == 0, (lines, asymmetric, report)


def test_split_k_settings_fit_static_shared_memory():
    """Every row count up to MAX_ROWS gets a launch setting whose partial tiles fit the 48 KB of shared memory a
    kernel may declare statically (NVRTC refuses the kernel otherwise: 33-64 rows with 16 warps need 64 KB)."""
    for rows in range(1, int4_mma.MAX_ROWS + 1):
        row_tiles = int4_mma._row_tiles(rows)
        for out_features in (4096, 22016):
            split_k = int4_mma.settings_for(row_tiles, out_features)[0]
            assert split_k * row_tiles * 4 * 32 * 4 <= 48 * 1024, (rows, out_features, split_k)
    assert (int4_mma.max_split_k(int4_mma._row_tiles(64)), int4_mma.max_split_k(int4_mma._row_tiles(32))) == (8, 16)


def test_packed_linear_on_the_mma_layout_computes_its_grid():
    """Int4Linear's mma backend (built here on the CPU, where the op dequantizes) against a dense Linear with the
    grid's weight, bias included: the wiring the GPU runs, with the same tensors."""
    from compress.quantize.grid import WeightQuant, minmax_qparams, weight_args
    from compress.quantize.packed import Int4Linear, integer_codes

    generator = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(64, 128, generator=generator), torch.randn(64, generator=generator)
    args = weight_args(4, 64, sym=False)
    scale, zero = minmax_qparams(weight, args)
    quant = WeightQuant(args, scale.to(torch.bfloat16), zero)
    codes = integer_codes(weight, quant)
    linear = Int4Linear(codes, quant.scale, zero, 64, bias.to(torch.bfloat16), quant, "mma")
    grid_weight = ((codes.float() - zero.float().repeat_interleave(64, 1))
                   * quant.scale.float().repeat_interleave(64, 1)).to(torch.bfloat16)
    x = torch.randn(2, 5, 128, generator=generator).to(torch.bfloat16)
    expected = torch.nn.functional.linear(x.float(), grid_weight.float(), bias.to(torch.bfloat16).float())
    assert linear.kernel == "int4 mma" and torch.equal(linear.dequantized_weight(), grid_weight)
    torch.testing.assert_close(linear(x).float(), expected, rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("asymmetric,group,chunk", [(False, 128, 32), (True, 64, 48), (False, 64, 1000)])
def test_dequantizing_in_slices_of_output_rows_gives_the_whole_product(asymmetric, group, chunk):
    """Long inputs may dequantize the weight a slice of output rows at a time (slices of the packed tensors, tile by
    tile; the last slice shorter): the product and the bias land in the right columns, as with the whole weight."""
    n, k = 96, 256
    unsigned, scale, zero = _grid(n, k, group, asymmetric, seed=3)
    tensors = int4_mma.pack(unsigned, scale, zero)
    x = torch.randn(70, k, dtype=torch.bfloat16)
    bias = torch.randn(n, dtype=torch.bfloat16)
    weight = _reference_weight(unsigned, scale, zero, group)
    whole = int4_mma.dequantized_matmul(x, tensors["words"], tensors["scales"], tensors["zeros"], bias, group, 0)
    sliced = int4_mma.dequantized_matmul(x, tensors["words"], tensors["scales"], tensors["zeros"], bias, group, chunk)
    torch.testing.assert_close(whole.float(), (x.float() @ weight.float().T + bias.float()), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(sliced, whole)  # the same sums; a CPU GEMM may block a narrower one otherwise


def test_a_table_measured_on_the_gpu_sets_launch_settings_and_slices(tmp_path, monkeypatch):
    """A table written by eval/bench_int4_mma.py --table-out (named by COMPRESS_INT4_MMA_TABLE, or shipped per GPU)
    sets the launch setting of the shapes it measured and the slice size of long inputs; other shapes keep the rule."""
    import json

    int4_mma.tuned_table.cache_clear()
    monkeypatch.delenv(int4_mma.TABLE_VARIABLE, raising=False)
    rule = int4_mma.settings_for(1, 12288, 11008)
    table = {"settings": {"1,12288,4096": [16, 8, True, True, 48]}, "dequantize_chunk": 2048}
    (tmp_path / "table.json").write_text(json.dumps(table))
    monkeypatch.setenv(int4_mma.TABLE_VARIABLE, str(tmp_path / "table.json"))
    int4_mma.tuned_table.cache_clear()
    try:
        assert int4_mma.settings_for(1, 12288, 4096) == (16, 8, True, True, 48)
        assert int4_mma.settings_for(1, 12288, 11008) == rule
        assert int4_mma.dequantize_chunk(torch.device("cuda")) == 2048
        assert int4_mma.dequantize_chunk(torch.device("cpu")) == 0
    finally:
        int4_mma.tuned_table.cache_clear()


@pytest.mark.parametrize("asymmetric,group", [(False, 128), (True, 64)])
def test_packing_a_few_tiles_at_a_time_gives_the_whole_packing(asymmetric, group):
    """pack reorders `tiles_per_slice` tiles of 16 rows at a time (the last slice shorter): the same tensors as one
    slice, which the layout tests check against PTX's fragment tables."""
    unsigned, scale, zero = _grid(16 * 7, 256, group, asymmetric, seed=5)
    whole = int4_mma.pack(unsigned, scale, zero, tiles_per_slice=7)
    sliced = int4_mma.pack(unsigned, scale, zero, tiles_per_slice=3)
    assert whole.keys() == sliced.keys()
    for key in whole:
        assert (whole[key] is None and sliced[key] is None) or torch.equal(whole[key], sliced[key]), key

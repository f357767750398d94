"""Our int4 tensor-core kernel (compress.quantize.int4_mma) against gemlite and the bf16 weight with cuBLAS, at the
4-bit Linear shapes of a Llama-2-7B-shape model (fused q/k/v and gate/up, before and after 25 % pruning), on one GPU:

    python eval/bench_int4_mma.py --out eval/results/bench_int4_mma_h200.json

For each grid (g128 symmetric; g64 asymmetric, the demo's, on the unpruned shapes) and row count (1, 4, 16, 64: decode
at those batch sizes) it times every launch setting of ours, checks its output against the dequantized weight in
float32, and times gemlite (our tuned table) and cuBLAS on the same input. Each time is one call's share of a CUDA graph
that calls the kernel on enough copies of the weight to exceed the L2 cache, as a decode step does (a graph replaying
one Linear would read it from L2; a graph also leaves out the Python launch cost, as the compiled decode step does).
Beside each, a kernel that only reads the same bytes gives the memory's limit in the same harness. At 2048 rows (a
prompt) it times dequantize-then-cuBLAS for both layouts (ours whole and in slices of output rows, CHUNKS) against
cuBLAS on the bf16 weight, and checks that our dequantized weight equals gemlite's bit for bit; our dequantization
alone is timed in both store forms (COMPRESS_INT4_DEQUANTIZE_LINES), the whole-sector one checked equal to the direct
one. Last, the kernel inside torch.compile (a CUDA graph)."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import LLAMA2_7B  # noqa: E402

from compress.quantize import int4_mma, packed  # noqa: E402
from compress.quantize.grid import WeightQuant, minmax_qparams, weight_args  # noqa: E402

# (warps a block, k blocks a round, zero point in the integer units, PIPELINE, warps a multiprocessor for the register
# allocator): loads in registers (PIPELINE 0, 1) under a register cap or none; a cp.async ring of 2-4 rounds (no cap:
# it needs no registers to run ahead). Settings whose shared memory exceeds 48 KB at a row count are skipped.
SETTINGS = ([(split_k, unroll, alu, pipeline, warps) for alu in (False, True) for split_k in (4, 8, 16)
             for unroll in (1, 2, 4, 8) for pipeline in (0, 1) for warps in (0, 32, 40, 48)]
            + [(split_k, unroll, alu, pipeline, 0) for alu in (False, True) for split_k in (2, 4, 8)
               for unroll in (1, 2) for pipeline in (2, 3, 4)])
CHUNKS = (0, 1024, 2048, 4096, 8192)  # int4_mma.DEQUANTIZE_CHUNK candidates, timed at the prefill length

# The memory's own limit in the same harness: a kernel that only reads the same bytes (16-byte streaming loads, four in
# flight per thread, every block resident) and keeps nothing, timed as ours is, against which each shape's time is put.
_STREAM = r"""
extern "C" __global__ void stream_read(const uint4* __restrict__ data, unsigned* __restrict__ sink, long long n) {
    unsigned acc = 0;
    const long long step = (long long)gridDim.x * blockDim.x;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * step < n; i += 4 * step) {
        const uint4 a = load_streaming(data + i), b = load_streaming(data + i + step);
        const uint4 c = load_streaming(data + i + 2 * step), d = load_streaming(data + i + 3 * step);
        acc ^= a.x ^ b.y ^ c.z ^ d.w;
    }
    for (; i < n; i += step) acc ^= load_streaming(data + i).x;
    if (acc == 0x9E3779B9u) sink[0] = acc;  // never true in practice; keeps the loads
}
"""


def spilling_settings() -> set[tuple]:
    """(row tiles, setting, asymmetric) that ptxas spills on this GPU's architecture, from eval/ptxas_int4_mma.py's
    results where they exist (sm_90: H100, H200): not worth device time (--keep-spilling times them anyway)."""
    major, minor = torch.cuda.get_device_capability()
    path = Path(__file__).resolve().parent / "results" / f"ptxas_int4_mma_sm{major}{minor}.json"
    if not path.exists():
        return set()
    rows = json.loads(path.read_text())["rows"]
    return {(int4_mma._row_tiles(r["rows"]), tuple(r["setting"]), r["asymmetric"]) for r in rows
            if r["spill_store_bytes"]}


@functools.lru_cache(maxsize=None)
def stream_kernel():
    return torch.cuda._compile_kernel(int4_mma._COMMON + _STREAM, "stream_read")


def stream_us(buffers: list[torch.Tensor], sink: torch.Tensor) -> tuple[float, int]:
    """The fastest graph-replayed read of each buffer (16-byte words) over a few grid sizes, and its blocks per SM."""
    kernel, sms = stream_kernel(), torch.cuda.get_device_properties(0).multi_processor_count
    best = (float("inf"), 0)
    for per_sm in (2, 4, 8):
        us = chain_us([lambda b=b: kernel(grid=(sms * per_sm, 1, 1), block=(256, 1, 1),
                                          args=[b, sink, b.numel() // 4]) for b in buffers])
        best = min(best, (us, per_sm))
    return best


def chain_us(calls: list, replays: int = 10) -> float:
    """Median µs per call of `calls` (each on its own copy of the weight) replayed as one CUDA graph."""
    with torch.inference_mode():
        for call in calls:
            call()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for call in calls:
                call()
        graph.replay()
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2] * 1e3 / len(calls)


def copies_for(size: int) -> int:
    return max(2, -(-256 * 2**20 // size))


def grid_of(in_features: int, out_features: int, group: int, sym: bool):
    weight = torch.randn(out_features, in_features, device="cuda")
    args = weight_args(4, group, sym=sym)
    scale, zero = minmax_qparams(weight, args)
    quant = WeightQuant(args, scale.to(torch.bfloat16), zero)
    codes = packed.integer_codes(weight, quant)
    lite = packed.Int4Linear(codes, quant.scale, zero, group, None, quant, "gemlite")
    unsigned = (codes.int() + 8).to(torch.uint8)
    symmetric = zero is None or not zero.any()
    ours = int4_mma.pack(unsigned, quant.scale, None if symmetric else (zero.int() + 8))
    return lite, ours


def launch_once(args) -> None:
    """Each shape's kernel at each row count with the runtime's setting, and the read-only kernel, launched once."""
    kernel, sms = stream_kernel(), torch.cuda.get_device_properties(0).multi_processor_count
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    for name in args.shapes.split(",") if args.shapes else list(LLAMA2_7B):
        in_features, out_features = LLAMA2_7B[name]
        _, ours = grid_of(in_features, out_features, 128, True)
        for rows in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(rows, out_features, device="cuda", dtype=torch.bfloat16)
            int4_mma.launch(x, ours["words"], ours["scales"], None, None, 128, out)
            print(name, rows, int4_mma.settings_for(int4_mma._row_tiles(rows), out_features), flush=True)
        words = ours["words"].view(-1)
        kernel(grid=(sms * 4, 1, 1), block=(256, 1, 1), args=[words, sink, words.numel() // 4])
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,4,16,64")
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--shapes", help="comma-separated Linear names of bench_kernels.LLAMA2_7B (default: all)")
    parser.add_argument("--asym", action=argparse.BooleanOptionalAction, default=True,
                        help="also g64 asymmetric on the unpruned shapes")
    parser.add_argument("--budget", type=float, default=420, help="seconds; shapes left after it are skipped")
    parser.add_argument("--ncu", action="store_true",
                        help="launch the runtime's setting and the read-only kernel once per shape and row count, "
                             "untimed, for `ncu` to read their counters; writes nothing")
    parser.add_argument("--zero-in-alu-only", action="store_true", help="only the settings that take the zero point "
                        "out in the integer units (the faster way at 1-16 rows in every earlier run)")
    parser.add_argument("--split-k", help="only these warps-per-block counts, e.g. 8,16")
    parser.add_argument("--warps", help="only these register caps (warps a multiprocessor; 0: none), e.g. 0,40")
    parser.add_argument("--keep-spilling", action="store_true", help="also time the settings ptxas spills (by "
                        "eval/results/ptxas_int4_mma_smXY.json for this GPU; skipped by default)")
    parser.add_argument("--table-out", help="also write the fastest setting per shape and row tiles, and the fastest "
                                            "slice size, as a table compress.quantize.int4_mma reads")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.ncu:
        return launch_once(args)
    if not args.out:
        parser.error("--out is required")
    import gemlite

    start = time.time()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "gemlite": gemlite.__version__,
               "command": "python eval/bench_int4_mma.py " + " ".join(
                   a for a in sys.argv[1:] if not a.startswith(("/", "OUT"))),
               "rows": [], "prefill": [], "skipped": []}
    rows_list = [int(r) for r in args.rows.split(",")]
    split_ks = {int(k) for k in args.split_k.split(",")} if args.split_k else {s[0] for s in SETTINGS}
    warps = {int(w) for w in args.warps.split(",")} if args.warps else {s[4] for s in SETTINGS}
    settings = [s for s in SETTINGS if (s[2] or not args.zero_in_alu_only) and s[0] in split_ks and s[4] in warps]
    results["settings_tried"] = settings
    spilling = set() if args.keep_spilling else spilling_settings()
    results["skipped_spilling"] = len(spilling)
    table = {"device": results["device"], "command": results["command"], "settings": {}}
    chunk_totals = dict.fromkeys(CHUNKS, 0.0)
    names = args.shapes.split(",") if args.shapes else list(LLAMA2_7B)
    grids = [(name, 128, True) for name in names] + [(n, 64, False) for n in names if "pruned" not in n and args.asym]
    for name, group, sym in grids:
        if time.time() - start > args.budget:
            results["skipped"].append(f"{name} g{group}")
            continue
        in_features, out_features = LLAMA2_7B[name]
        lite, ours = grid_of(in_features, out_features, group, sym)
        dequantized = lite.dequantized_weight()
        size = in_features * out_features // 2 + in_features // group * out_features * (2 if sym else 3)
        copies = copies_for(size)
        lites = [lite] + [
            grid_of(in_features, out_features, group, sym)[0] for _ in range(copies - 1)]
        ours_copies = [{key: None if t is None else t.clone() for key, t in ours.items()} for _ in range(copies)]
        denses = [dequantized.clone() for _ in range(copies_for(in_features * out_features * 2))]
        sink = torch.zeros(1, dtype=torch.int32, device="cuda")
        stream_buffers = [torch.cat([c["words"].view(-1), c["scales"].view(torch.int16).view(-1).view(torch.int32)])
                          for c in ours_copies]
        memory_us, memory_per_sm = stream_us(stream_buffers, sink)
        del stream_buffers
        ours_weight = int4_mma.dequantize(ours["words"], ours["scales"], ours["zeros"], group)
        same_weight = bool(torch.equal(ours_weight, dequantized))
        for rows in rows_list:
            x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
            reference = x.float() @ dequantized.float().T
            out = torch.empty(rows, out_features, device="cuda", dtype=torch.bfloat16)
            timed, errors = {}, {}
            for setting in settings:
                row_tiles = int4_mma._row_tiles(rows)
                if (int4_mma.shared_bytes(row_tiles, setting, not sym) > int4_mma.STATIC_SHARED_BYTES
                        or (row_tiles, setting, not sym) in spilling):
                    continue
                try:
                    out.zero_()
                    int4_mma.launch(x, ours["words"], ours["scales"], ours["zeros"], None, group, out, setting)
                    error = ((out.float() - reference).norm() / reference.norm()).item()
                    errors[str(setting)] = round(error, 6)
                    if not error < 1e-2:
                        print(f"  {name} rows {rows} {setting}: wrong result (relative error {error:.3g})", flush=True)
                        continue
                    timed[setting] = chain_us([
                        lambda c=c, setting=setting: int4_mma.launch(x, c["words"], c["scales"], c["zeros"], None,
                                                                     group, out, setting) for c in ours_copies])
                except Exception as exception:  # noqa: BLE001 -- a setting this GPU refuses
                    print(f"  {name} rows {rows} {setting}: {type(exception).__name__}: {str(exception)[:300]}",
                          flush=True)
            gemlite_us = chain_us([lambda lite=lite: lite(x) for lite in lites])
            bf16_us = chain_us([lambda dense=dense: F.linear(x, dense) for dense in denses])
            best = min(timed, key=timed.get) if timed else None
            ours_us = timed[best] if best else float("nan")
            row = {"shape": name, "in": in_features, "out": out_features, "group": group, "sym": sym, "rows": rows,
                   "ours_us": round(ours_us, 2), "gemlite_us": round(gemlite_us, 2), "bf16_us": round(bf16_us, 2),
                   "ours_vs_gemlite": round(gemlite_us / ours_us, 3), "ours_vs_bf16": round(bf16_us / ours_us, 3),
                   "ours_tb_per_s": round(size / ours_us / 1e6, 3),
                   "read_only_us": round(memory_us, 2), "read_only_blocks_per_sm": memory_per_sm,
                   "ours_vs_read_only": round(memory_us / ours_us, 3),
                   "gemlite_tb_per_s": round(size / gemlite_us / 1e6, 3),
                   "bf16_tb_per_s": round(in_features * out_features * 2 / bf16_us / 1e6, 3),
                   "best_setting": best, "all_us": {str(s): round(u, 2) for s, u in timed.items()},
                   "relative_errors": errors, "copies": copies}
            results["rows"].append(row)
            if best:
                table["settings"][f"{int4_mma._row_tiles(rows)},{out_features},{in_features}"] = list(best)
            print(json.dumps({k: v for k, v in row.items() if k not in ("all_us", "relative_errors")}), flush=True)
        x = torch.randn(args.prefill, in_features, device="cuda", dtype=torch.bfloat16)
        pair = [ours_copies[0], ours_copies[1 % copies]]
        prefill = {"shape": name, "group": group, "sym": sym, "rows": args.prefill,
                   "dequantized_equal_to_gemlite": same_weight,
                   "ours_dequantize_us": round(chain_us([lambda c=c: int4_mma.dequantize(
                       c["words"], c["scales"], c["zeros"], group, lines=False) for c in pair]), 2),
                   "ours_dequantize_lines_us": round(chain_us([lambda c=c: int4_mma.dequantize(
                       c["words"], c["scales"], c["zeros"], group, lines=True) for c in pair]), 2),
                   "lines_equal": bool(torch.equal(int4_mma.dequantize(ours["words"], ours["scales"], ours["zeros"],
                                                                       group, lines=True), ours_weight)),
                   "ours_us_by_chunk": {chunk: round(chain_us([lambda c=c, chunk=chunk: int4_mma.dequantized_matmul(
                       x, c["words"], c["scales"], c["zeros"], None, group, chunk) for c in pair]), 2)
                       for chunk in CHUNKS},
                   "gemlite_path_us": round(chain_us([lambda lite=lite: lite(x) for lite in lites[:2]]), 2),
                   "bf16_us": round(chain_us([lambda dense=dense: F.linear(x, dense) for dense in denses[:2]]), 2)}
        results["prefill"].append(prefill)
        for chunk, us in prefill["ours_us_by_chunk"].items():
            chunk_totals[chunk] += us
        table["dequantize_chunk"] = min(chunk_totals, key=chunk_totals.get)
        if args.table_out:
            Path(args.table_out).write_text(json.dumps(table, indent=1) + "\n")
        print(json.dumps(prefill), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        del lites, ours_copies, denses
        torch.cuda.empty_cache()

    # the op inside a compiled CUDA graph, as the decode step runs it
    in_features, out_features = LLAMA2_7B["qkv"]
    lite, ours = grid_of(in_features, out_features, 128, True)
    x = torch.randn(1, in_features, device="cuda", dtype=torch.bfloat16)
    step = torch.compile(lambda x: torch.ops.compress.int4_mma(x, ours["words"], ours["scales"], None, None, 128) * 2,
                         mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        compiled = step(x).clone()
    eager = torch.ops.compress.int4_mma(x, ours["words"], ours["scales"], None, None, 128) * 2
    results["compiled_equal_to_eager"] = bool(torch.equal(compiled, eager))
    results["seconds"] = round(time.time() - start, 1)
    print("compiled equal to eager:", results["compiled_equal_to_eager"], "seconds", results["seconds"], flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

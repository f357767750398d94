"""Our int4 kernels (compress.quantize.kernels.int4_matmul) against gemlite's and the bf16 weight with cuBLAS, at the
shapes the packed runtime runs, and the table of our kernels' fastest settings for this GPU.

    python eval/tune_int4.py --out-table compress/quantize/int4_tilings/h200.json \
        --out eval/results/tune_int4_h200.json

For every 4-bit Linear shape of a Llama-2-7B-shape model (fused q/k/v and gate/up, before and after 25 % pruning;
g128 symmetric and g64 asymmetric) and each row count (1: decode at batch 1; 16 and 64: batches 16 and 64), it times
every setting in kernels.GEMV_TILINGS / MM_TILINGS, checks each output against the dequantized weight, and times gemlite
(with our tuned gemlite table) and cuBLAS on the same input. Each time is one call's share of a CUDA graph that calls
the kernel on enough copies of the weight to exceed the L2 cache, as a decode step does (it reads 3-13 GB of weights,
so no weight is in the 60 MB L2 when its Linear runs, and a graph replaying one Linear would read it from L2; a graph
also leaves out the Python launch cost, as the compiled decode step does)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import LLAMA2_7B, _int4  # noqa: E402

from compress.quantize import kernels  # noqa: E402


def compile_settings(work: tuple) -> int:
    """Compile a share of the settings in a worker process (Triton keeps the binaries in its on-disk cache), on small
    tensors whose sizes have the real shapes' divisibility, so the timing process finds every kernel compiled."""
    tilings, group, has_zero, rows = work
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    words = torch.randint(-2**31, 2**31 - 1, (256, 512), device="cuda", dtype=torch.int32)
    scales = torch.ones(256, 4096 // group, device="cuda", dtype=torch.bfloat16)
    zeros = scales * 8 if has_zero else None
    out = torch.empty(rows, 256, device="cuda", dtype=torch.bfloat16)
    kernels.reserve_int4_workspace(x.device, 256)
    compiled = 0
    for tiling in tilings:
        try:
            kernels._launch(tiling, x, words, scales, zeros, 8.0, group, out)
            compiled += 1
        except Exception:  # noqa: BLE001 -- reported when the timing process meets it
            pass
    torch.cuda.synchronize()
    return compiled


def precompile(grids, rows_list, workers: int) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    work = []
    for group, sym in sorted({(g, s) for _, g, s in grids}):
        for rows in sorted({min(r, 16) for r in rows_list}):  # every row count above 1 runs the same kernels
            tilings = kernels.GEMV_TILINGS if rows == 1 else kernels.MM_TILINGS
            work += [(tilings[i::workers], group, not sym, rows) for i in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        print(f"compiled {sum(pool.map(compile_settings, work))} kernels", flush=True)


def chain_us(calls: list) -> float:
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
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2] * 1e3 / len(calls)


def weight_bytes(in_features: int, out_features: int, group: int, sym: bool) -> int:
    groups = in_features // group * out_features
    return in_features * out_features // 2 + groups * 2 * (1 if sym else 2)


def copies_for(size: int) -> int:
    return max(2, -(-256 * 2**20 // size))


def tune_shape(linear, x: torch.Tensor, reference: torch.Tensor, candidates, copies: int):
    weights = [(linear.words.clone(), linear.scales.clone(), None if linear.zeros is None else linear.zeros.clone())
               for _ in range(copies)]
    out = torch.empty(x.shape[0], linear.out_features, dtype=x.dtype, device=x.device)
    best, best_us, failed = None, float("inf"), 0
    for tiling in candidates:
        calls = [lambda words=words, scales=scales, zeros=zeros, tiling=tiling: kernels._launch(
            tiling, x, words, scales, zeros, 8.0, linear.group_size, out) for words, scales, zeros in weights]
        try:
            calls[0]()
            error = ((out.float() - reference).norm() / reference.norm()).item()
            if not error < 1e-2:
                failed += 1
                print(f"  {tiling}: wrong result (relative error {error:.3g})", flush=True)
                continue
            us = chain_us(calls)
        except Exception as exception:  # noqa: BLE001 -- a setting this GPU cannot run (registers, shared memory)
            failed += 1
            print(f"  {tiling}: {type(exception).__name__}: {str(exception)[:100]}", flush=True)
            continue
        if us < best_us:
            best, best_us = tiling, us
    return (dataclasses.asdict(best) if best else None), best_us, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,16,64")
    parser.add_argument("--shapes", help="comma-separated Linear names (default: all)")
    parser.add_argument("--workers", type=int, default=12, help="processes compiling the settings first")
    parser.add_argument("--budget", type=float, default=520, help="seconds; what is left after it is skipped")
    parser.add_argument("--out-table", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import gemlite

    start = time.time()
    names = args.shapes.split(",") if args.shapes else list(LLAMA2_7B)
    grids = [(name, 128, True) for name in names] + [(name, 64, False) for name in names if "pruned" not in name]
    table_path = Path(args.out_table)
    table = json.loads(table_path.read_text()) if table_path.is_file() else {}
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "gemlite": gemlite.__version__,
               "command": "python eval/tune_int4.py " + " ".join(
                   a for a in sys.argv[1:] if not a.startswith(("/", "OUT"))),
               "rows": [], "skipped": []}
    rows_list = [int(r) for r in args.rows.split(",")]
    precompile(grids, rows_list, args.workers)
    results["compile_seconds"] = round(time.time() - start, 1)
    for name, group, sym in grids:
        in_features, out_features = LLAMA2_7B[name]
        size = weight_bytes(in_features, out_features, group, sym)
        copies = copies_for(size)
        linear, weight = _int4(in_features, out_features, group, sym, "cuda", "triton")
        dequantized = linear.dequantized_weight()
        lites = [_int4(in_features, out_features, group, sym, "cuda", "gemlite")[0].gemlite for _ in range(copies)]
        denses = [dequantized.clone() for _ in range(copies_for(in_features * out_features * 2))]
        for rows in rows_list:
            if time.time() - start > args.budget:
                results["skipped"].append(f"{name} g{group} rows {rows}")
                continue
            x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
            reference = x.float() @ dequantized.float().T
            candidates = kernels.GEMV_TILINGS if rows == 1 else kernels.MM_TILINGS
            best, ours_us, failed = tune_shape(linear, x, reference, candidates, copies)
            gemlite_us = chain_us([lambda lite=lite: lite(x) for lite in lites])
            bf16_us = chain_us([lambda dense=dense: F.linear(x, dense) for dense in denses])
            row = {"shape": name, "in": in_features, "out": out_features, "group": group, "sym": sym, "rows": rows,
                   "ours_us": round(ours_us, 2), "gemlite_us": round(gemlite_us, 2), "bf16_us": round(bf16_us, 2),
                   "ours_vs_gemlite": round(gemlite_us / ours_us, 3), "ours_vs_bf16": round(bf16_us / ours_us, 3),
                   "ours_tb_per_s": round(size / ours_us / 1e6, 3),
                   "gemlite_tb_per_s": round(size / gemlite_us / 1e6, 3),
                   "bf16_tb_per_s": round(in_features * out_features * 2 / bf16_us / 1e6, 3),
                   "copies": copies, "tried": len(candidates), "failed": failed, "best": best}
            results["rows"].append(row)
            if best:
                table[kernels.int4_shape_key(rows, out_features, in_features, group, not sym)] = best
            print(json.dumps({k: v for k, v in row.items() if k != "best"}), "best", best, flush=True)
            table_path.parent.mkdir(parents=True, exist_ok=True)
            table_path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
            Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        del linear, weight, dequantized, lites, denses
    results["seconds"] = round(time.time() - start, 1)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

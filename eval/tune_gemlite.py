"""gemlite's kernel settings for one GPU, chosen by measurement at the shapes the packed runtime runs.

    python eval/tune_gemlite.py --out-config compress/quantize/gemlite_configs/h200.json \
        --out eval/results/tune_gemlite_h200.json

gemlite ships tuned settings per GPU (gemlite/configs/h100.json, a100.json, ...) and picks them by the device's name;
for a GPU it has none for (the H200) every shape falls back to its small "fast" autotune list at run time. A full
"max" autotune is thousands of settings per shape (hours). This script takes the middle road: for every 4-bit
Linear shape of a Llama-2-7B-shape model (fused q/k/v and gate/up, before and after 25 % pruning; g128 symmetric and
g64 asymmetric) and each row count the runtime hands gemlite (1: its GEMV, 16: its split-K GEMM, 64: its GEMM), it
times gemlite's own "fast" choice and every setting gemlite's shipped tables chose for any NVIDIA GPU at that kernel and
row bucket, each as CUDA-graph replays, checks each output against the dequantized weight, and keeps the fastest. The
result is written in gemlite's own cache format, which compress.quantize.packed loads for this GPU."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import LLAMA2_7B, _int4, _time_cuda  # noqa: E402

ROWS = (1, 16, 64)
# gemlite's kernel for a row count and the rows of its shipped tables whose settings are candidates there
CANDIDATE_BUCKETS = {"GEMV_REVSPLITK": {1}, "GEMM_SPLITK": {8, 16, 24}, "GEMM": {64, 96, 128}}


def kernels_of(matmul_type: str) -> list:
    from gemlite.triton_kernels import gemm_kernels, gemm_splitK_kernels, gemv_revsplitK_kernels

    return {"GEMV_REVSPLITK": gemv_revsplitK_kernels.gemv_revsplitK, "GEMM_SPLITK": gemm_splitK_kernels.gemm_splitK,
            "GEMM": gemm_kernels.gemm}[matmul_type].kernel


def candidates(matmul_type: str, pool: Path | None = None) -> list[dict]:
    """Every distinct setting gemlite's shipped NVIDIA tables chose for this kernel at nearby rows, 4-bit weights (or,
    with `pool`, those of one table: the winners of an earlier run, to tune more shapes quickly)."""
    import gemlite

    seen, found = set(), []
    tables = [pool] if pool else sorted((Path(gemlite.__file__).parent / "configs").glob("*.json"))
    for table in tables:
        if "mi300" in table.name:  # AMD: other warp sizes
            continue
        for key, setting in json.loads(table.read_text()).get(matmul_type, {}).items():
            rows, _, _, _, elements_per_sample, _ = eval(key)  # noqa: S307 -- gemlite writes str(tuple)
            text = json.dumps(setting, sort_keys=True)
            if elements_per_sample == 8 and rows in CANDIDATE_BUCKETS[matmul_type] and text not in seen:
                seen.add(text)
                found.append(setting)
    return found


def clear_autotune(matmul_type: str) -> None:
    for kernel in kernels_of(matmul_type):
        kernel.cache.clear()


def default_choice(matmul_type: str) -> tuple[str, dict]:
    """(gemlite's cache signature, the setting its own autotune chose) after one call with an empty cache."""
    from gemlite.triton_kernels.utils import get_closest_m

    for kernel in kernels_of(matmul_type):
        for key, config in kernel.cache.items():
            signature = (get_closest_m(key[0]), *key[1:6])
            return str(tuple(signature)), config.all_kwargs()
    raise RuntimeError(f"gemlite's {matmul_type} kernel ran but its autotune cache is empty")


def tune_one(linear, rows: int, reference: torch.Tensor, x: torch.Tensor, pool: Path | None) -> dict:
    from gemlite import core

    matmul_type = core.get_matmul_type(rows, 4)
    table = core.GEMLITE_TRITON_CONFIG_CACHE.setdefault(matmul_type, {})
    clear_autotune(matmul_type)
    with torch.inference_mode():
        linear(x)
    signature, default = default_choice(matmul_type)
    table.pop(signature, None)
    default_seconds = _time_cuda(lambda: linear(x))
    best_seconds, best = default_seconds, default
    tried = failed = 0
    for setting in candidates(matmul_type, pool):
        table[signature] = setting
        clear_autotune(matmul_type)
        try:
            with torch.inference_mode():
                out = linear(x)
            error = ((out.float() - reference).norm() / reference.norm()).item()
            if not error < 1e-2:  # a setting that computes something else (never seen; guards the table)
                failed += 1
                continue
            seconds = _time_cuda(lambda: linear(x))
        except Exception:  # noqa: BLE001 -- a setting this GPU cannot run (shared memory, registers)
            failed += 1
            continue
        tried += 1
        if seconds < best_seconds:
            best_seconds, best = seconds, setting
    table[signature] = best
    clear_autotune(matmul_type)
    return {"matmul_type": matmul_type, "signature": signature, "default_us": round(default_seconds * 1e6, 2),
            "best_us": round(best_seconds * 1e6, 2), "speedup": round(default_seconds / best_seconds, 3),
            "tried": tried, "failed": failed, "best": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--shapes", help="comma-separated Linear names (default: all)")
    parser.add_argument("--skip", type=Path, help="an earlier run's measurements: its rows are not measured again")
    parser.add_argument("--pool", type=Path, help="candidates from this gemlite table only (an earlier run's)")
    parser.add_argument("--budget", type=float, default=540, help="seconds; what is left after it is skipped")
    parser.add_argument("--out-config", required=True, help="gemlite cache JSON (merged into an existing one)")
    parser.add_argument("--out", required=True, help="the measurements")
    args = parser.parse_args()
    import gemlite

    start = time.time()
    names = args.shapes.split(",") if args.shapes else list(LLAMA2_7B)
    grids = [(name, 128, True) for name in names] + [(name, 64, False) for name in names if "pruned" not in name]
    done = {(row["shape"], row["group"], row["rows"]) for row in json.loads(args.skip.read_text())["rows"]} \
        if args.skip else set()
    config_path = Path(args.out_config)
    shipped = json.loads(config_path.read_text()) if config_path.is_file() else {}
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "gemlite": gemlite.__version__,
               "command": "python " + " ".join(sys.argv), "rows": [], "skipped": []}
    for name, group, sym in grids:
        in_features, out_features = LLAMA2_7B[name]
        linear, weight = _int4(in_features, out_features, group, sym, "cuda", "gemlite")
        dequantized = linear.dequantized_weight().float()
        for rows in map(int, args.rows.split(",")):
            if (name, group, rows) in done:
                continue
            if time.time() - start > args.budget:
                results["skipped"].append(f"{name} g{group} rows {rows}")
                continue
            x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
            reference = x.float() @ dequantized.T
            row = {"shape": name, "in": in_features, "out": out_features, "group": group, "sym": sym, "rows": rows,
                   **tune_one(linear, rows, reference, x, args.pool)}
            results["rows"].append(row)
            shipped.setdefault(row["matmul_type"], {})[row["signature"]] = row["best"]
            print(json.dumps({k: v for k, v in row.items() if k != "best"}), flush=True)
            config_path.parent.mkdir(parents=True, exist_ok=True)
            config_path.write_text(json.dumps(shipped, indent=1, sort_keys=True) + "\n")
            Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        del linear, weight, dequantized
    results["seconds"] = round(time.time() - start, 1)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

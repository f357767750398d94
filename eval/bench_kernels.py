"""Which kernel runs a quantized Linear fastest, by row count: the measurement behind compress.quantize.packed's
choices.

    python eval/bench_kernels.py --device cuda --out eval/results/bench_kernels_h200.json   # Llama-2-7B shapes
    python eval/bench_kernels.py --device cpu --out eval/results/bench_kernels_cpu.json     # SmolLM2 shapes, 2 cores

Candidates, all on the same random grid at each (Linear shape, rows): bf16 F.linear (cuBLAS / oneDNN) as the reference;
int4 tinygemm (aten._weight_int4pack_mm, torchao's int4 weight-only kernel); int4 gemlite with its own dispatch
(GEMV / split-K GEMV / split-K GEMM / GEMM by rows); int4 dequantize-then-GEMM (our fused dequantize kernel + cuBLAS,
vLLM's rule for large inputs); FP8 W8A8 by torch._scaled_mm (per-token x per-row scales, fast accumulation, the
activation quantization included). CUDA timings are CUDA-graph replays (launch costs out,
as in the compiled decode step) where the candidate can be captured, else plain replays; CPU timings the median of
repeated calls. The crossover row count per shape is where dequantize-then-GEMM overtakes the low-bit kernel."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compress.quantize import packed  # noqa: E402
from compress.quantize.grid import WeightQuant, minmax_qparams, weight_args  # noqa: E402

# (in, out) of each Linear the packed runtime runs: fused q/k/v and gate/up, and the same after 25 % pruning
LLAMA2_7B = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096),
             "pruned qkv": (4096, 9216), "pruned o": (3072, 4096), "pruned gate_up": (4096, 16640),
             "pruned down": (8320, 4096), "head": (4096, 32000)}  # head: the output head, when a recipe quantizes it
SMOLLM2 = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576)}


def _time_cuda(function) -> float:
    import triton.testing

    with torch.inference_mode():
        function()
        torch.cuda.synchronize()
        try:
            return triton.testing.do_bench_cudagraph(function, rep=30) / 1e3
        except Exception:  # noqa: BLE001 -- not capturable: plain replays
            return triton.testing.do_bench(function, rep=30) / 1e3


def _time_cpu(function, repeats: int = 7) -> float:
    with torch.inference_mode():
        function()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _int4(in_features, out_features, group, sym, device, backend):
    weight = torch.randn(out_features, in_features, device=device)
    args = weight_args(4, group, sym=sym)
    scale, zero = minmax_qparams(weight, args)
    quant = WeightQuant(args, scale.to(torch.bfloat16), zero)
    codes = packed.integer_codes(weight, quant)
    return packed.Int4Linear(codes, quant.scale, zero, group, None, quant, backend), weight


def shape_rows(name, in_features, out_features, rows_list, device, group, sym) -> list[dict]:
    timer = _time_cuda if device == "cuda" else _time_cpu
    dense = torch.nn.Linear(in_features, out_features, bias=False, device=device, dtype=torch.bfloat16)
    dense32 = torch.nn.Linear(in_features, out_features, bias=False, device=device) if device == "cpu" else None
    tiny = _int4(in_features, out_features, group, sym, device, "tinygemm")[0]
    lite = _int4(in_features, out_features, group, sym, device, "gemlite")[0] if device == "cuda" else None
    fp8 = None
    if device == "cuda":
        from compress.quantize.fp8 import ACTIVATION_ARGS, E4M3, WEIGHT_ARGS

        weight = torch.randn(out_features, in_features, device=device)
        scale = weight.abs().amax(1, keepdim=True) / 448
        fp8 = packed.FP8Linear((weight / scale).to(E4M3), scale, None,
                               WeightQuant(WEIGHT_ARGS, scale, None, ACTIVATION_ARGS), torch.bfloat16)
    rows_out = []
    for rows in rows_list:
        x = torch.randn(rows, in_features, device=device, dtype=torch.bfloat16)
        row = {"linear": name, "in": in_features, "out": out_features, "rows": rows, "group": group, "sym": sym}
        candidates = {"bf16": lambda: dense(x), "int4 tinygemm": lambda: tiny(x)}
        if dense32 is not None:
            x32 = x.float()
            candidates["float32"] = lambda: dense32(x32)
            candidates["int4 dequantize+GEMM"] = lambda: torch.nn.functional.linear(x, tiny.dequantized_weight())
            candidates["int4 tinygemm"] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, tiny.packed, group, tiny.scales_and_offsets)
        if lite is not None:
            candidates["int4 gemlite"] = lambda: lite.gemlite(x)
            candidates["int4 dequantize+GEMM"] = lambda: x @ lite.dequantized_weight().T
            candidates["int4 dequantize alone"] = lambda: lite.dequantized_weight()
        if fp8 is not None:
            def scaled_mm():
                x_fp8, x_scale = packed._quantize_activation(x)
                return torch._scaled_mm(x_fp8, fp8.weight_fp8.T, scale_a=x_scale, scale_b=fp8.scales.T,
                                        out_dtype=torch.bfloat16, use_fast_accum=True)
            candidates["fp8 _scaled_mm"] = scaled_mm
        for label, function in candidates.items():
            try:
                row[f"{label} us"] = round(timer(function) * 1e6, 1)
            except Exception as error:  # noqa: BLE001 -- a candidate that cannot run this shape says why
                row[f"{label} error"] = f"{type(error).__name__}: {str(error)[:160]}"
        print(json.dumps(row), flush=True)
        rows_out.append(row)
    return rows_out


def crossovers(rows: list[dict], low_bit: str) -> dict:
    """Per shape, the smallest row count from which dequantize-then-GEMM is faster than `low_bit`."""
    found = {}
    for row in rows:
        fast, dequant = row.get(f"{low_bit} us"), row.get("int4 dequantize+GEMM us")
        key = f"{row['linear']} g{row['group']}{'' if row['sym'] else ' asym'}"
        if fast and dequant and dequant < fast and key not in found:
            found[key] = row["rows"]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", default=None, help="comma-separated row counts")
    parser.add_argument("--budget", type=float, default=420, help="seconds; shapes left after it are skipped")
    parser.add_argument("--shapes", help="comma-separated Linear names (default: all)")
    parser.add_argument("--out")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    shapes = LLAMA2_7B if cuda else SMOLLM2
    if args.shapes:
        shapes = {name: shapes[name] for name in args.shapes.split(",")}
    rows_list = [int(r) for r in (args.rows or ("1,16,64,128,256,512,2048" if cuda else "1,8,32,64,128,256,512")
                                  ).split(",")]
    settings = [(128, True)] if cuda else [(64, True)]
    start, rows = time.time(), []
    for name, (in_features, out_features) in shapes.items():
        for group, sym in settings + ([(64, False)] if name == "gate_up" else []):
            if time.time() - start > args.budget:
                break
            rows += shape_rows(name, in_features, out_features, rows_list, args.device, group, sym)
    result = {"device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
              "torch": torch.__version__, "rows": rows,
              "crossover_rows": crossovers(rows, "int4 gemlite" if cuda else "int4 tinygemm"),
              "seconds": round(time.time() - start, 1)}
    if cuda:
        gemlite = packed.gemlite_module()
        result["gemlite"] = getattr(gemlite, "__version__", None)
        result["gemlite_autotune"] = "fast (gemlite's default)"
    print(json.dumps(result["crossover_rows"], indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Compressed models run compressed: every variant of a Llama-2-7B-shape model (random weights: speed and memory do not
depend on their values) through the same harness (compress.bench.bench_model) in one invocation.

    python eval/bench_inference.py --device cuda --out eval/results/bench_inference_7b_h200.json [--compile]
    python eval/bench_inference.py --device cpu --shape smollm2 --out ...      # the CPU smoke test

Variants: base bf16; pruned 25 % (l2: no data needed; 24 heads do not divide Llama-2's 4096 hidden size, so LlamaConfig
refuses a uniform stock config and the widths are per layer, all alike, as compress.load reads them); W4 g128 (RTN)
on tinygemm; pruned + W4; FP8 W8A8; and W4 run dequantized (what transformers'
from_pretrained gives today), for the memory comparison. Each is built in memory, packed with compress.quantize.packed,
measured, and freed before the next. The physical limit is reported beside each: bytes of weights in memory / GPU
memory bandwidth = the fastest batch-1 decode step.

`--kernels` times the Linears alone first (each shape of the base and the pruned model, at 1 and 16 rows; bf16
F.linear and tinygemm; CUDA-graph replays, so launch costs are out) and reports the bandwidth each reaches."""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import LLAMA2_7B, random_llama  # noqa: E402

import compress  # noqa: E402
from compress.bench import bench_model  # noqa: E402
from compress.quantize.packed import pack_model  # noqa: E402

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True)
H200_BANDWIDTH = 4.8e12  # bytes/s, HBM3e


def variant(name: str, shape: dict, dtype: torch.dtype, device: str):
    model = random_llama(shape, dtype, device)
    group = 128 if shape is LLAMA2_7B else 64
    if "pruned" in name:
        compress.prune(model, compress.TaylorPrune(importance="l2", ratio=0.25, uniform=False,
                                                   multiple=128 if shape is LLAMA2_7B else 64), show_progress=False)
    if "W4" in name:
        compress.quantize(model, compress.RTN(bits=4, group_size=group), show_progress=False)
    if "FP8" in name:
        compress.quantize(model, compress.FP8(), show_progress=False)
    notes = [] if "dequantized" in name else pack_model(model)
    return model, notes


def kernel_rows(group: int = 128) -> list[dict]:
    """Microseconds per Linear (CUDA-graph replays) and the bandwidth that is: bf16 and tinygemm."""
    import triton.testing

    from compress.quantize.grid import WeightQuant, fake_quantize, minmax_qparams, weight_args
    from compress.quantize.packed import Int4Linear

    shapes = {"q/k/v/o": (4096, 4096), "gate/up": (4096, 11008), "down": (11008, 4096),
              "pruned q/k/v": (4096, 3072), "pruned o": (3072, 4096), "pruned gate/up": (4096, 8320),
              "pruned down": (8320, 4096)}
    args = weight_args(4, group, sym=True)
    rows = []
    for name, (k, n) in shapes.items():
        linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            scale, zero_point = minmax_qparams(linear.weight, args)
            linear.weight.copy_(fake_quantize(linear.weight, scale, zero_point, args))
            quant = WeightQuant(args, scale, zero_point)
            kernels = {"bf16": linear, "tinygemm": Int4Linear(linear, quant)}
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"linear": name, "in": k, "out": n, "rows": m}
            for label, module in kernels.items():
                with torch.inference_mode():
                    module(x)  # autotuning, outside the graph
                    seconds = triton.testing.do_bench_cudagraph(lambda: module(x), rep=50) / 1e3
                nbytes = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
                row[f"{label}_us"] = round(seconds * 1e6, 1)
                row[f"{label}_GBps"] = round(nbytes / seconds / 1e9)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", choices=["llama2-7b", "smollm2"], default="llama2-7b")
    parser.add_argument("--variants", default="base bf16,pruned 25%,W4 g128,pruned 25% + W4 g128,FP8 W8A8,"
                                              "W4 g128 dequantized")
    parser.add_argument("--kernels", action="store_true", help="time the Linears alone first")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="static KV cache + compiled decode step")
    parser.add_argument("--out")
    args = parser.parse_args()

    shape = LLAMA2_7B if args.shape == "llama2-7b" else SMOLLM2
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    batches = tuple(int(b) for b in args.batches.split(","))
    kernels = kernel_rows() if args.kernels else []
    rows = []
    for name in filter(None, args.variants.split(",")):
        model, notes = variant(name, shape, dtype, args.device)
        if args.device == "cuda":
            torch.cuda.synchronize()
            memory_after_load = torch.cuda.memory_allocated()
        row = {"variant": name, **bench_model(model, batches, args.prompt, args.new, args.prefill, args.repeats,
                                              args.compile), "notes": notes}
        if args.device == "cuda":
            row["gpu_memory_after_load_bytes"] = memory_after_load
            row["bandwidth_limit_tokens_per_s"] = round(H200_BANDWIDTH / row["weight_bytes"], 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    base = rows[0] if rows else {}
    for row in rows:
        if row.get("decode_tokens_per_s") and base.get("decode_tokens_per_s"):
            row["decode_vs_base"] = round(row["decode_tokens_per_s"] / base["decode_tokens_per_s"], 3)
        row["weight_bytes_vs_base"] = round(row["weight_bytes"] / base["weight_bytes"], 3)
        row["prefill_vs_base"] = round(base["prefill_ms"] / row["prefill_ms"], 3)
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "shape": args.shape, "compile": args.compile, "batches": list(batches),
              "prompt": args.prompt, "new": args.new, "prefill": args.prefill, "kernels": kernels, "variants": rows}
    print(json.dumps({r["variant"]: {k: r.get(k) for k in ("decode_tokens_per_s", "decode_vs_base",
                                                             "weight_bytes_vs_base", "prefill_vs_base")}
                      for r in rows}, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

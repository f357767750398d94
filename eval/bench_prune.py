"""Structured pruning: speed at Llama-2-7B shape, and quality per importance on SmolLM2 with LoRA recovery.

Speed (importance + surgery), parameters and forward latency before/after, at Llama-2-7B shape (random weights,
random-token calibration, LLM-Pruner's 10 x 128 samples, layers [4, 30)) on one GPU:
    python eval/bench_prune.py --model llama2-7b-shape --device cuda --importance element1,element2

Quality on SmolLM2-135M: WikiText-2 perplexity before pruning, after pruning and after LoRA recovery, for each
importance at equal settings (ratio 0.25 on layers [4, 28), the analogue of LLM-Pruner's 4-30 of 32):
    python eval/bench_prune.py --model smollm2-135m --importance element1,element2,vector,l2,random \\
        --recover-steps 300 --out eval/results/prune_smollm2.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import LLAMA2_7B, random_llama, random_tokens, timed  # noqa: E402

import compress  # noqa: E402
from compress.data import calibration_batches  # noqa: E402
from compress.training import training_examples  # noqa: E402

GIB = 2**30


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def forward_ms(model, tokens: int, repeats: int = 10) -> float:
    """Median wall time of one forward over [1, tokens] (a prefill), after a warm-up."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama2-7b-shape", help="llama2-7b-shape or a compress model source")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--importance", default="element1", help="comma-separated")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--layers", default=None, help="start,end; default 4,30 at 7B shape, 4,28 for SmolLM2")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--latency-tokens", type=int, default=None, help="default 2048 on cuda, 512 on cpu")
    parser.add_argument("--recover-steps", type=int, default=0, help="LoRA recovery steps after each pruning")
    parser.add_argument("--recover-batch", type=int, default=8)
    parser.add_argument("--recover-seq-len", type=int, default=256)
    parser.add_argument("--ppl-tokens", type=int, default=None, help="default: the whole WikiText-2 test set")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    latency_tokens = args.latency_tokens or (2048 if args.device.startswith("cuda") else 512)
    shape = args.model == "llama2-7b-shape"
    start, end = map(int, (args.layers or ("4,30" if shape else "4,28")).split(","))

    if shape:
        model, tokenizer = random_llama(LLAMA2_7B, getattr(torch, args.dtype), args.device), None
        ids = random_tokens(args.samples, args.seq_len, model.config.vocab_size)
        pristine = None  # the values do not matter for speed; a copy would double memory
    else:
        model, tokenizer = compress.load_model(args.model, args.dtype, args.device)
        ids = calibration_batches(tokenizer, "wikitext2-valid", args.samples, args.seq_len, seed=0)
        pristine = copy.deepcopy(model).cpu()
    protocol = compress.Perplexity(seq_len=512, max_tokens=args.ppl_tokens, batch_size=8)

    def ppl(m):
        if tokenizer is None:
            return None
        return compress.perplexity(m, tokenizer, protocol, show_progress=False)["perplexity"]

    base = {"importance": "base", "params": params(model), "forward_ms": forward_ms(model, latency_tokens),
            "perplexity": ppl(model)}
    print(json.dumps(base), flush=True)
    results = [base]
    for importance in args.importance.split(","):
        if pristine is not None:
            model = copy.deepcopy(pristine).to(args.device)
        elif results[1:]:
            model = random_llama(LLAMA2_7B, getattr(torch, args.dtype), args.device)
        config = compress.TaylorPrune(importance=importance, ratio=args.ratio, layers=(start, end))
        torch.manual_seed(0)
        model, seconds, peak = timed(lambda model=model, config=config: compress.prune(model, config, ids,
                                                                                   show_progress=False))
        row = {"importance": importance, "prune_seconds": round(seconds, 2),
               "peak_cuda_gib": round(peak / GIB, 2) if peak else None, "params": params(model),
               "forward_ms": forward_ms(model, latency_tokens), "perplexity": ppl(model)}
        if args.recover_steps and tokenizer is not None:
            recovery = compress.LoRARecovery(steps=args.recover_steps, batch_size=args.recover_batch,
                                             seq_len=args.recover_seq_len)
            windows = training_examples(tokenizer, recovery.data, recovery.seq_len)
            model, seconds, _ = timed(lambda model=model, recovery=recovery, windows=windows: compress.finetune(
                model, recovery, windows, show_progress=False))
            row.update(recover_seconds=round(seconds, 1), recovered_perplexity=ppl(model))
        results.append(row)
        print(json.dumps(row), flush=True)
        del model
        gc.collect()  # transformers models hold reference cycles: free the pruned model before the next one
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()

    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{os.cpu_count()} CPU cores"
    print(f"\n{args.model}, ratio {args.ratio} on layers [{start}, {end}), {args.samples} x {args.seq_len} "
          f"calibration, {where}, {args.dtype}; forward = one [1, {latency_tokens}] prefill\n")
    print("| importance | prune s | peak GPU GiB | params | forward ms | ppl after pruning | recovery s | "
          "ppl after recovery |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        cells = [r["importance"], r.get("prune_seconds", ""), r.get("peak_cuda_gib") or "",
                 f"{r['params'] / 1e6:,.1f} M", f"{r['forward_ms']:.1f}",
                 f"{r['perplexity']:.3f}" if r.get("perplexity") else "", r.get("recover_seconds", ""),
                 f"{r['recovered_perplexity']:.3f}" if r.get("recovered_perplexity") else ""]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "device": where, "results": results}, indent=2))


if __name__ == "__main__":
    main()

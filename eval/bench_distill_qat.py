"""Distillation vs LoRA recovery after pruning, and QAT vs GPTQ at 3 bits, on SmolLM2-135M (WikiText-2 perplexity).

Recovery after 25 % pruning (element1, layers [4, 28)), equal step budget (--steps x --batch x --seq-len tokens):
LoRA recovery alone, distillation from the unpruned model into the full student, and into a LoRA student:
    python eval/bench_distill_qat.py --part recovery --device cuda --steps 300

3-bit g64 weights: RTN, GPTQ (128 x 512 calibration), QAT, and QAT with distillation from the float model:
    python eval/bench_distill_qat.py --part qat --device cuda --steps 300

Perplexity on the whole WikiText-2 test set in 512-token windows unless --ppl-tokens is given.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

import compress
from compress.data import calibration_batches, training_windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["recovery", "qat", "control"], required=True,
                        help="control: the same training of the float model without quantization or pruning, and "
                             "QAT + KD at alpha 0.5, to separate domain adaptation from recovery")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--qat-lr", type=float, default=2e-5)
    parser.add_argument("--distill-lr", type=float, default=1e-4, help="full-student distillation learning rate")
    parser.add_argument("--ppl-tokens", type=int, default=None)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # speed only: every variant runs under the same setting

    base, tokenizer = compress.load_model(args.model, "float32", args.device)
    protocol = compress.Perplexity(seq_len=512, max_tokens=args.ppl_tokens, batch_size=8)
    windows = training_windows(tokenizer, "wikitext2-valid", args.seq_len)
    budget = dict(steps=args.steps, batch_size=args.batch, seq_len=args.seq_len)
    results, peaks = [], []

    def record(name: str, model, seconds: float | None = None, **extra) -> None:
        ppl = compress.perplexity(model, tokenizer, protocol, show_progress=False)["perplexity"]
        results.append({"variant": name, "perplexity": ppl, "seconds": seconds,
                        "peak_cuda_gib": peaks[-1] if seconds is not None and peaks else None, **extra})
        print(json.dumps(results[-1]), flush=True)

    def timed(fn):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = fn()
        peaks.append(round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None)
        return out, round(time.perf_counter() - start, 1)

    record("base", base)
    if args.part == "recovery":
        ids = calibration_batches(tokenizer, "wikitext2-valid", 10, 128, seed=0)
        pruned = compress.prune(copy.deepcopy(base), compress.TaylorPrune(layers=(4, 28)), ids, show_progress=False)
        record("pruned 25 % (element1)", pruned)
        variants = {
            "LoRA recovery (r 8, lr 3e-4)": lambda m: compress.finetune(m, compress.LoRARecovery(**budget), windows,
                                                                        show_progress=False),
            f"distill, full student (T 2, alpha 0.7, lr {args.distill_lr:g})": lambda m: compress.distill(
                m, compress.Distill(lr=args.distill_lr, **budget), windows, base, show_progress=False),
            "distill, LoRA student (r 8, T 2, alpha 0.7, lr 3e-4)": lambda m: compress.distill(
                m, compress.Distill(lr=3e-4, lora={"r": 8}, **budget), windows, base, show_progress=False),
        }
        for name, run in variants.items():
            model, seconds = timed(lambda: run(copy.deepcopy(pruned)))
            record(name, model, seconds)
            del model
    elif args.part == "control":
        grid = dict(bits=args.bits, group_size=args.group_size)
        # alpha 0: plain CE, every weight trained
        full = compress.Distill(lr=args.qat_lr, kd=compress.KD(alpha=0.0), **budget)
        model, seconds = timed(lambda: compress.distill(copy.deepcopy(base), full, windows, base, show_progress=False))
        record(f"float model, same training as QAT (CE, lr {args.qat_lr:g}), no quantization", model, seconds)
        config = compress.QAT(**grid, **budget, lr=args.qat_lr, kd=compress.KD(teacher="base", alpha=0.5))
        model, seconds = timed(lambda: compress.quantize(copy.deepcopy(base), config, train_data=windows, teacher=base,
                                                         show_progress=False))
        record(f"QAT W{args.bits} g{args.group_size} + KD from base, alpha 0.5", model, seconds)
    else:
        grid = dict(bits=args.bits, group_size=args.group_size)
        record(f"RTN W{args.bits} g{args.group_size}", compress.quantize(copy.deepcopy(base), compress.RTN(**grid)))
        calibration = calibration_batches(tokenizer, "wikitext2-valid", 128, 512, seed=0)
        model, seconds = timed(lambda: compress.quantize(copy.deepcopy(base), compress.GPTQ(**grid), calibration,
                                                         show_progress=False))
        record(f"GPTQ W{args.bits} g{args.group_size}", model, seconds)
        for teacher in (None, base):
            config = compress.QAT(**grid, **budget, lr=args.qat_lr, kd=compress.KD(teacher="base") if teacher else None)
            model, seconds = timed(lambda: compress.quantize(copy.deepcopy(base), config, train_data=windows,
                                                             teacher=teacher, show_progress=False))
            record(f"QAT W{args.bits} g{args.group_size}{' + KD from base' if teacher else ''}", model, seconds)
        base_ppl, gptq_ppl = results[0]["perplexity"], results[2]["perplexity"]
        for row in results[3:]:
            row["recovered_of_gptq_loss"] = (gptq_ppl - row["perplexity"]) / (gptq_ppl - base_ppl)

    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{os.cpu_count()} CPU cores"
    print(f"\n{args.model} fp32, {where}; training {args.steps} steps of {args.batch} x {args.seq_len} tokens\n")
    print("| variant | WikiText-2 ppl | train seconds | peak GPU GiB |\n|---|---:|---:|---:|")
    for r in results:
        recovered = r.get("recovered_of_gptq_loss")
        extra = f" ({recovered:.0%} of GPTQ's loss recovered)" if recovered is not None else ""
        print(f"| {r['variant']} | {r['perplexity']:.3f}{extra} | {r['seconds'] or ''} | {r['peak_cuda_gib'] or ''} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "device": where, "results": results}, indent=2))


if __name__ == "__main__":
    main()

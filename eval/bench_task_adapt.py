"""What task adaptation buys: SmolLM2 zero-shot, then LoRA on the RTE + politeness train splits (the tasks' own
prompts, loss on the answer tokens) for each budget, scored on RTE validation and the politeness test split.

    python eval/bench_task_adapt.py --device cuda --steps 150,300,600 --out eval/results/task_adapt_smollm2_h100.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import compress
from compress.config import LoRA, LoRARecovery
from compress.evaluate import evaluate
from compress.training import training_examples


def scores(model, tokenizer) -> dict:
    results = evaluate(model, tokenizer, ["rte", "politeness"], show_progress=False)
    return {task: {"accuracy": r["accuracy"], "stderr": r["stderr"], "majority": r["majority_baseline"],
                   "f1": {label: v["f1"] for label, v in r["per_label"].items()}, "eval_seconds": r["seconds"]}
            for task, r in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", default="150")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    base, tokenizer = compress.load_model(args.model, device=args.device)
    rows = [{"budget": "zero-shot", **scores(base, tokenizer)}]
    print(json.dumps(rows[-1]), flush=True)
    for steps in map(int, args.steps.split(",")):
        config = LoRARecovery(lora=LoRA(r=args.r, alpha=2 * args.r), steps=steps, lr=args.lr, batch_size=8, seq_len=256,
                              data=("politeness-train", "rte-train"))
        torch.manual_seed(0)
        start = time.perf_counter()
        model = compress.finetune(copy.deepcopy(base), config, training_examples(tokenizer, config.data, 256),
                                  show_progress=False)
        rows.append({"budget": config.describe(), "train_seconds": round(time.perf_counter() - start, 1),
                     **scores(model, tokenizer)})
        print(json.dumps(rows[-1]), flush=True)
        del model
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "device": args.device, "torch": torch.__version__,
                                        "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Wall time of the three evals on SmolLM2 (CPU by default), and lm-eval's stock HFLM against our AnswerScorer on
the same tasks: the same accuracies (the per-row predictions are compared), and the time of each.

    python eval/bench_evals.py --out eval/results/evals_smollm2_cpu.json
    python eval/bench_evals.py --model runs/smollm2-135m-4bit-prune25/01-finetune --skip-stock
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import compress
from compress.evaluate import Perplexity, evaluate
from compress.tasks import ChoiceEval


def stock_scorer():
    """lm-eval's HFLM as it ships, in place of ours, for the comparison."""
    from lm_eval.models.huggingface import HFLM

    class Stock(HFLM):
        show_progress = False

    return Stock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--wikitext2-max-tokens", type=int, default=16384)
    parser.add_argument("--skip-stock", action="store_true", help="only time ours")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model, tokenizer = compress.load_model(args.model, device=args.device)
    choice = ChoiceEval(batch_size=args.batch_size)
    wikitext2 = Perplexity(max_tokens=args.wikitext2_max_tokens)

    start = time.perf_counter()
    ours = evaluate(model, tokenizer, ["wikitext2", "rte", "politeness"], wikitext2=wikitext2, choice=choice,
                    show_progress=False)
    total = time.perf_counter() - start
    result = {"model": args.model, "device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "platform": platform.platform(), "three_evals_seconds": round(total, 1),
              "ours": {task: {k: r[k] for k in ("accuracy", "perplexity", "seconds") if k in r}
                       for task, r in ours.items()}}
    print(json.dumps(result, indent=1), flush=True)
    if not args.skip_stock:
        import compress.tasks as tasks

        original = tasks._scorer_class
        tasks._scorer_class = stock_scorer
        try:
            stock = evaluate(model, tokenizer, ["rte", "politeness"], choice=choice, show_progress=False)
        finally:
            tasks._scorer_class = original
        result["stock_hflm"] = {task: {"accuracy": r["accuracy"], "seconds": r["seconds"],
                                       "same_predictions": r["correct"] == ours[task]["correct"]}
                                for task, r in stock.items()}
        print(json.dumps(result["stock_hflm"], indent=1), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

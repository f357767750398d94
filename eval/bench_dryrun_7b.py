"""The headline recipe (recipes/llama2-7b-4bit-prune25.yaml) end to end at Llama-2-7B size on random weights:
its model replaced by `{config: llama2-7b, init: random}` and its budgets shortened, every other setting as the
recipe has it. Proves each step fits the GPU and times it; the accuracy figures of random weights mean nothing.
Rerunning resumes after the last complete step (the pipeline's own resume).

    python eval/bench_dryrun_7b.py --output-dir DRYRUN_DIR --out eval/results/dryrun_7b_h100.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import compress
from compress.models import RandomInit
from compress.steps import spec_of

REPO = Path(__file__).resolve().parent.parent


def dry_run_recipe(path: Path, architecture: str, train_steps: int, limit: int, max_tokens: int,
                   tokenizer: str = "smollm2-135m", tasks: list[str] | None = None) -> compress.Recipe:
    recipe = compress.load_recipe(path)
    steps = []
    for step in recipe.steps:
        config = step.config
        if spec_of(config).trains:  # a training step: shorter, same batch and sequence shapes
            config = config.model_copy(update={"steps": train_steps})
        steps.append(step.model_copy(update={step.kind: config}))
    evals = recipe.eval.model_copy(update={
        "choice": recipe.eval.choice.model_copy(update={"limit": limit}),
        "wikitext2": recipe.eval.wikitext2.model_copy(update={"max_tokens": max_tokens}),
        **({"tasks": tasks} if tasks else {})})
    model = RandomInit(config=architecture, init="random", tokenizer=tokenizer)
    return recipe.model_copy(update={"model": model, "steps": steps,
                                     "eval": evals, "name": f"{recipe.name}-dryrun"})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "llama2-7b-4bit-prune25.yaml"))
    parser.add_argument("--config", default="llama2-7b")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--limit", type=int, default=100, help="rows of RTE and of politeness scored")
    parser.add_argument("--max-tokens", type=int, default=32768, help="WikiText-2 test tokens scored")
    parser.add_argument("--output-dir", default="runs/llama2-7b-dryrun")
    parser.add_argument("--tokenizer", default="smollm2-135m", help="the model source whose tokenizer is used")
    parser.add_argument("--tasks", help="comma-separated evals instead of the recipe's (e.g. wikitext2)")
    parser.add_argument("--out")
    args = parser.parse_args()

    recipe = dry_run_recipe(Path(args.recipe), args.config, args.train_steps, args.limit, args.max_tokens,
                            args.tokenizer, args.tasks.split(",") if args.tasks else None)
    report = compress.run(recipe, output_dir=args.output_dir)
    rows = [{"step": row["step"], "summary": row.get("summary"), "params_b": round(row["params"] / 1e9, 3),
             "step_s": row["seconds"], "eval_s": row.get("eval_seconds"),
             "peak_cuda_gib": round(row.get("peak_cuda_bytes", 0) / 2**30, 2),
             "size_gib": round(row["size_bytes"] / 2**30, 2)} for row in report["steps"]]
    for row in rows:
        print(json.dumps(row))
    if args.out:
        Path(args.out).write_text(json.dumps({
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "recipe": recipe.model_dump(mode="json"), "steps": rows}, indent=1))


if __name__ == "__main__":
    main()

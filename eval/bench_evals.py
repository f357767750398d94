"""Wall and CPU time of the evaluators on SmolLM2, before and after a change, with the numbers they give compared.

The "before" code is compress/tasks.py (and compress/evaluate.py) as committed at --before, read from git and run in
this same process beside the working tree's, in turns (before, after, before, after, ...), so the machine's drift
hits both alike. Every answer's log-likelihood (choice tasks) and the perplexity of each is recorded and
compared; so are the models' inputs: forward passes and the tokens (padding included) run through the model.

eval/results/bench_evals_smollm2_cpu.json gathers these runs' outputs, each with its command:

    python eval/bench_evals.py --threads 1 --repeats 1 --evals rte politeness --out OUT.json      # before/after
    python eval/bench_evals.py --overhead --repeats 5 --threads 1 --evals rte politeness --out OUT.json
    python eval/bench_evals.py [--omp-wait-policy passive] --threads 1 2 --evals wikitext2 \
        --wikitext2-max-tokens 4096 --repeats 2 --out OUT.json                                     # threads, in turns
    python eval/bench_evals.py --dtypes float32 bfloat16 --threads 1 --evals wikitext2 rte          # bf16 vs fp32

and `--stock` adds lm-eval's stock HFLM scoring the choice tasks, the comparison of
eval/results/evals_smollm2_cpu.json (`--stock --evals rte politeness --repeats 1`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "81f4ff1"  # the last commit before the evaluator speed work of issue 31


def module_at(revision: str, path: str, name: str) -> types.ModuleType:
    """The module at `path` as committed at `revision`, loaded under `name` (its own imports are today's)."""
    source = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    module = types.ModuleType(name)
    module.__file__ = str(ROOT / path)  # tasks.py finds eval/tasks/ beside it when not installed
    sys.modules[name] = module
    exec(compile(source, f"{revision}:{path}", "exec"), module.__dict__)
    return module


def stock_scorer():
    """lm-eval's HFLM as it ships, in place of compress's AnswerScorer."""
    from lm_eval.models.huggingface import HFLM

    class Stock(HFLM):
        show_progress = False

    return Stock


def recording(tasks_module, store: dict, dummy: bool = False) -> None:
    """Make the module's scorer record every answer's (log-likelihood, greedy) under its tokens; dummy: answer 0
    without running the model (what remains is lm-eval, the data and the tokenizer)."""
    make = tasks_module._scorer_class

    def scorer_class():
        base = make()

        class Recording(base):
            def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
                if dummy:
                    out = [(0.0, False)] * len(requests)
                else:
                    out = super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
                for (_, context, continuation), answer in zip(requests, out):
                    store[(tuple(context), tuple(continuation))] = answer
                return out

        return Recording

    tasks_module._scorer_class = scorer_class


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--evals", nargs="+", default=["wikitext2", "rte", "politeness"])
    parser.add_argument("--before", default=BEFORE, help="git revision of the code timed as 'before'")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", help="torch threads; several: compared in turns (after's "
                                                                   "code)")
    parser.add_argument("--dtypes", nargs="+", help="several: compared in turns (after's code) against the first")
    parser.add_argument("--omp-wait-policy", choices=["active", "passive"])
    parser.add_argument("--overhead", action="store_true", help="the choice tasks without the model's forward")
    parser.add_argument("--stock", action="store_true", help="also lm-eval's stock HFLM scoring the choice tasks "
                                                             "(after's code otherwise), against which AnswerScorer "
                                                             "was measured: eval/results/evals_smollm2_cpu.json")
    parser.add_argument("--wikitext2-max-tokens", type=int, default=16384)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.omp_wait_policy:  # read once, when torch's OpenMP starts: before torch is imported
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()

    import torch

    import compress
    from compress.config.evals import ChoiceEval, Perplexity

    # (compress.evaluate as an attribute is the function: the package exports it under the module's name)
    evaluate_after = importlib.import_module("compress.evaluate")
    tasks_after = importlib.import_module("compress.tasks")

    choice_tasks = [e for e in args.evals if e != "wikitext2"]
    if args.overhead:
        args.evals = choice_tasks
    tasks_before = module_at(args.before, "compress/tasks.py", "compress_tasks_before")
    evaluate_before = module_at(args.before, "compress/evaluate.py", "compress_evaluate_before")
    dtypes = args.dtypes or ["float32"]
    models = {dtype: compress.load_model(args.model, dtype=dtype, device="cpu") for dtype in dtypes}
    counts = {"forwards": 0, "tokens": 0}
    for model, _ in models.values():
        forward = model.forward

        def counted(*a, _forward=forward, **k):
            counts["forwards"] += 1
            counts["tokens"] += k["input_ids"].numel() if "input_ids" in k else a[0].numel()
            return _forward(*a, **k)

        model.forward = counted

    # the variants run in turns: (label, tasks module, evaluate module, dtype, threads)
    threads = args.threads or [torch.get_num_threads()]
    if len(threads) > 1 or len(dtypes) > 1:
        variants = [(f"{dtype} {n} threads", tasks_after, evaluate_after, dtype, n)
                    for dtype in dtypes for n in threads]
    else:
        variants = [("before", tasks_before, evaluate_before, dtypes[0], threads[0]),
                    ("after", tasks_after, evaluate_after, dtypes[0], threads[0])]
    if args.stock:
        variants.append(("stock HFLM", tasks_after, evaluate_after, dtypes[0], threads[0]))
    choice = ChoiceEval()
    wikitext2 = Perplexity(max_tokens=args.wikitext2_max_tokens)
    runs: dict = {label: {e: [] for e in args.evals} for label, *_ in variants}
    numbers: dict = {label: {} for label, *_ in variants}
    for repeat in range(args.repeats):
        for evaluation in args.evals:
            for label, tasks_module, evaluate_module, dtype, n_threads in variants:
                torch.set_num_threads(n_threads)
                model, tokenizer = models[dtype]
                answers: dict = {}
                if label == "stock HFLM" and evaluation == "wikitext2":
                    continue
                original = tasks_module._scorer_class
                if label == "stock HFLM":
                    tasks_module._scorer_class = stock_scorer
                recording(tasks_module, answers, dummy=args.overhead)
                counts.update(forwards=0, tokens=0)
                wall, cpu = time.perf_counter(), time.process_time()
                try:
                    if evaluation == "wikitext2":
                        result = evaluate_module.perplexity(model, tokenizer, wikitext2, show_progress=False)
                    else:
                        result = tasks_module.score_choice_tasks(model, tokenizer, [evaluation], choice,
                                                                 show_progress=False)[evaluation]
                finally:
                    tasks_module._scorer_class = original
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                run = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), **counts}
                if evaluation == "wikitext2":
                    run["perplexity"] = result["perplexity"]
                    value = {"perplexity": result["perplexity"], "tokens_scored": result["protocol"]["tokens_scored"]}
                else:
                    run["accuracy"] = result["accuracy"]
                    value = {"accuracy": result["accuracy"], "correct": result["correct"], "answers": answers}
                runs[label][evaluation].append(run)
                numbers[label].setdefault(evaluation, value)
                print(f"repeat {repeat} {evaluation:10s} {label:22s} {json.dumps(run)}", flush=True)
                write(args, variants, runs, numbers, torch, final=False)

    write(args, variants, runs, numbers, torch, final=True)


def write(args, variants, runs, numbers, torch, final: bool) -> None:
    """The summary so far (medians, pair-by-pair ratios, the numbers compared), printed at the end and written to
    --out after every run: a run cut short still leaves its finished pairs."""
    reference = variants[0][0]
    summary = {}
    for evaluation in args.evals:
        rows = {}
        for label, *_ in variants:
            done = runs[label][evaluation]
            if not done:
                continue
            walls, cpus = [r["wall_s"] for r in done], [r["cpu_s"] for r in done]
            rows[label] = {"wall_s_median": statistics.median(walls), "wall_s": walls,
                           "cpu_s_median": statistics.median(cpus), "cpu_s": cpus,
                           "forwards": done[0]["forwards"], "tokens_run": done[0]["tokens"]}
            if label != reference and runs[reference][evaluation]:  # pair by pair: run i against the reference's
                pairs = zip(done, runs[reference][evaluation])
                ratios = [(a["wall_s"] / b["wall_s"], a["cpu_s"] / b["cpu_s"]) for a, b in pairs]
                rows[label]["wall_ratio_to_" + reference] = [round(w, 3) for w, _ in ratios]
                rows[label]["cpu_ratio_to_" + reference] = [round(c, 3) for _, c in ratios]
                rows[label]["same_numbers_as_" + reference] = compare(numbers[reference][evaluation],
                                                                       numbers[label][evaluation])
        summary[evaluation] = rows
    result = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "before": args.before,
              "model": args.model, "torch": torch.__version__, "platform": platform.platform(),
              "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "complete": final,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "overhead_only": args.overhead,
              "summary": summary, "runs": runs}
    if final:
        print(json.dumps(summary, indent=1), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


def compare(a: dict, b: dict) -> dict:
    """How far b's numbers are from a's: perplexity, accuracy, per-row correctness, every answer's log-likelihood."""
    if "perplexity" in a:
        return {"perplexity": [a["perplexity"], b["perplexity"]],
                "relative_difference": abs(a["perplexity"] - b["perplexity"]) / a["perplexity"],
                "same_tokens_scored": a["tokens_scored"] == b["tokens_scored"]}
    keys = a["answers"].keys()
    differences = [abs(a["answers"][k][0] - b["answers"][k][0]) for k in keys if k in b["answers"]]
    return {"accuracy": [a["accuracy"], b["accuracy"]], "same_correct_rows": a["correct"] == b["correct"],
            "rows_flipped": sum(x != y for x, y in zip(a["correct"], b["correct"])),
            "same_requests": set(keys) == set(b["answers"]),
            "max_abs_loglikelihood_difference": max(differences, default=math.nan),
            "same_greedy": all(a["answers"][k][1] == b["answers"][k][1] for k in keys if k in b["answers"])}


if __name__ == "__main__":
    main()

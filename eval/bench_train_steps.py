"""Seconds per optimizer step of the demo recipe's two training steps on SmolLM2-135M, on the CPU by default, through
the package's own verbs (`finetune`, `quantize_qat`) with the recipe's settings and a few steps:

  lora: recipes/smollm2-135m-4bit-prune25.yaml's step 01 (LoRA r16 on politeness-train + rte-train, 8 x 256);
  qat:  its step 04 (QAT W4 g64, scales trained, KD, 8 x 256 from the tasks + wikitext2-valid) on the base model
        pruned as step 02 prunes it and quantized by round-to-nearest (same shapes and grid as the GPTQ result;
        the cost per step does not depend on which codes), teacher: the base model (step 01's shape).

  grid: QAT's learned-scale weight alone, forward and backward through every Linear of one pruned decoder layer
        (q/k/v 960 x 576, o 576 x 448, gate/up 2304 x 576, down 576 x 1152, g64), built per group (current) against
        the scales repeated over their columns (the formula before, `reference_weight`), alternated `--steps` times.

  --paired: instead of a Trainer run, the same first batches (the recipe step's data order) are trained on in turn
        with autocast off and bfloat16, one optimizer step each, alternating (a drifting machine slows both alike);
        prints each mode's median seconds per step and the ratio pair by pair.

Each run trains `--steps` steps from the start of the data order the recipe uses (same seed), so two code versions
time the same batches. `--profile` prints torch.profiler's top operators.

    python eval/bench_train_steps.py lora --steps 12
    python eval/bench_train_steps.py qat --steps 12 --profile
    python eval/bench_train_steps.py grid --steps 30
    python eval/bench_train_steps.py lora --steps 6 --paired
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from transformers import TrainerCallback

import compress
from compress.config import RTN
from compress.data import calibration_batches
from compress.recipe import load_recipe
from compress.training import training_examples

RECIPE = "recipes/smollm2-135m-4bit-prune25.yaml"


class StepClock(TrainerCallback):
    """Wall time of every optimizer step (data loading, forward, backward, optimizer)."""

    def __init__(self):
        self.times, self.start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def reference_weight(learned, codes: torch.Tensor) -> torch.Tensor:
    """(q − z)·s with every group's scale and zero point repeated over its columns (QAT's forward before)."""
    width = codes.shape[1] // learned.scale.shape[1]
    scale = learned.scale.repeat_interleave(width, dim=1)
    zero = learned.zero_point.repeat_interleave(width, dim=1)
    return (codes - zero) * scale


def bench_grid(repeats: int) -> dict:
    from types import SimpleNamespace

    from compress.quantize.qat import _LearnedScales

    torch.manual_seed(0)
    shapes = [(960, 576), (576, 448), (2304, 576), (576, 1152)]
    linears = [(_LearnedScales(SimpleNamespace(num_bits=4), torch.rand(r, c // 64) * 0.01 + 1e-3, None, codes=True),
                torch.randint(-8, 8, (r, c)).float()) for r, c in shapes]

    def once(build) -> float:
        start = time.perf_counter()
        for learned, codes in linears:
            weight = build(learned, codes)
            weight.backward(torch.ones_like(weight))
        return time.perf_counter() - start

    times = {"current": [], "reference": []}
    for _ in range(repeats):
        times["current"].append(once(lambda learned, codes: learned(codes)))
        times["reference"].append(once(reference_weight))
    summary = {name: {"min_ms": round(1e3 * min(t), 2), "median_ms": round(1e3 * sorted(t)[len(t) // 2], 2)}
               for name, t in times.items()}
    return {"step": "grid", "repeats": repeats, "threads": torch.get_num_threads(), **summary}


def paired(lora_model, config, data, steps: int, teacher=None, qat_model=None) -> dict:
    """One optimizer step per batch, autocast off then bfloat16 on the same batch, for `steps` batches; the model is
    restored between the two so both start from the same weights."""
    import statistics

    from transformers import TrainingArguments

    from compress.distill import DistillationTrainer
    from compress.quantize.qat import prepare_qat
    from compress.training import LabelledPositionsTrainer, pad_right, with_lora

    if lora_model is not None:
        model = with_lora(lora_model, config.lora).train()
        trainer_class, extra = LabelledPositionsTrainer, {}
    else:
        model = prepare_qat(qat_model.requires_grad_(True), config).train()
        trainer_class, extra = DistillationTrainer, {"teacher": teacher, "kd": config.kd}
    from compress.training import _length_grouping

    scratch = tempfile.TemporaryDirectory(prefix="bench-train-steps-")  # the Trainer wants a folder; nothing is saved
    args = TrainingArguments(output_dir=scratch.name, per_device_train_batch_size=config.batch_size,
                             max_steps=steps, report_to="none", use_cpu=True, remove_unused_columns=False,
                             save_strategy="no", **_length_grouping(data))
    trainer = trainer_class(model=model, args=args, train_dataset=data, data_collator=pad_right, **extra)
    batches = []
    for batch in trainer.get_train_dataloader():
        batches.append(batch)
        if len(batches) == steps:
            break
    trainable = [p for p in model.parameters() if p.requires_grad]
    start_state = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr)
    times = {"off": [], "bfloat16": []}
    for batch in batches:
        for mode in ("off", "bfloat16"):
            with torch.no_grad():
                for p, p0 in zip(trainable, start_state):
                    p.copy_(p0)
            trainer.autocast_dtype = None if mode == "off" else torch.bfloat16
            start = time.perf_counter()
            loss = trainer.compute_loss(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times[mode].append(time.perf_counter() - start)
    tokens = [int(b["input_ids"].numel()) for b in batches]
    ratios = [a / b for a, b in zip(times["off"], times["bfloat16"])]
    return {"paired": True, "batches": len(batches), "tokens_per_batch": tokens, "threads": torch.get_num_threads(),
            "off_median_s": round(statistics.median(times["off"]), 3),
            "bfloat16_median_s": round(statistics.median(times["bfloat16"]), 3),
            "ratio_off_over_bf16": [round(r, 2) for r in ratios], "ratio_median": round(statistics.median(ratios), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["lora", "qat", "grid"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--autocast", choices=["off", "bfloat16"], help="override the recipe step's autocast")
    parser.add_argument("--paired", action="store_true", help="autocast off vs bfloat16, batch by batch")
    parser.add_argument("--json", help="append a JSON line with the figures to this file")
    args = parser.parse_args()
    if args.step == "grid":
        print(json.dumps(bench_grid(args.steps)))
        return
    torch.manual_seed(0)
    recipe = load_recipe(RECIPE)
    finetune_cfg, prune_cfg, _, qat_cfg = (step.config for step in recipe.steps)
    model, tokenizer = compress.load_model("smollm2-135m")
    clock = StepClock()
    # an older checkout's config has no autocast field: only an explicit --autocast sets it
    overrides = {} if args.autocast is None else {"autocast": args.autocast}
    from compress import training

    original_train = training.train

    def timed_train(*a, callbacks=(), **k):
        return original_train(*a, callbacks=[*callbacks, clock], **k)

    training.train = timed_train
    if args.step == "lora":
        config = finetune_cfg.model_copy(update={"steps": args.steps, **overrides})
        data = training_examples(tokenizer, config.data, config.seq_len)
        run = lambda: compress.finetune(model, config, data, show_progress=False)  # noqa: E731
    else:
        teacher, _ = compress.load_model("smollm2-135m")
        calibration = calibration_batches(tokenizer, prune_cfg.calibration.dataset, prune_cfg.calibration.samples,
                                          prune_cfg.calibration.seq_len)
        compress.prune(model, prune_cfg, calibration, show_progress=False)
        grid = RTN(bits=qat_cfg.bits, group_size=qat_cfg.group_size, sym=qat_cfg.sym)
        from compress.quantize.rtn import quantize_rtn

        quantize_rtn(model, grid, show_progress=False)
        config = qat_cfg.model_copy(update={"steps": args.steps, **overrides})
        data = training_examples(tokenizer, config.data, config.seq_len)
        from compress.quantize.qat import quantize_qat

        run = lambda: quantize_qat(model, config, data, teacher=teacher, show_progress=False)  # noqa: E731
    if args.paired:
        result = paired(model if args.step == "lora" else None, config, data, args.steps,
                        teacher if args.step == "qat" else None, model if args.step == "qat" else None)
        print(json.dumps(result))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(result) + "\n")
        return
    start = time.perf_counter()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    else:
        run()
    total = time.perf_counter() - start
    steady = sorted(clock.times[1:])
    median = steady[len(steady) // 2]
    result = {"step": args.step, "steps": args.steps, "autocast": args.autocast or "recipe",
              "threads": torch.get_num_threads(),
              "median_step_s": round(median, 3), "mean_step_s": round(sum(clock.times[1:]) / len(steady), 3),
              "first_step_s": round(clock.times[0], 3), "total_s": round(total, 2)}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

"""`compress estimate` against measured peaks: inference (prefill + a few generated tokens with the KV cache), one
LoRA recovery step and one full-student distillation step, each in a fresh process on a model of the named
architecture with random weights (memory does not depend on the values).

Measured peak: torch's allocator high-water mark on CUDA (what the CUDA context itself takes is not in it); on the
CPU the process's peak resident memory minus its resident memory before the model was built (the Python, torch
and transformers code and their caches are not the model's).

    python eval/bench_estimate.py --config smollm2-135m --dtype float32 --device cpu \
        --out eval/results/estimate_smollm2_cpu.json
    python eval/bench_estimate.py --config llama2-7b --dtype bfloat16 --device cuda --train-batch 2 \
        --out eval/results/estimate_7b_h100.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from compress.estimate import EstimateConfig, estimate
from compress.measure import _reset_rss_peak, _rss_peak_bytes
from compress.models import RandomInit, load_model

PHASES = ("inference", "lora", "distill")


def _current_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no /proc/self/status: the CPU measurement needs Linux")


def _random_ids(vocab: int, rows: int, length: int) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(0))


def measure_phase(args) -> int:
    """Run one phase on a freshly built model; returns its peak bytes (see the module docstring)."""
    from compress.config import LoRA
    from compress.distill import Distill, distill
    from compress.finetune import LoRARecovery, finetune

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    baseline = 0 if cuda else _current_rss()
    _reset_rss_peak()
    model, _ = load_model(RandomInit(config=args.config, init="random"), args.dtype, args.device)
    vocab = model.config.vocab_size
    if args.phase == "inference":
        prompt = _random_ids(vocab, args.batch, args.context - args.new_tokens).to(args.device)
        with torch.no_grad():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, do_sample=False)
    else:
        data = _random_ids(vocab, 4 * args.train_batch, args.train_seq_len)
        budget = dict(steps=args.train_steps, batch_size=args.train_batch, seq_len=args.train_seq_len, warmup_ratio=0)
        if args.phase == "lora":
            finetune(model, LoRARecovery(lora=LoRA(r=args.lora_r), **budget), data, show_progress=False)
        else:
            teacher = copy.deepcopy(model)
            distill(model, Distill(**budget), data, teacher, show_progress=False)
    gc.collect()
    return torch.cuda.max_memory_allocated() if cuda else _rss_peak_bytes() - baseline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="smollm2-135m", help="a named architecture (compress.models.ARCHITECTURES)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-seq-len", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: measure one phase in this process
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.phase:
        print(json.dumps({"peak_bytes": measure_phase(args)}))
        return

    predicted = estimate(RandomInit(config=args.config, init="random"), EstimateConfig(
        context=args.context, batch=args.batch, dtype=args.dtype, train_batch=args.train_batch,
        train_seq_len=args.train_seq_len, lora_r=args.lora_r, ratios=()))
    precision = {"float32": "fp32"}.get(args.dtype, "bf16")
    expected = {"inference": predicted["precisions"][precision]["inference"]["total"],
                "lora": predicted["training"]["lora"]["total"], "distill": predicted["training"]["distill"]["total"]}
    # glibc's per-thread malloc arenas keep freed memory resident: +1.4 GiB RSS on SmolLM2's LoRA step with the
    # defaults; one arena, trimmed, leaves what the program itself holds at its peak
    env = dict(os.environ, MALLOC_ARENA_MAX="1", MALLOC_TRIM_THRESHOLD_="0")
    rows = {}
    for phase in args.phases.split(","):
        command = [sys.executable, __file__, "--phase", phase] + sys.argv[1:]
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            rows[phase] = {"error": done.stderr.strip().splitlines()[-1]}
        else:
            measured = json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]
            rows[phase] = {"measured_gib": round(measured / 2**30, 3),
                           "estimated_gib": round(expected[phase] / 2**30, 3),
                           "estimate_over_measured": round(expected[phase] / measured, 3)}
        print(phase, rows[phase], flush=True)
    result = {"args": {k: v for k, v in vars(args).items() if k not in ("phase", "out")},
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "phases": rows, "estimate": predicted}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""AWQ and QAT-KD recovery at Llama-2-7B shape on one GPU (random bf16 weights: speed and memory only).

Rows: GPTQ W4 g128 (the reference step time), AWQ W4 g128 (block loss, the paper's), AWQ with the Linear loss, and
QAT-KD recovery after AWQ at batch 8 x 256 with the teacher in bf16: train scales (the memory-lean variant) and
weights and scales. Step time and peak GPU memory per row.

    python eval/bench_awq_qat_7b.py --out eval/results/bench_awq_qat_7b_h200.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import LLAMA2_7B, random_llama, random_tokens, timed  # noqa: E402

import compress  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--qat-steps", type=int, default=10)
    parser.add_argument("--rows", default="gptq,awq,awq-linear,qat-scales,qat-weights_and_scales")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []

    def record(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "shape": "llama2-7b",
                                              "calibration": [args.samples, args.seq_len], "rows": rows}, indent=1))

    ids = random_tokens(args.samples, args.seq_len, LLAMA2_7B["vocab_size"])
    grid = dict(bits=4, group_size=128)
    wanted = args.rows.split(",")
    for name, config in (("gptq", compress.GPTQ(**grid)), ("awq", compress.AWQ(**grid)),
                         ("awq-linear", compress.AWQ(**grid, loss="linear"))):
        if name not in wanted:
            continue
        model = random_llama(LLAMA2_7B, torch.bfloat16, "cuda")
        _, seconds, peak = timed(lambda model=model, config=config: compress.quantize(model, config, ids,
                                                                                       show_progress=False))
        record({"row": name, "setting": config.describe(), "seconds": seconds, "peak_gib": peak / 2**30})
        del model
        torch.cuda.empty_cache()
    windows = random_tokens(8 * args.qat_steps, 256, LLAMA2_7B["vocab_size"], seed=1)
    for train in ("scales", "weights_and_scales"):
        if f"qat-{train}" not in wanted:
            continue
        teacher = random_llama(LLAMA2_7B, torch.bfloat16, "cuda")
        student = copy.deepcopy(teacher)
        compress.quantize(student, compress.AWQ(**grid, loss="linear"), ids[:16], show_progress=False)
        config = compress.QAT(**grid, train=train, steps=args.qat_steps, batch_size=8, seq_len=256, lr=1e-5,
                              warmup_ratio=0.0, kd=compress.KD())
        _, seconds, peak = timed(lambda student=student, teacher=teacher, config=config: compress.quantize(
            student, config, train_data=windows, teacher=teacher, show_progress=False))
        record({"row": f"qat-kd {train}", "setting": config.describe(), "seconds": seconds,
                "seconds_per_step": seconds / args.qat_steps, "peak_gib": peak / 2**30})
        del teacher, student
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

"""Pruning and GPTQ W4 at the shapes of the families beyond Llama-2 (random bf16 weights, random-token data: time and
memory do not depend on the values), one GPU, each (shape, part) in its own process so peaks do not mix.

    python eval/bench_families.py --shapes llama3.1-8b,qwen3-8b,mixtral-8x7b --parts prune,gptq \\
        --out eval/results/bench_families_h200.json

prune: Taylor element1 on 10 x 128 calibration tokens, 25 % of heads and MLP channels in every layer (MoE: also 25 %
of the experts by REAP). gptq: W4 g128, 128 x 2048 calibration tokens, sequential schedule; MoE shapes run with
`offload: true` (weights wait on the CPU, one decoder layer at a time on the GPU), experts calibrated on every token.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import random_tokens, timed  # noqa: E402

GIB = 2**30


def run_one(shape: str, part: str) -> dict:
    from transformers import AutoModelForCausalLM

    import compress
    from compress.architectures import family
    from compress.models import architecture_config

    config = architecture_config(shape)
    moe = family(config).mlp == "experts"
    offload = part == "gptq" and moe
    torch.manual_seed(0)
    with torch.device("cpu" if offload or not torch.cuda.is_available() else "cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    params = sum(p.numel() for p in model.parameters())
    if part == "prune":
        ids = random_tokens(10, 128, config.vocab_size)
        # uniform where the family needs it (MoE, Phi-3); elsewhere per-layer widths (LlamaConfig refuses 24 of 32
        # heads as a stock config: 4096 is not a multiple of 24)
        uniform = moe or family(config).attention == "qkv/o"
        prune = compress.TaylorPrune(ratio=0.25, uniform=uniform, multiple=128, experts=0.25 if moe else 0.0)
        _, seconds, peak = timed(lambda: compress.prune(model, prune, ids, show_progress=False))
        kept = sum(p.numel() for p in model.parameters())
        return {"shape": shape, "part": part, "params": params, "params_after": kept, "seconds": round(seconds, 1),
                "peak_gib": peak and round(peak / GIB, 2), "setting": prune.describe()}
    ids = random_tokens(128, 2048, config.vocab_size)
    gptq = compress.GPTQ(bits=4, group_size=128, offload=offload)
    _, seconds, peak = timed(lambda: compress.quantize(model, gptq, ids, show_progress=False))
    return {"shape": shape, "part": part, "params": params, "seconds": round(seconds, 1),
            "peak_gib": peak and round(peak / GIB, 2), "offload": offload, "setting": "GPTQ W4 g128, 128 x 2048 tokens"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama3.1-8b,qwen3-8b,mixtral-8x7b")
    parser.add_argument("--parts", default="prune,gptq")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # shape part: run in this process
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(*args.one)), flush=True)
        return
    rows = []
    for shape in args.shapes.split(","):
        for part in args.parts.split(","):
            done = subprocess.run([sys.executable, __file__, "--one", shape, part], capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            row = json.loads(lines[-1][7:]) if lines else {"shape": shape, "part": part,
                                                             "error": done.stderr.strip().splitlines()[-1:]}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                  "torch": torch.__version__, "rows": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

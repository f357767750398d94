"""Does AWQ lose by computing in bfloat16? SmolLM2-135M, AWQ W4 g64 (clip, 20 grid points, 512 search tokens) on 8 x
256 wikitext2-valid calibration tokens; every result is cast to bfloat16 and scored in bfloat16 (WikiText-2 test,
first 16,384 tokens, windows of 512), so the variants differ only in what AWQ ran on:

    python eval/bench_awq_dtype.py --out eval/results/bench_awq_dtype_smollm2_cpu.json

  bfloat16               the bfloat16 model (statistics, search, fold and clipping in bfloat16)
  float32                the float32 model
  float32-bf16-weights   the bfloat16 model's weights upcast to float32 (the same starting values as bfloat16)
  float32-seed1, -seed2  the float32 model on other calibration windows (seed 1, 2): the spread of the result
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import compress
from compress.data import calibration_batches

VARIANTS = ("bfloat16", "float32", "float32-bf16-weights", "float32-seed1", "float32-seed2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    parser.add_argument("--out")
    args = parser.parse_args()
    protocol = compress.Perplexity(seq_len=512, max_tokens=16384, batch_size=8)
    config = compress.AWQ(bits=4, group_size=64, sym=True, search_tokens=512)
    rows = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            parser.error(f"unknown variant {variant}; choose from {', '.join(VARIANTS)}")
        loaded = "float32" if variant.startswith("float32") and variant != "float32-bf16-weights" else "bfloat16"
        model, tokenizer = compress.load_model("smollm2-135m", loaded, "cpu")
        if variant.startswith("float32"):
            model = model.float()
        seed = int(variant[-1]) if "seed" in variant else 0
        ids = calibration_batches(tokenizer, "wikitext2-valid", 8, 256, seed=seed)
        started = time.perf_counter()
        compress.quantize(model, config, ids, show_progress=False)
        seconds = time.perf_counter() - started
        model = model.to(torch.bfloat16)
        ppl = compress.perplexity(model, tokenizer, protocol, show_progress=False)["perplexity"]
        rows.append({"variant": variant, "calibration_seed": seed, "seconds": round(seconds, 1),
                     "wikitext2_ppl_scored_in_bf16": round(ppl, 3)})
        print(json.dumps(rows[-1]), flush=True)
    result = {"command": "python eval/bench_awq_dtype.py" + (f" --variants {args.variants}"
                                                            if args.variants != ",".join(VARIANTS) else ""),
              "config": config.describe(), "calibration": "wikitext2-valid 8 x 256",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

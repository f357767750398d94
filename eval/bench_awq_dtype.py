"""Does AWQ lose by computing in bfloat16? SmolLM2-135M, AWQ W4 g64 (clip, 20 grid points, 512 search tokens) on 8 x
256 wikitext2-valid calibration tokens, run once on the bfloat16 model and once on the float32 model; both results
are then cast to bfloat16 and scored in bfloat16 (WikiText-2 test, first 16,384 tokens, windows of 512), so the only
difference is the dtype AWQ's statistics, search, folding and clipping ran in:

    python eval/bench_awq_dtype.py --out eval/results/bench_awq_dtype_smollm2_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import compress
from compress.data import calibration_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="bfloat16,float32", help="the dtypes AWQ runs in, comma-separated")
    parser.add_argument("--out")
    args = parser.parse_args()
    protocol = compress.Perplexity(seq_len=512, max_tokens=16384, batch_size=8)
    config = compress.AWQ(bits=4, group_size=64, sym=True, search_tokens=512)
    rows = []
    for dtype in args.dtypes.split(","):
        model, tokenizer = compress.load_model("smollm2-135m", dtype, "cpu")
        ids = calibration_batches(tokenizer, "wikitext2-valid", 8, 256, seed=0)
        started = time.perf_counter()
        compress.quantize(model, config, ids, show_progress=False)
        seconds = time.perf_counter() - started
        model = model.to(torch.bfloat16)
        ppl = compress.perplexity(model, tokenizer, protocol, show_progress=False)["perplexity"]
        rows.append({"awq_dtype": dtype, "seconds": round(seconds, 1), "wikitext2_ppl_scored_in_bf16": round(ppl, 3)})
        print(json.dumps(rows[-1]), flush=True)
    result = {"command": "python eval/bench_awq_dtype.py" + (f" --dtypes {args.dtypes}"
                                                            if args.dtypes != "bfloat16,float32" else ""),
              "config": config.describe(), "calibration": "wikitext2-valid 8 x 256, seed 0",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

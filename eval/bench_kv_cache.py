"""The FP8 KV cache's cost on SmolLM2: WikiText-2 perplexity of the float model and of the same model with the cache
in FP8 (per-tensor and per-head scales, calibrated on the same windows), the change in %, and the cache's bytes at
8k context as `compress estimate` and `compress bench` count them.

    python eval/bench_kv_cache.py --out eval/results/kv_cache_smollm2_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import compress
from compress.bench import kv_cache_bytes
from compress.data import calibration_batches
from compress.estimate import EstimateConfig, estimate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows (wikitext2-valid, seed 0)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=16384, help="WikiText-2 test tokens scored")
    parser.add_argument("--scales", default="per_tensor,per_head")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    model, tokenizer = compress.load_model(args.model)
    ppl_config = compress.Perplexity(seq_len=512, stride=512, max_tokens=args.max_tokens)
    ids = calibration_batches(tokenizer, "wikitext2-valid", args.samples, args.seq_len, seed=0)
    result = {"model": args.model, "dtype": "float32", "device": f"cpu ({torch.get_num_threads()} threads)",
              "calibration": {"dataset": "wikitext2-valid", "samples": args.samples, "seq_len": args.seq_len},
              "perplexity_protocol": ppl_config.model_dump(), "rows": []}

    def score(name: str, scored) -> None:
        start = time.perf_counter()
        ppl = compress.perplexity(scored, tokenizer, ppl_config, show_progress=False)["perplexity"]
        row = {"cache": name, "perplexity": round(ppl, 4), "eval_seconds": round(time.perf_counter() - start, 1),
               "kv_cache": kv_cache_bytes(scored)}
        base = result["rows"][0]["perplexity"] if result["rows"] else ppl
        row["change_pct"] = round(100 * (ppl / base - 1), 3)
        result["rows"].append(row)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(row))

    score("float32 (no kv_cache step)", model)
    for scales in args.scales.split(","):
        start = time.perf_counter()
        quantized = compress.quantize_kv_cache(copy.deepcopy(model), compress.KVCache(scales=scales), ids,
                                               show_progress=False)
        calibrated = round(time.perf_counter() - start, 1)
        score(f"fp8 e4m3 {scales}", quantized)
        result["rows"][-1]["calibration_seconds"] = calibrated
        del quantized
    bf16 = estimate(args.model, EstimateConfig(context=8192, ratios=()))["kv_cache"]["bytes"]
    result["estimate_kv_cache_bytes_8k"] = {**bf16, "ratio": bf16["fp8"] / bf16["bfloat16"]}
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

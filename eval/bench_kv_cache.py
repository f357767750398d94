"""The FP8 KV cache's cost (SmolLM2 by default; `--model` a GGUF file or folder): WikiText-2 perplexity of the float
model and of the same model with the cache in FP8 (per-tensor and per-head scales, calibrated on the same windows),
the change in %, and the cache's bytes at 8k context as `compress estimate` and `compress bench` count them.

    python eval/bench_kv_cache.py --out eval/results/kv_cache_smollm2_cpu.json

`--diagnose` adds what tells where a large change comes from: each layer's keys' constant-offset share, and the cache
without `centre_keys` (compress.quantize.kv_cache.centre_keys) rounding both, the keys alone or the values alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from unittest import mock

import torch

import compress
from compress.bench import kv_cache_bytes
from compress.data import calibration_batches
from compress.estimate import EstimateConfig, estimate
from compress.quantize import kv_cache
from compress.quantize.kv_cache import CALIBRATION_BATCH

ROUND_KV = kv_cache._round_kv


def key_offset_shares(model, ids: torch.Tensor) -> list[float]:
    """Per layer: the share of its cached keys' energy (after RoPE) that is one constant per head and channel, the mean
    over the tokens. Where it is near 1 (a large k_proj bias), the keys vary by little around a large offset, and e4m3's
    3 mantissa bits, relative to the offset, round the variation away."""
    modules = kv_cache.attention_modules(model)
    layer_of = {id(attention): index for index, (_, attention) in enumerate(modules)}
    shares: dict[int, float] = {}

    def observe(attention, keys, values):
        exact = keys.detach().float()
        shares[layer_of[id(attention)]] = (exact.mean(dim=2, keepdim=True).pow(2).mean() / exact.pow(2).mean()).item()
        return keys, values

    hooks = [kv_cache._swap_cache_hook(attention, observe) for _, attention in modules]
    try:
        with torch.no_grad():
            model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return [round(shares[index], 4) for index in range(len(modules))]


def only_rounding(which: str):
    """The cache's rounding applied to the keys alone, the values alone, or both."""
    def round_kv(attention, keys, values):
        rounded_keys, rounded_values = ROUND_KV(attention, keys, values)
        return {"keys": (rounded_keys, values), "values": (keys, rounded_values)}.get(which,
                                                                                   (rounded_keys, rounded_values))
    return round_kv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows (wikitext2-valid, seed 0)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=16384, help="WikiText-2 test tokens scored")
    parser.add_argument("--scales", default="per_tensor,per_head")
    parser.add_argument("--dtype", default="float32", help="the model's dtype (bfloat16: 2.5x faster on a CPU with "
                        "AVX512-BF16, for larger models)")
    parser.add_argument("--diagnose", action="store_true", help="also: each layer's share of its keys' energy that is "
                        "one constant offset per channel, and per-tensor FP8 on the keys alone and on the values alone")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    model, tokenizer = compress.load_model(args.model, args.dtype)
    ppl_config = compress.Perplexity(seq_len=512, stride=512, max_tokens=args.max_tokens)
    ids = calibration_batches(tokenizer, "wikitext2-valid", args.samples, args.seq_len, seed=0)
    result = {"model": Path(args.model).name, "dtype": args.dtype, "device": f"cpu ({torch.get_num_threads()} threads)",
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

    score(f"{args.dtype} (no kv_cache step)", model)
    for scales in args.scales.split(","):
        start = time.perf_counter()
        quantized = compress.quantize_kv_cache(copy.deepcopy(model), compress.KVCache(scales=scales), ids,
                                               show_progress=False)
        calibrated = round(time.perf_counter() - start, 1)
        score(f"fp8 e4m3 {scales}", quantized)
        result["rows"][-1]["calibration_seconds"] = calibrated
        del quantized
    if args.diagnose:
        result["key_offset_share_by_layer"] = key_offset_shares(model, ids[:CALIBRATION_BATCH])
        for rounded in ("keys and values", "keys", "values"):  # without centre_keys: what it is there for
            with mock.patch.object(kv_cache, "_round_kv", only_rounding(rounded)):  # read when the hooks go in
                quantized = compress.quantize_kv_cache(copy.deepcopy(model), compress.KVCache(centre_keys=False),
                                                       ids, show_progress=False)
            score(f"fp8 e4m3 per_tensor, keys not centred, {rounded} rounded", quantized)
            del quantized
    bf16 = estimate(args.model, EstimateConfig(context=8192, ratios=()))["kv_cache"]["bytes"]
    result["estimate_kv_cache_bytes_8k"] = {**bf16, "ratio": bf16["fp8"] / bf16["bfloat16"]}
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

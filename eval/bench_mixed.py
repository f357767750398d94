"""Mixed precision on SmolLM2-135M: GPTQ W3 g64, W4 g64, and W3 g64 with the most sensitive Linears at W4 g64 (a
`keep` budget: the 10 % most sensitive Linears by count, and the byte-budget / threshold forms), on one calibration
set, in one invocation:

    python eval/bench_mixed.py --out eval/results/mixed_smollm2_cpu.json

Each variant starts from the same float weights and takes the same calibration token ids (wikitext2-valid); the
perplexity is WikiText-2 test's in 512-token windows. Weight bytes are the quantized Linears' as compressed-tensors
saves them (compress.estimate.linear_bytes), and the whole checkpoint's (the float embedding and norms added). The
gap closed is (ppl W3 - ppl mixed) / (ppl W3 - ppl W4); the extra bytes, (bytes mixed - bytes W3) / bytes W3.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import compress
from compress.data import calibration_batches
from compress.estimate import linear_bytes
from compress.modules import quantized_linears
from compress.quantize.mixed import grids_record

BASE = dict(bits=3, group_size=64, act_order=True, damp=0.01)
VARIANTS = {
    "w3g64": lambda: compress.GPTQ(**BASE),
    "w4g64": lambda: compress.GPTQ(**{**BASE, "bits": 4}),
    "w3g64-keep10pct-w4": lambda: compress.GPTQ(**BASE, keep={"fraction": 0.1, "bits": 4}),
    "w3g64-keep12pctbytes-w4": lambda: compress.GPTQ(**BASE, keep={"extra_bytes": 0.12, "bits": 4}),
    "w3g64-keep20pct-w4": lambda: compress.GPTQ(**BASE, keep={"fraction": 0.2, "bits": 4}),
}


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(the quantized Linears' saved bytes, the whole model's: every other tensor at its dtype, a tied one once)."""
    quantized, linears = 0, set()
    for _, linear, quant in quantized_linears(model):
        group = -1 if quant.args.group_size is None else quant.args.group_size
        quantized += linear_bytes(linear.out_features, linear.in_features, quant.args.num_bits, group,
                                  quant.args.symmetric, linear.weight.element_size())
        linears.add(id(linear.weight))
    rest = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()
               if id(p) not in linears)
    return quantized, quantized + rest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--ppl-tokens", type=int, default=16384)
    parser.add_argument("--variants", default=",".join(list(VARIANTS)[:4]), help="comma-separated: "
                        + ", ".join(VARIANTS))
    parser.add_argument("--out", help="write the results as JSON here (each variant as it finishes)")
    parser.add_argument("--merge", nargs="*", default=[], help=(
        "results files of other invocations with the same model, calibration and protocol (e.g. variants run in "
        "parallel): their variants join these before the comparison"))
    args = parser.parse_args()

    model, tokenizer = compress.load_model(args.model, "float32", "cpu")
    ids = calibration_batches(tokenizer, "wikitext2-valid", args.samples, args.seq_len, seed=0)
    protocol = compress.Perplexity(seq_len=512, max_tokens=args.ppl_tokens, batch_size=8)
    pristine = {k: v.detach().clone() for k, v in model.state_dict().items()}
    results = {"model": args.model, "calibration": f"wikitext2-valid, {args.samples} x {args.seq_len} tokens",
               "perplexity_protocol": f"wikitext2-test, {args.ppl_tokens} tokens, windows of 512",
               "machine": f"{os.cpu_count()} CPU cores (shared), torch {torch.__version__}",
               "command": "python eval/bench_mixed.py --out eval/results/mixed_smollm2_cpu.json", "results": []}

    def write() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    if args.variants:
        results["results"].append({"variant": "float", "perplexity": compress.perplexity(
            model, tokenizer, protocol, show_progress=False)["perplexity"]})
        write()
    for name in filter(None, args.variants.split(",")):
        fresh, _ = compress.load_model(args.model, "float32", "cpu")  # a new model: quantize marks its Linears
        fresh.load_state_dict(pristine)
        config = VARIANTS[name]()
        start = time.perf_counter()
        compress.quantize(fresh, config, ids, show_progress=False)
        seconds = time.perf_counter() - start
        ppl = compress.perplexity(fresh, tokenizer, protocol, show_progress=False)["perplexity"]
        linears, whole = weight_bytes(fresh)
        record = grids_record(fresh)
        entry = {"variant": name, "config": config.describe(), "seconds": round(seconds, 1), "perplexity": ppl,
                 "linear_bytes": linears, "model_bytes": whole,
                 **record}
        results["results"].append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k not in ("grids", "kept_by_budget")}), flush=True)
        write()
        del fresh
    for other in args.merge:
        merged = json.loads(Path(other).read_text())
        for key in ("model", "calibration", "perplexity_protocol"):
            if merged[key] != results[key]:
                raise SystemExit(f"{other}: {key} {merged[key]!r} differs from this run's {results[key]!r}")
        seen = {entry["variant"] for entry in results["results"]}
        results["results"] += [entry for entry in merged["results"] if entry["variant"] not in seen]
    by_name = {entry["variant"]: entry for entry in results["results"]}
    if "w3g64" in by_name and "w4g64" in by_name:
        low, high = by_name["w3g64"], by_name["w4g64"]
        for entry in results["results"]:
            if entry["variant"].startswith("w3g64-"):
                entry["gap_closed"] = round((low["perplexity"] - entry["perplexity"])
                                            / (low["perplexity"] - high["perplexity"]), 4)
                entry["extra_linear_bytes"] = round(entry["linear_bytes"] / low["linear_bytes"] - 1, 4)
                entry["extra_model_bytes"] = round(entry["model_bytes"] / low["model_bytes"] - 1, 4)
                print(entry["variant"], entry["gap_closed"], entry["extra_linear_bytes"], flush=True)
    write()


if __name__ == "__main__":
    main()

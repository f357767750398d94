"""Mixed precision on SmolLM2-135M: GPTQ W3 g64, W4 g64, and W3 g64 with the Linears a `keep` budget ranks most
sensitive at W4 g64 (or 8 bits), on one calibration set, with the shared protocol of eval/wikitext_bench.py
(wikitext2-valid calibration token ids, WikiText-2 test perplexity in 512-token windows):

    python eval/bench_mixed.py --out eval/results/mixed_smollm2_cpu.json

Variants: the budget by count (`keep10pct`: the 10 % most sensitive Linears) and by bytes (`keep12pctbytes`: as many
as fit in 12 % more Linear bytes than pure W3), kept at W4 g64 or W8 g64, with the default ranking (`rank: loss`, the
model's loss saved, from one forward and backward over `probe_samples` calibration sequences, 8 by default, 2 in
`-probe2`) and with `-output` the Linears' own relative output error (`rank: output`). Each variant starts from the
same float weights. Weight bytes are the quantized Linears' as compressed-tensors saves them
(compress.estimate.linear_bytes), and the whole checkpoint's (the float embedding and norms added). The gap closed is
(ppl W3 - ppl mixed) / (ppl W3 - ppl W4); the extra bytes, (bytes mixed - bytes W3) / bytes W3. The probe's seconds
are recorded in each budget variant's `kept_by_budget`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import compress
from compress.estimate import linear_bytes
from compress.modules import quantized_linears
from compress.quantize.mixed import grids_record

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wikitext_bench import WikitextBench, add_protocol_arguments  # noqa: E402

BASE = dict(bits=3, group_size=64, act_order=True, damp=0.01)


def _keep(rank: str = "loss", **budget):
    return lambda: compress.GPTQ(**BASE, keep={**budget, "rank": rank})


VARIANTS = {
    "w3g64": lambda: compress.GPTQ(**BASE),
    "w4g64": lambda: compress.GPTQ(**{**BASE, "bits": 4}),
    "w3g64-keep10pct-w4": _keep(fraction=0.1, bits=4),
    "w3g64-keep12pctbytes-w4": _keep(extra_bytes=0.12, bits=4),
    "w3g64-keep10pct-w8": _keep(fraction=0.1, bits=8),
    "w3g64-keep12pctbytes-w8": _keep(extra_bytes=0.12, bits=8),
    "w3g64-keep10pct-w4-probe2": _keep(fraction=0.1, bits=4, probe_samples=2),
    "w3g64-keep10pct-w4-output": _keep("output", fraction=0.1, bits=4),
    "w3g64-keep12pctbytes-w4-output": _keep("output", extra_bytes=0.12, bits=4),
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
    add_protocol_arguments(parser)
    parser.add_argument("--variants", default=",".join(list(VARIANTS)[:4]), help="comma-separated: "
                        + ", ".join(VARIANTS))
    parser.add_argument("--float", action="store_true", help="score the float model too")
    parser.add_argument("--merge", nargs="*", default=[], help=(
        "results files of other invocations with the same model, calibration and protocol (e.g. variants run in "
        "parallel or earlier): their variants that this one did not run join these before the comparison"))
    parser.add_argument("--command", default="python eval/bench_mixed.py --out eval/results/mixed_smollm2_cpu.json",
                        help="the command line to record with the results (several invocations merged)")
    args = parser.parse_args()

    bench = WikitextBench(args.model, args.samples, args.seq_len, args.ppl_tokens, args.out, command=args.command)
    if args.float:
        bench.record({"variant": "float", "perplexity": bench.perplexity(bench.model)})
    for name in filter(None, args.variants.split(",")):
        model = bench.fresh()
        config = VARIANTS[name]()
        start = time.perf_counter()
        compress.quantize(model, config, bench.ids, show_progress=False)
        seconds = time.perf_counter() - start
        linears, whole = weight_bytes(model)
        record = grids_record(model)
        bench.record({"variant": name, "config": config.describe(), "seconds": round(seconds, 1),
                      "perplexity": bench.perplexity(model), "linear_bytes": linears, "model_bytes": whole, **record})
        del model
    bench.merge(args.merge)
    results = bench.results["results"]
    by_name = {entry["variant"]: entry for entry in results}
    if "w3g64" in by_name and "w4g64" in by_name:
        low, high = by_name["w3g64"], by_name["w4g64"]
        for entry in results:
            if entry["variant"].startswith("w3g64-"):
                entry["gap_closed"] = round((low["perplexity"] - entry["perplexity"])
                                            / (low["perplexity"] - high["perplexity"]), 4)
                entry["extra_linear_bytes"] = round(entry["linear_bytes"] / low["linear_bytes"] - 1, 4)
                entry["extra_model_bytes"] = round(entry["model_bytes"] / low["model_bytes"] - 1, 4)
                print(entry["variant"], entry["gap_closed"], entry["extra_linear_bytes"], flush=True)
    bench.write()


if __name__ == "__main__":
    main()

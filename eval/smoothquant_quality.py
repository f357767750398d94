"""What smoothing buys on SmolLM2: WikiText-2 perplexity (seq_len 512, the first 4,096 tokens, as the SmolLM2 tests
score it) of the float model, of W8A8 int8 without smoothing (int8 weights per channel and int8 inputs per token,
nothing folded), and of SmoothQuant with alpha 0.5 and alpha searched per group, on 128 x 512 calibration tokens.

    python eval/smoothquant_quality.py --threads 1 --out OUT.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import compress
from compress.data import calibration_batches
from compress.quantize.grid import fake_quantize, minmax_qparams, quantizable_linears
from compress.quantize.int8_runtime import WEIGHT_ARGS, enable_int8_activations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ppl_config = compress.Perplexity(seq_len=512, max_tokens=4096)
    model, tokenizer = compress.load_model("smollm2-135m")

    def ppl(m) -> float:
        return round(compress.perplexity(m, tokenizer, ppl_config, show_progress=False)["perplexity"], 4)

    rows = {"float32": ppl(model)}
    plain = copy.deepcopy(model)
    with torch.no_grad():
        for _, linear in quantizable_linears(plain):
            scale, zero = minmax_qparams(linear.weight, WEIGHT_ARGS)
            linear.weight.copy_(fake_quantize(linear.weight, scale, zero, WEIGHT_ARGS))
            enable_int8_activations(linear)
    rows["W8A8 int8, no smoothing"] = ppl(plain)
    del plain
    print(json.dumps(rows), flush=True)
    ids = calibration_batches(tokenizer, "wikitext2-valid", samples=128, seq_len=512)
    seconds = {}
    for alpha in (0.5, "search"):
        started = time.perf_counter()
        quantized = compress.quantize(copy.deepcopy(model), compress.SmoothQuant(alpha=alpha), ids,
                                      show_progress=False)
        seconds[f"alpha {alpha}"] = round(time.perf_counter() - started, 1)
        rows[f"SmoothQuant alpha {alpha}"] = ppl(quantized)
        print(json.dumps(rows), flush=True)
    result = {"command": "python eval/smoothquant_quality.py" + (f" --threads {args.threads}" if args.threads else ""),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "protocol": "WikiText-2 test, seq_len 512, first 4,096 tokens; calibration wikitext2-valid 128 x 512",
              "perplexity": rows, "vs_float": {k: round(v / rows["float32"], 4) for k, v in rows.items()},
              "quantize_seconds": seconds}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

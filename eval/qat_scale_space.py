"""QAT's learned scales trained as themselves or as their logarithms (`scale_space: linear | log`), at several rates,
on SmolLM2 after RTN on a grid where rounding hurts (W3 g64 by default): WikiText-2 perplexity after each.

    python eval/qat_scale_space.py --out eval/results/qat_scale_space_smollm2_cpu.json

Adam moves a parameter by about lr per step: a linear scale by lr whatever its size, a log-space one by the factor
e^lr. The scales' own magnitudes are recorded (median, 10th and 90th percentiles), so that a linear rate can be read as
the relative step it is for this model's scales.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import compress
from compress.data import training_windows
from compress.quantize.grid import quantized_linears


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--runs", default="linear:5e-5,linear:5e-4,log:5e-3,log:5e-2", help="space:lr, ...")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    protocol = compress.Perplexity(seq_len=512, max_tokens=4096)
    model, tokenizer = compress.load_model(args.model)
    grid = dict(bits=args.bits, group_size=args.group_size)
    rtn = compress.quantize(copy.deepcopy(model), compress.RTN(**grid), show_progress=False)
    scales = torch.cat([quant.scale.float().flatten() for _, _, quant in quantized_linears(rtn)])
    windows = training_windows(tokenizer, "wikitext2-valid", 128)[:200]
    result = {"model": args.model, "device": f"cpu ({torch.get_num_threads()} threads)",
              "grid": f"RTN W{args.bits} g{args.group_size} sym, then QAT train: scales, KD from the float model, "
                      f"{args.steps} steps of 4 x 128 tokens of wikitext2-valid",
              "perplexity_protocol": protocol.model_dump(),
              "scales": {"median": scales.median().item(), "p10": scales.quantile(0.1).item(),
                         "p90": scales.quantile(0.9).item()},
              "float": compress.perplexity(model, tokenizer, protocol, show_progress=False)["perplexity"],
              "rtn": compress.perplexity(rtn, tokenizer, protocol, show_progress=False)["perplexity"], "runs": []}
    for run in args.runs.split(","):
        space, lr = run.split(":")
        student, start = copy.deepcopy(rtn), time.perf_counter()
        config = compress.QAT(**grid, train="scales", steps=args.steps, batch_size=4, seq_len=128, lr=float(lr),
                              kd=compress.KD(), scale_space=space)
        compress.quantize(student, config, train_data=windows, teacher=model, show_progress=False)
        result["runs"].append({"scale_space": space, "lr": float(lr),
                               "perplexity": compress.perplexity(student, tokenizer, protocol,
                                                                 show_progress=False)["perplexity"],
                               "seconds": round(time.perf_counter() - start, 1)})
        print(json.dumps(result["runs"][-1]), flush=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

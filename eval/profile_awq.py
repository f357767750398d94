"""Where AWQ's time goes, against GPTQ's, on a GPU: Qwen2.5-1.5B's shapes with random weights (the search's cost does
not depend on the values), 128 x 512 random calibration ids, W4 g128 sym, each dtype from the same weights:

    python eval/profile_awq.py --dtypes bfloat16,float32 --out eval/results/profile_awq_qwen2-1.5b-shape_h100.json

Each of AWQ's phases is timed with the device synchronised around it: the pass that records the statistics and the
blocks' float outputs (`LayerInputs`), the scale search per kind of group (the attention block for q/k/v, the MLP
for gate/up, XᵀX for a lone Linear), and clipping + rounding. `--tf32` adds rows with float32 matmuls on TF32 tensor
cores for the whole call (an upper bound on what TF32 in the search alone can buy).
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import compress
from compress.quantize import awq

SHAPE = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
             num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=False, max_position_embeddings=4096)


def synchronize() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(table: dict, key_of):
    """Wrap a function so that each call's synchronised seconds add to table[key_of(args)]."""
    def wrap(function):
        def inner(*args, **kwargs):
            synchronize()
            start = time.perf_counter()
            result = function(*args, **kwargs)
            synchronize()
            table[key_of(args)] += time.perf_counter() - start
            return result
        return inner
    return wrap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tf32", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    config = AutoConfig.for_model("qwen2", **{**SHAPE, "num_hidden_layers": args.layers})
    cuda = args.device.startswith("cuda")
    ids = torch.randint(0, config.vocab_size, (args.samples, args.seq_len))
    grid = dict(bits=4, group_size=128, sym=True)
    rows = []
    originals = dict(LayerInputs=awq.LayerInputs, search_scales=awq.search_scales,
                     _clip_and_round=awq._clip_and_round)
    for dtype_name in args.dtypes.split(","):
        for tf32 in ([False, True] if args.tf32 and dtype_name == "float32" else [False]):
            torch.set_float32_matmul_precision("high" if tf32 else "highest")
            for method in ("gptq", "awq"):
                torch.manual_seed(0)  # the same weights for every row
                with torch.device(args.device):
                    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype_name)).eval()
                phases: dict[str, float] = collections.defaultdict(float)
                awq.LayerInputs = timed(phases, lambda a: "statistics pass")(originals["LayerInputs"])
                awq.search_scales = timed(phases, lambda a: f"search {a[1].inspect.rsplit('.', 1)[-1]}"
                                          if awq.runs_block(a[1]) else "search lone Linear (XᵀX)"
                                          )(originals["search_scales"])
                awq._clip_and_round = timed(phases, lambda a: "clip and round")(originals["_clip_and_round"])
                quant = compress.GPTQ(**grid, act_order=True) if method == "gptq" else compress.AWQ(**grid)
                synchronize()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                compress.quantize(model, quant, ids, show_progress=False)
                del model
                synchronize()
                seconds = time.perf_counter() - start
                row = dict(dtype=dtype_name, tf32=tf32, method=method, seconds=round(seconds, 2),
                           peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None)
                if method == "awq":
                    row["phases"] = {k: round(v, 2) for k, v in sorted(phases.items(), key=lambda kv: -kv[1])}
                rows.append(row)
                print(json.dumps(row), flush=True)
    for name, function in originals.items():
        setattr(awq, name, function)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    args.out.write_text(json.dumps(dict(device=device, shape=SHAPE, samples=args.samples, seq_len=args.seq_len,
                                        layers=args.layers, rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()

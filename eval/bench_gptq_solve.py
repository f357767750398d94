"""Seconds of GPTQ's column sweep alone (no calibration forwards, no Hessian sums) at the Linear shapes of one pruned
SmolLM2-135M decoder layer (q/k/v stacked 960 x 576, o 576 x 448, gate/up stacked 2304 x 576, down 576 x 1152),
W4 g64 act-order, on synthetic correlated Hessians: the current `quantize_block` or the column loop as it was
before it worked on the transposed block on one thread (`--reference`). Checks that both give the same codes.

    python eval/bench_gptq_solve.py            # current
    python eval/bench_gptq_solve.py --reference
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from compress.config import GPTQ
from compress.quantize import gptq
from compress.quantize.grid import quantization_args

SHAPES = [(960, 576), (576, 448), (2304, 576), (576, 1152)]


def reference_quantize_block(block, upper, scale, zero, qmin, qmax):
    """The column loop before the change: strided columns of the block, the zero point always applied, torch's
    thread count as set."""
    quantized = torch.empty_like(block)
    errors = torch.empty_like(block)
    for i in range(block.shape[1]):
        w = block[:, i]
        q = (torch.clamp(torch.round(w / scale[:, i]) + zero[:, i], qmin, qmax) - zero[:, i]) * scale[:, i]
        error = (w - q) / upper[i, i]
        block[:, i:].addr_(error, upper[i, i:], alpha=-1)
        quantized[:, i] = q
        errors[:, i] = error
    return quantized, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", action="store_true", help="time the column loop as it was")
    parser.add_argument("--check", action="store_true", help="also compare the codes of both loops")
    args = parser.parse_args()
    config = GPTQ(bits=4, group_size=64, sym=True, act_order=True)
    grid = quantization_args(config, "weight")
    torch.manual_seed(0)
    problems = []
    for rows, cols in SHAPES:
        x = torch.randn(2048, cols) @ (torch.eye(cols) + 0.1 * torch.randn(cols, cols))
        hessian = 2 * x.T @ x / len(x)
        problems.append((torch.randn(rows, cols) * 0.02, hessian, gptq.hessian_factor(hessian, True, 0.01, "bench")))
    current = gptq.quantize_block
    if args.reference:
        gptq.quantize_block = reference_quantize_block
    start = time.perf_counter()
    results = [gptq.gptq_solve(w, h, grid, True, 0.01, 128, "bench", f)[0] for w, h, f in problems]
    seconds = time.perf_counter() - start
    out = {"loop": "reference" if args.reference else "current", "threads": torch.get_num_threads(),
           "seconds_one_layer": round(seconds, 3)}
    if args.check:
        gptq.quantize_block = current if args.reference else reference_quantize_block
        others = [gptq.gptq_solve(w, h, grid, True, 0.01, 128, "bench", f)[0] for w, h, f in problems]
        out["codes_differing"] = sum(int((a != b).sum()) for a, b in zip(results, others))
        out["codes_total"] = sum(a.numel() for a in results)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Does comparing AWQ's candidates on TF32 tensor cores change what AWQ chooses? Checked on the CPU by emulation:

    python eval/awq_tf32_check.py --out eval/results/awq_tf32_check_smollm2_cpu.json

On a GPU, `awq._search_precision` lets float32 matmuls run on TF32 tensor cores (10-bit mantissa, float32 sums)
while candidate scales and clipping ratios are compared. Here the same context rounds every float32 operand of
F.linear, @, torch.matmul, einsum and scaled_dot_product_attention to TF32 (round to nearest) before the product, so
the search sees what a GPU's TF32 product sees, and the run is otherwise today's AWQ. For each dtype: AWQ exact and
AWQ emulated from the same weights and calibration, how many groups chose the same scales, how many weights ended
on the same grid point, and each result's WikiText-2 perplexity.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_awq_cost import recording_scales  # noqa: E402
from wikitext_bench import WikitextBench, add_protocol_arguments  # noqa: E402

import compress  # noqa: E402
from compress.quantize import awq  # noqa: E402

GRID = dict(bits=4, group_size=64, sym=True)


def to_tf32(value):
    """float32 with its mantissa rounded to TF32's 10 bits (to nearest); anything else as it is."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
        return value
    bits = value.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


@contextlib.contextmanager
def emulated_tf32(device: torch.device):
    """`awq._search_precision` as a GPU runs it: TF32 operands, float32 sums."""
    functional = torch.nn.functional
    saved = dict(linear=functional.linear, sdpa=functional.scaled_dot_product_attention, matmul=torch.matmul,
                 einsum=torch.einsum, operator=torch.Tensor.__matmul__)
    functional.linear = lambda x, w, b=None: saved["linear"](to_tf32(x), to_tf32(w), b)
    functional.scaled_dot_product_attention = lambda q, k, v, *a, **kw: saved["sdpa"](
        to_tf32(q), to_tf32(k), to_tf32(v), *a, **kw)
    torch.matmul = lambda a, b, **kw: saved["matmul"](to_tf32(a), to_tf32(b), **kw)
    torch.einsum = lambda equation, *operands: saved["einsum"](equation, *[to_tf32(o) for o in operands])
    torch.Tensor.__matmul__ = lambda a, b: saved["operator"](to_tf32(a), to_tf32(b))
    try:
        yield
    finally:
        functional.linear, functional.scaled_dot_product_attention = saved["linear"], saved["sdpa"]
        torch.matmul, torch.einsum, torch.Tensor.__matmul__ = saved["matmul"], saved["einsum"], saved["operator"]


def quantized_codes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each rounded Linear's weights as grid points (weight / its group's scale)."""
    codes = {}
    for name, module in model.named_modules():
        quant = getattr(module, awq.QUANT_ATTR, None)
        if quant is not None:
            weight = module.weight.detach().float()
            rows, cols = weight.shape
            scale = quant.scale.float().reshape(rows, -1, 1)
            codes[name] = torch.round(weight.reshape(rows, scale.shape[1], -1) / scale).reshape(rows, cols)
    return codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_arguments(parser)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--command", default="python eval/awq_tf32_check.py "
                                              "--out eval/results/awq_tf32_check_smollm2_cpu.json")
    args = parser.parse_args()
    bench = WikitextBench(args.model, args.samples, args.seq_len, args.ppl_tokens, args.out, command=args.command,
                          setting="W4 g64 sym; AWQ: clip, 20 grid points, duo scaling, block loss")
    exact_search = awq._search_precision
    config = compress.AWQ(**GRID)
    for dtype in args.dtypes.split(","):
        scales: dict[str, list[torch.Tensor]] = {}
        codes: dict[str, dict[str, torch.Tensor]] = {}
        for name in ("exact", "tf32"):
            model = bench.fresh().to(getattr(torch, dtype))
            awq._search_precision = emulated_tf32 if name == "tf32" else exact_search
            fold = awq.fold_scales
            recording_scales(awq, scales.setdefault(name, []))
            wall = time.perf_counter()
            try:
                awq.quantize_awq(model, config, bench.ids, show_progress=False)
            finally:
                awq._search_precision, awq.fold_scales = exact_search, fold
            entry = {"variant": name, "dtype": dtype, "seconds": round(time.perf_counter() - wall, 1)}
            codes[name] = quantized_codes(model)
            if name == "tf32":
                same = sum(torch.equal(a, b) for a, b in zip(scales["tf32"], scales["exact"]))
                entry["groups_with_exact_scales"] = f"{same} of {len(scales['exact'])}"
                agree = sum((codes["tf32"][k] == codes["exact"][k]).sum().item() for k in codes["exact"])
                total = sum(c.numel() for c in codes["exact"].values())
                entry["weights_on_exact_grid_point"] = round(agree / total, 6)
            entry["perplexity"] = bench.perplexity(model)
            bench.record(entry)
            del model
        bench.write()


if __name__ == "__main__":
    main()

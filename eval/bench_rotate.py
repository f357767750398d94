"""Rotations before low-bit quantization on SmolLM2-135M (or `--model`): WikiText-2 perplexity of W4A4 FP4
(simulated: MXFP4 by RTN, NVFP4 by GPTQ, whose inputs' global scale needs calibration data), and of W3 g64 by
GPTQ, each with and without a
Hadamard rotation of the residual stream (compress.rotate), with the protocol of eval/bench_fp4.py (wikitext2-valid
calibration tokens, perplexity on 16,384 wikitext2-test tokens in 512-token windows):

    python eval/bench_rotate.py --out eval/results/bench_rotate_smollm2_cpu.json

Each variant starts from the same float weights; the rotated ones are rotated first (the float model's perplexity
is unchanged by it: variant rotate-float). Variants fold-*: the rotation's first step alone (each RMSNorm's weight
folded into the Linears that read it, no rotation), to tell the fold's effect on the rounding from the rotation's.
Variants inputs16/32/64-*: MR-GPTQ's block-wise Hadamard of every Linear's input instead (simulated online; no
stock loader runs it, see rotate_inputs).
For each pair the gap closed is (ppl without - ppl with) / (ppl without - ppl float). GPTQ runs with act-order and
damp 0.01 on `--samples` calibration windows.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import compress
from compress.architectures import family
from compress.rotate import fold_norms, hadamard, rotate_columns

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wikitext_bench import WikitextBench, add_protocol_arguments  # noqa: E402

ROTATIONS = {"rotate": lambda: compress.Rotate(), "rotate-random": lambda: compress.Rotate(kind="random"),
             "rotate-noheads": lambda: compress.Rotate(heads=False),
             "fold": lambda: None,  # the rotation's first step alone: the norms folded into their readers, Q = I
             # MR-GPTQ's (arXiv 2509.23202) block-wise Hadamard on every Linear's input, online (a simulation only)
             "inputs16": lambda: 16, "inputs32": lambda: 32, "inputs64": lambda: 64}
QUANTIZERS = {
    "float": None,
    "rtn-mxfp4-w4a4": lambda: compress.RTN(grid="mxfp4", activations="dynamic"),
    "gptq-nvfp4-w4a4": lambda: compress.GPTQ(grid="nvfp4", activations="dynamic", act_order=True, damp=0.01),
    "gptq-w3g64": lambda: compress.GPTQ(bits=3, group_size=64, act_order=True, damp=0.01),
}
DEFAULT = ("rotate-float,rtn-mxfp4-w4a4,rotate-rtn-mxfp4-w4a4,gptq-nvfp4-w4a4,rotate-gptq-nvfp4-w4a4,gptq-w3g64,"
           "rotate-gptq-w3g64")


def parse(name: str) -> tuple[str | None, str]:
    """A variant name -> (its rotation or None, its quantizer): `rotate-random-gptq-w3g64`, `rtn-nvfp4-w4a4`."""
    for rotation in sorted(ROTATIONS, key=len, reverse=True):
        if name.startswith(rotation + "-") and name[len(rotation) + 1:] in QUANTIZERS:
            return rotation, name[len(rotation) + 1:]
    if name not in QUANTIZERS:
        raise SystemExit(f"unknown variant {name!r}: [ROTATION-]QUANTIZER with ROTATION one of {', '.join(ROTATIONS)}"
                         f" and QUANTIZER one of {', '.join(QUANTIZERS)}")
    return None, name


def rotate_inputs(model: torch.nn.Module, size: int) -> None:
    """Every Linear but the head computes (x·H)(W·H)ᵀ = x·Wᵀ with H = diag(hadamard(size), ...): W·H is fused into the
    weight, x·H is taken on each call before the input is rounded (a forward pre-hook runs before the W4A4 forward).
    A simulation: stock transformers 5.25 ignores compressed-tensors' transform_config, so such a checkpoint would
    not run as it was measured, and compress.rotate does not offer it."""
    block = hadamard(size)
    for name, linear in model.named_modules():
        if isinstance(linear, torch.nn.Linear) and linear is not model.get_output_embeddings():
            linear.weight.data = rotate_columns(linear.weight.data, block)
            on_input = block.to(linear.weight.dtype)
            linear.register_forward_pre_hook(
                lambda module, args, on_input=on_input: ((args[0].unflatten(-1, (-1, size)) @ on_input).flatten(-2),))


def gaps(results: list[dict]) -> None:
    """Each rotated variant's share of the unrotated variant's gap to the float perplexity that it closes."""
    by_name = {entry["variant"]: entry for entry in results}
    if "float" not in by_name:
        return
    for entry in results:
        rotation, quantizer = parse(entry["variant"])
        if rotation and quantizer in by_name and quantizer != "float":
            plain = by_name[quantizer]["perplexity"]
            entry["gap_closed"] = round((plain - entry["perplexity"]) / (plain - by_name["float"]["perplexity"]), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_arguments(parser)
    parser.add_argument("--variants", default=DEFAULT, help="comma-separated [ROTATION-]QUANTIZER: rotations "
                        + ", ".join(ROTATIONS) + "; quantizers " + ", ".join(QUANTIZERS))
    parser.add_argument("--merge", nargs="*", default=[], help=(
        "results files of other invocations with the same model, calibration and protocol (e.g. variants run in "
        "parallel): their variants join these"))
    args = parser.parse_args()
    variants = [(name, *parse(name)) for name in filter(None, args.variants.split(","))]

    command = " ".join(["python eval/bench_rotate.py", *sys.argv[1:]])
    bench = WikitextBench(args.model, args.samples, args.seq_len, args.ppl_tokens, args.out, command=command)
    if variants:  # with none, only the merged files' variants (and their float row)
        bench.record({"variant": "float", "perplexity": bench.perplexity(bench.model)})
    for name, rotation, quantizer in variants:
        if name == "float":
            continue
        model = bench.fresh()
        entry: dict = {"variant": name}
        if rotation:
            config = ROTATIONS[rotation]()
            start = time.perf_counter()
            if config is None:
                fold_norms(model, family(model))
            elif isinstance(config, int):
                rotate_inputs(model, config)
            else:
                compress.rotate(model, config)
            described = (f"every Linear's input by a block-diagonal Hadamard of {config}, online (simulated)"
                         if isinstance(config, int) else config.describe() if config
                         else "norms folded into their readers only (Q = I)")
            entry.update(rotation=described,
                         rotate_seconds=round(time.perf_counter() - start, 1))
        if QUANTIZERS[quantizer]:
            config = QUANTIZERS[quantizer]()
            start = time.perf_counter()
            compress.quantize(model, config, bench.ids if quantizer.startswith("gptq") else None, show_progress=False)
            entry.update(config=config.describe(), seconds=round(time.perf_counter() - start, 1))
        entry["perplexity"] = bench.perplexity(model)
        bench.record(entry)
        gaps(bench.results["results"])
        bench.write()
        del model
    bench.merge(args.merge)
    gaps(bench.results["results"])
    bench.write()


if __name__ == "__main__":
    main()

"""Does AWQ make each decoder layer better than round-to-nearest, on held-out tokens? Per chosen layer of a real
model (float32, CPU): the layer's output error after RTN and after AWQ (scales searched on calibration set A, then
without and with clipping), and with one group's AWQ scales alone (the rest RTN), measured on set A and on a held-out
set B (another draw of wikitext2-valid windows); every error relative (Σ‖Δ‖² / Σ‖y‖²), split into the first token
of each window (where Qwen2's massive activations sit) and the rest; and the share of each Linear's squared input
(Σ‖x‖² on set A) that the first tokens hold:

    python eval/awq_layer_errors.py --model QWEN_GGUF --layers 0,1,2,5,14,26 \\
        --out eval/results/awq_layer_errors_qwen2.5-coder-1.5b_cpu.json

Each layer is searched on the float outputs of the float layers before it, as compress.quantize(AWQ) does (the
whole pipeline gives the same errors on the first three layers); W4 symmetric, groups of --group-size. Also RTN with
AWQ's clipping alone (no scales), and with `--nll` each variant's held-out NLL increase (the float model with that one
layer swapped in, on set B's windows), which says whether a lower output error is a lower loss:

    python eval/awq_layer_errors.py --model QWEN_GGUF --layers 0 --nll \
        --out eval/results/awq_layer_parts_qwen2.5-coder-1.5b_cpu.json

With `--clip-each`, in place of the clipping-alone and one-group-alone rows: AWQ's scales with one Linear's groups
clipped and the others only rounded, for each Linear that AWQ clips, which says whose clipping costs the loss (error
on held-out set B, and its NLL with `--nll`)."""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import compress
from compress.architectures import family
from compress.data import calibration_batches
from compress.quantize.awq import (
    UNCLIPPED,
    LayerInputs,
    _clip_and_round,
    _rounded,
    fold_scales,
    layer_groups,
    search_scales,
)
from compress.quantize.grid import quantizable_linears, quantization_args
from compress.quantize.layerwise import LayerwiseCalibration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from awq_layer_sensitivity import mean_nll, swapped_nll  # noqa: E402


class Frozen:
    """A calibration whose `propagate` runs the layer on its inputs without replacing them (LayerInputs records)."""

    def __init__(self, calibration: LayerwiseCalibration):
        self.calibration = calibration

    def propagate(self, layer, index):
        for hidden, kwargs in zip(self.calibration.hidden, self.calibration.kwargs):
            layer(hidden, **kwargs)


def outputs(layer, calibration) -> torch.Tensor:
    results = (layer(h, **kw) for h, kw in zip(calibration.hidden, calibration.kwargs))
    return torch.cat([r[0] if isinstance(r, tuple) else r for r in results])


def errors(layer, calibration, reference) -> dict:
    """Relative output error on the first token of each window and on the rest."""
    difference = (outputs(layer, calibration) - reference).pow(2).sum(-1)
    size = reference.pow(2).sum(-1)
    return {"rest": float(difference[:, 1:].sum() / size[:, 1:].sum()),
            "first": float(difference[:, 0].sum() / size[:, 0].sum())}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default="0,1,2")
    parser.add_argument("--samples", type=int, default=8, help="windows of 512 tokens in each of A and B")
    parser.add_argument("--search-samples", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--nll", action="store_true", help="also each variant's held-out NLL increase: the float "
                        "model with that one layer swapped in, scored on set B's windows")
    parser.add_argument("--clip-each", action="store_true", help="also AWQ with one Linear clipped, for each")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(2)
    targets = [int(t) for t in args.layers.split(",")]
    model, tokenizer = compress.load_model(args.model, "float32", "cpu")
    config = compress.AWQ(bits=4, group_size=args.group_size, search_tokens=args.search_samples * 512)
    grid = quantization_args(config)
    known = family(model)
    sets = {name: LayerwiseCalibration(model, calibration_batches(tokenizer, "wikitext2-valid", args.samples, 512,
                                                                  seed=seed), torch.device("cpu"),
                                       batch_tokens=args.samples * 512) for name, seed in (("A", 0), ("B", 1))}
    held_out = calibration_batches(tokenizer, "wikitext2-valid", args.samples, 512, seed=1)  # set B's windows
    float_nll = mean_nll(model, held_out, batch=4) if args.nll else None
    rows = []
    for index, layer in enumerate(sets["A"].layers):
        if index > max(targets):
            break
        if index in targets:
            start = time.time()
            shares, handles = {}, []
            for name, linear in quantizable_linears(layer):  # how much of each input's Σ‖x‖² the first tokens hold
                def share(module, inputs, name=name):
                    energy = inputs[0].float().pow(2).sum(-1)
                    first, total = shares.get(name, (0.0, 0.0))
                    shares[name] = (first + float(energy[:, 0].sum()), total + float(energy.sum()))
                handles.append(linear.register_forward_pre_hook(share))
            reference = {"A": outputs(layer, sets["A"])}
            for handle in handles:
                handle.remove()
            reference["B"] = outputs(layer, sets["B"])
            row = {"layer": index, "first_token_share_of_input_energy": {
                name.split(".")[-1]: round(first / total, 4) for name, (first, total) in shares.items()}}

            def measured(candidate, only=("A", "B")):
                result = {name: errors(candidate, sets[name], reference[name]) for name in only}
                if args.nll:
                    result["nll_increase"] = swapped_nll(model, index, candidate, held_out, batch=4) - float_nll
                return result

            rtn = copy.deepcopy(layer)
            for _, linear in quantizable_linears(rtn):
                linear.weight.copy_(_rounded(linear.weight, grid))
            row["rtn"] = measured(rtn)
            if not args.clip_each:  # clipping alone: no scales, each group's range searched, then rounded
                clipped = copy.deepcopy(layer)
                _clip_and_round(dict(quantizable_linears(clipped)), LayerInputs(
                    Frozen(sets["A"]), clipped, index, [], dict(quantizable_linears(clipped)), record_blocks=False),
                    {}, grid, clip=True, round_now=True)
                row["rtn_clip"] = measured(clipped)
            groups = layer_groups(layer, index, known)
            scaled = copy.deepcopy(layer)
            inputs = LayerInputs(Frozen(sets["A"]), scaled, index, groups, dict(quantizable_linears(scaled)),
                                 search_samples=args.search_samples)
            scales_of, row["scales"] = {}, {}
            for group in groups:
                scales = search_scales(scaled, group, inputs, grid, config, f"layer {index}")
                fold_scales(scaled, group, scales)
                scales_of.update(dict.fromkeys(group.linears, scales))
                row["scales"][group.prev] = [float(scales.min()), float(scales.max())]
            for clip in (False, True):
                awq = copy.deepcopy(scaled)
                _clip_and_round(dict(quantizable_linears(awq)), inputs, scales_of, grid, clip, round_now=True)
                row[f"awq_clip_{str(clip).lower()}"] = measured(awq)
            clipped_names = [n for n, _ in quantizable_linears(scaled) if n.rsplit(".", 1)[-1] not in UNCLIPPED]
            for only in clipped_names if args.clip_each else []:
                awq = copy.deepcopy(scaled)
                linears = dict(quantizable_linears(awq))
                _clip_and_round({only: linears.pop(only)}, inputs, scales_of, grid, True, round_now=True)
                _clip_and_round(linears, inputs, scales_of, grid, False, round_now=True)
                row[f"awq_clip_only_{only.rsplit('.', 1)[-1]}"] = measured(awq, ("B",))
            for group in [] if args.clip_each else groups:  # one group's scales alone, every Linear rounded
                alone = copy.deepcopy(layer)
                fold_scales(alone, group, scales_of[group.linears[0]])
                for _, linear in quantizable_linears(alone):
                    linear.weight.copy_(_rounded(linear.weight, grid))
                row[f"only_{group.prev}_scaled"] = measured(alone, ("B",))
            row["seconds"] = round(time.time() - start, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps({"model": Path(args.model).name, "config": config.describe(),
                                                      "samples": args.samples, "float_nll": float_nll, "rows": rows},
                                                     indent=1) + "\n")
        for calibration in sets.values():
            calibration.propagate(layer, index)


if __name__ == "__main__":
    main()

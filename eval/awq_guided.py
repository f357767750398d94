"""AWQ judged by the loss's gradient: does weighting each output error by how much the model's loss cares about it make
AWQ's layers better for the loss than round-to-nearest's, where the plain squared error does not
(docs/benchmarks.md, "Per layer, lower output error is not lower loss")?

The weights are the diagonal Fisher approximation of the loss change, ΔL ≈ ½ Σ g²·Δy² with g = ∂L/∂y the gradient of
the float model's NLL at the block's output y (one backward pass over calibration set A, per token and channel; as in
GuidedQuant, Kim et al. 2025, which weights GPTQ's objective this way). The scale search's block error (attention and
MLP outputs) becomes Σ g²·Δy²; a lone Linear's error and the clipping, which use XᵀX of the Linear's input, use
Σ_t ‖g_t‖²·x_t x_tᵀ (a weight per token: per output channel it would be one Gram matrix a channel). Per chosen layer
of a real model (float32, CPU), the held-out NLL increase of the float model with that one layer swapped in (set B's
windows), for RTN, AWQ (with and without clipping) and guided AWQ (with and without clipping):

    python eval/awq_guided.py --model QWEN_GGUF --layers 0,7 --out eval/results/awq_guided_qwen2.5-coder-1.5b_cpu.json
"""

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
from compress.modules import decoder_layers
from compress.quantize.awq import LayerInputs, _clip_and_round, _rounded, fold_scales, layer_groups, search_scales
from compress.quantize.grid import quantizable_linears, quantization_args
from compress.quantize.layerwise import LayerwiseCalibration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from awq_layer_errors import Frozen, errors, outputs  # noqa: E402
from awq_layer_sensitivity import mean_nll, swapped_nll  # noqa: E402

BLOCKS = ("self_attn", "mlp")  # the two outputs a decoder layer adds into the residual stream


def output_gradients(model, targets: list[int], windows: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    """∂(summed NLL)/∂(output) of each target layer's attention and MLP on `windows`, [windows, tokens, hidden]."""
    layers = decoder_layers(model)
    kept: dict[tuple[int, str], list[torch.Tensor]] = {}
    current: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for index in targets:
        for block in BLOCKS:
            def hook(module, args, output, key=(index, block)):
                tensor = output[0] if isinstance(output, tuple) else output
                if tensor.requires_grad:
                    tensor.retain_grad()
                else:  # the first block after the embedding, which nothing trains: a leaf to differentiate at
                    tensor.requires_grad_(True)
                current[key] = tensor
            handles.append(layers[index].get_submodule(block).register_forward_hook(hook))
    try:
        for window in windows:
            with torch.enable_grad():
                ids = window[None]
                logits = model(input_ids=ids).logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                         reduction="sum")
                loss.backward()
            for key, tensor in current.items():
                kept.setdefault(key, []).append(tensor.grad.detach()[0].clone())
            current.clear()
    finally:
        for handle in handles:
            handle.remove()
    return {key: torch.stack(values) for key, values in kept.items()}


def token_weighted_grams(layer, calibration, token_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Σ_t w_t x_t x_tᵀ of every Linear's input over the calibration chunks, w from the block the Linear is in."""
    grams, seen, handles = {}, {}, []
    for name, linear in quantizable_linears(layer):
        def hook(module, args, name=name, weights=token_weights[name.split(".")[0]]):
            x = args[0].float()
            first = seen.get(name, 0)
            seen[name] = first + x.shape[0]
            w = weights[first:first + x.shape[0]].to(x.device).reshape(-1)
            x = x.reshape(-1, x.shape[-1])
            grams[name] = grams.get(name, 0) + (x * w[:, None]).T @ x
        handles.append(linear.register_forward_pre_hook(hook))
    try:
        for hidden, kwargs in zip(calibration.hidden, calibration.kwargs):
            layer(hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return grams


def guide(inputs: LayerInputs, gradients: dict[str, torch.Tensor], layer, calibration) -> None:
    """Make `inputs` judge by the gradient-weighted errors (in place)."""
    squared = {block: g.pow(2) / g.pow(2).mean() for block, g in gradients.items()}  # normalised: only ratios matter

    def output_error(block: torch.nn.Module, name: str) -> float:
        total, first = 0.0, 0
        for x, kwargs, reference in zip(inputs.inputs[name], inputs.kwargs[name], inputs.outputs[name]):
            output = block(x, **kwargs)
            output = output[0] if isinstance(output, tuple) else output
            weight = squared[name.split(".")[0]][first:first + x.shape[0]]
            first += x.shape[0]
            total += ((output.float() - reference.float()).pow(2) * weight).sum().item()
        return total

    inputs.output_error = output_error
    token_weights = {block: s.sum(-1) for block, s in squared.items()}
    inputs.grams.update(token_weighted_grams(layer, calibration, token_weights))


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default="0")
    parser.add_argument("--samples", type=int, default=8, help="windows of 512 tokens in each of A and B")
    parser.add_argument("--search-samples", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(2)
    targets = sorted(int(t) for t in args.layers.split(","))
    model, tokenizer = compress.load_model(args.model, "float32", "cpu")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    config = compress.AWQ(bits=4, group_size=args.group_size, search_tokens=args.search_samples * 512)
    grid = quantization_args(config)
    known = family(model)
    windows = {name: calibration_batches(tokenizer, "wikitext2-valid", args.samples, 512, seed=seed)
               for name, seed in (("A", 0), ("B", 1))}
    start = time.time()
    gradients = output_gradients(model, targets, windows["A"])
    gradient_seconds = round(time.time() - start, 1)
    sets = {name: LayerwiseCalibration(model, ids, torch.device("cpu"), batch_tokens=args.samples * 512)
            for name, ids in windows.items()}
    float_nll = mean_nll(model, windows["B"], batch=4)
    rows = []
    for index, layer in enumerate(sets["A"].layers):
        if index > targets[-1]:
            break
        if index in targets:
            start = time.time()
            reference = outputs(layer, sets["B"])
            row = {"layer": index}

            def measured(candidate):
                return {"B": errors(candidate, sets["B"], reference),
                        "nll_increase": swapped_nll(model, index, candidate, windows["B"], batch=4) - float_nll}

            rtn = copy.deepcopy(layer)
            for _, linear in quantizable_linears(rtn):
                linear.weight.copy_(_rounded(linear.weight, grid))
            row["rtn"] = measured(rtn)
            groups = layer_groups(layer, index, known)
            for guided in (False, True):
                scaled = copy.deepcopy(layer)
                inputs = LayerInputs(Frozen(sets["A"]), scaled, index, groups, dict(quantizable_linears(scaled)),
                                     search_samples=args.search_samples)
                if guided:
                    guide(inputs, {block: gradients[(index, block)] for block in BLOCKS}, scaled, sets["A"])
                scales_of = {}
                for group in groups:
                    scales = search_scales(scaled, group, inputs, grid, config, f"layer {index}")
                    fold_scales(scaled, group, scales)
                    scales_of.update(dict.fromkeys(group.linears, scales))
                for clip in (False, True):
                    awq = copy.deepcopy(scaled)
                    _clip_and_round(dict(quantizable_linears(awq)), inputs, scales_of, grid, clip, round_now=True)
                    row[f"{'guided' if guided else 'awq'}_clip_{str(clip).lower()}"] = measured(awq)
            row["seconds"] = round(time.time() - start, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps({
                    "model": Path(args.model).name, "config": config.describe(), "samples": args.samples,
                    "search_samples": args.search_samples, "gradient_seconds": gradient_seconds,
                    "float_nll": float_nll, "rows": rows,
                    "command": "python eval/awq_guided.py --model MODEL --layers " + args.layers + " --samples "
                    + str(args.samples) + " --search-samples " + str(args.search_samples)}, indent=1) + "\n")
        for calibration in sets.values():
            calibration.propagate(layer, index)


if __name__ == "__main__":
    main()

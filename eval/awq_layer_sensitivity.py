"""Which decoder layers does AWQ quantize worse than round-to-nearest, as the model's own predictions see it? The
model quantized whole by RTN and by AWQ (same grid, same calibration set A); then, one layer at a time, the float
model with that layer taken from the RTN model or from the AWQ model (AWQ's folded norms are inside the layer, so the
swap is exact), scored by its negative log-likelihood on held-out windows B of wikitext2-valid:

    python eval/awq_layer_sensitivity.py --model QWEN_GGUF --dtype bfloat16 --device cuda \\
        --out eval/results/awq_layer_sensitivity_qwen2.5-coder-1.5b_h100.json

Per layer: the NLL increase over the float model's with RTN's layer and with AWQ's (nats per token); a layer where
AWQ's is the larger is one where AWQ's lower output error (eval/awq_layer_errors.py) does not carry to the output.
Also per layer the AWQ model with that one layer from the RTN model (interactions), and at the end the RTN model with
AWQ's layers wherever AWQ's alone was the better (with every layer measured)."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

import compress
from compress.data import calibration_batches
from compress.modules import decoder_layers


@torch.no_grad()
def mean_nll(model, windows: torch.Tensor, batch: int) -> float:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(windows), batch):
        ids = windows[start:start + batch].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                         reduction="sum"))
        count += ids[:, 1:].numel()
    return total / count


def swapped_nll(model, index: int, layer, windows: torch.Tensor, batch: int) -> float:
    """The held-out NLL of `model` with decoder layer `index` replaced by `layer` (restored afterwards)."""
    layers = decoder_layers(model)
    original, layers[index] = layers[index], layer
    try:
        return mean_nll(model, windows, batch)
    finally:
        layers[index] = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=32, help="windows of 512 tokens in A (calibration) and in B")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", help="comma-separated layer indices (default: all)")
    parser.add_argument("--awq-options", default="{}", help='AWQ settings as JSON, e.g. \'{"clip": false}\'')
    parser.add_argument("--out")
    args = parser.parse_args()
    model, tokenizer = compress.load_model(args.model, args.dtype, args.device)
    calibration = calibration_batches(tokenizer, "wikitext2-valid", args.samples, 512, seed=0).to(args.device)
    held_out = calibration_batches(tokenizer, "wikitext2-valid", args.samples, 512, seed=1)
    grid = dict(bits=args.bits, group_size=args.group_size)
    awq = compress.AWQ(**grid, **json.loads(args.awq_options))
    quantized = {}
    for name, config in (("rtn", compress.RTN(**grid)), ("awq", awq)):
        quantized[name] = copy.deepcopy(model)
        compress.quantize(quantized[name], config, calibration, show_progress=False)
    result = {"model": Path(args.model).name, "dtype": args.dtype, "grid": f"W{args.bits} g{args.group_size} sym",
              "awq": awq.describe(),
              "samples": args.samples, "whole": {}, "float_nll": mean_nll(model, held_out, args.batch), "layers": []}
    for name, whole in quantized.items():
        result["whole"][name] = mean_nll(whole, held_out, args.batch) - result["float_nll"]
    print(json.dumps({k: v for k, v in result.items() if k != "layers"}), flush=True)
    layers = decoder_layers(model)
    chosen = range(len(layers)) if not args.layers else [int(i) for i in args.layers.split(",")]
    for index in chosen:
        row = {"layer": index}
        for name, whole in quantized.items():
            row[name] = swapped_nll(model, index, decoder_layers(whole)[index], held_out, args.batch) \
                - result["float_nll"]
        row["awq_worse"] = row["awq"] > row["rtn"]
        # the other way round: the AWQ model with this one layer from the RTN model (interactions show here)
        row["awq_model_with_rtn_layer"] = swapped_nll(quantized["awq"], index, decoder_layers(quantized["rtn"])[index],
                                                      held_out, args.batch) - result["float_nll"]
        result["layers"].append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if not args.layers:  # the RTN model with AWQ's layer wherever AWQ's alone did better
        rtn_layers, awq_layers = decoder_layers(quantized["rtn"]), decoder_layers(quantized["awq"])
        chosen = [row["layer"] for row in result["layers"] if not row["awq_worse"]]
        for index in chosen:
            rtn_layers[index] = awq_layers[index]
        result["rtn_with_better_awq_layers"] = {"layers": chosen, "nll_increase": mean_nll(
            quantized["rtn"], held_out, args.batch) - result["float_nll"]}
        print(json.dumps(result["rtn_with_better_awq_layers"]), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""What smoothing buys (SmolLM2 by default; `--model` another): WikiText-2 perplexity (seq_len 512, the first 4,096
tokens, as the SmolLM2 tests score it) of the float model, of W8A8 int8 without smoothing (int8 weights per channel and
int8 inputs per token, nothing folded), and of SmoothQuant with alpha 0.5 and alpha searched per group, on 128 x 512
calibration tokens (`--samples`).
With `--peer-python` (a virtualenv with llm-compressor; it pins transformers <= 5.17, so never ours), also
llm-compressor's SmoothQuantModifier (alpha 0.5) + W8A8 preset on the same token ids, its weights scored here with
the same int8 inputs per token (eval/peer_llmcompressor.py --method smoothquant).

    python eval/smoothquant_quality.py --threads 1 --out OUT.json
    python eval/smoothquant_quality.py --rows alpha0.5,peer --peer-python LLMC/bin/python --out OUT.json
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
from compress.data import calibration_batches
from compress.quantize.grid import fake_quantize, minmax_qparams, quantizable_linears
from compress.quantize.int8_runtime import WEIGHT_ARGS, enable_int8_activations

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wikitext_bench import peer_weights  # noqa: E402

ROWS = ("plain", "alpha0.5", "alphasearch", "peer")  # the float row always runs
DEFAULT_ROWS = "plain,alpha0.5,alphasearch"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--out")
    parser.add_argument("--rows", default=DEFAULT_ROWS, help="comma-separated: " + ", ".join(ROWS))
    parser.add_argument("--peer-python", help="python of a virtualenv with llm-compressor (row peer)")
    parser.add_argument("--model", default="smollm2-135m", help="a registry name, folder or GGUF file")
    parser.add_argument("--dtype", default="float32", help="the model's dtype (bfloat16 for larger models on a CPU)")
    parser.add_argument("--samples", type=int, default=128, help="calibration windows of 512 tokens")
    args = parser.parse_args()
    wanted = args.rows.split(",")
    unknown = sorted(set(wanted) - set(ROWS))
    if unknown or ("peer" in wanted and not args.peer_python):
        parser.error(f"unknown rows {unknown}" if unknown else "row peer needs --peer-python")
    if args.threads:
        torch.set_num_threads(args.threads)
    ppl_config = compress.Perplexity(seq_len=512, max_tokens=4096)
    model, tokenizer = compress.load_model(args.model, args.dtype)

    def ppl(m) -> float:
        return round(compress.perplexity(m, tokenizer, ppl_config, show_progress=False)["perplexity"], 4)

    rows = {args.dtype: ppl(model)}
    if "plain" in wanted:
        plain = copy.deepcopy(model)
        with torch.no_grad():
            for _, linear in quantizable_linears(plain):
                scale, zero = minmax_qparams(linear.weight, WEIGHT_ARGS)
                linear.weight.copy_(fake_quantize(linear.weight, scale, zero, WEIGHT_ARGS))
                enable_int8_activations(linear)
        rows["W8A8 int8, no smoothing"] = ppl(plain)
        del plain
        print(json.dumps(rows), flush=True)
    ids = calibration_batches(tokenizer, "wikitext2-valid", samples=args.samples, seq_len=512)
    seconds = {}
    if "peer" in wanted:
        peer, seconds["llm-compressor alpha 0.5"] = _peer(args.peer_python, model, tokenizer, ids)
        rows["llm-compressor SmoothQuant alpha 0.5 + W8A8"] = ppl(peer)
        del peer
        print(json.dumps(rows), flush=True)
    for alpha in [a for a in (0.5, "search") if f"alpha{a}" in wanted]:
        started = time.perf_counter()
        quantized = compress.quantize(copy.deepcopy(model), compress.SmoothQuant(alpha=alpha), ids,
                                      show_progress=False)
        seconds[f"alpha {alpha}"] = round(time.perf_counter() - started, 1)
        rows[f"SmoothQuant alpha {alpha}"] = ppl(quantized)
        print(json.dumps(rows), flush=True)
    command = "python eval/smoothquant_quality.py" + (f" --threads {args.threads}" if args.threads else "")
    if args.rows != DEFAULT_ROWS:
        command += f" --rows {args.rows}"
    if args.peer_python:
        command += " --peer-python LLMC/bin/python"
    if args.model != "smollm2-135m":
        command += f" --model {Path(args.model).name} --dtype {args.dtype} --samples {args.samples}"
    result = {"command": command,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "protocol": f"WikiText-2 test, seq_len 512, first 4,096 tokens; calibration wikitext2-valid "
                          f"{args.samples} x 512",
              "perplexity": rows, "vs_float": {k: round(v / rows[args.dtype], 4) for k, v in rows.items()},
              "quantize_seconds": seconds}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


def _peer(python: str, model, tokenizer, ids: torch.Tensor) -> tuple[torch.nn.Module, float]:
    """llm-compressor's SmoothQuant + W8A8 on `ids` in its own virtualenv; its weights (the smoothed norms and the
    int8 grid's Linear weights) loaded into a copy of `model`, every quantized Linear's input on int8 per token."""
    weights, report = peer_weights(python, model, tokenizer, ids, ["--method", "smoothquant", "--alpha", "0.5"])
    peer = copy.deepcopy(model)
    missing, _ = peer.load_state_dict(weights, strict=False)
    if missing:
        sys.exit(f"llm-compressor's weights lack {missing[:5]}")
    for _, linear in quantizable_linears(peer):
        enable_int8_activations(linear)
    return peer, round(report["seconds"], 1)


if __name__ == "__main__":
    main()

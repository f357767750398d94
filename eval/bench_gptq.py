"""GPTQ speed, peak memory and quality: compress vs llm-compressor, side by side in one invocation.

Speed and memory at Llama-2-7B shape (random weights, random-token calibration) on one GPU:
    python eval/bench_gptq.py --model llama2-7b-shape --device cuda --samples 128 --seq-len 2048 \\
        --group-size 128 --modes resident,offload --peer-python /path/to/llmc-venv/bin/python

Quality and CPU speed on SmolLM2-135M (WikiText-2 calibration and perplexity), with RTN at the same settings:
    python eval/bench_gptq.py --model smollm2-135m --device cpu --samples 128 --seq-len 512 \\
        --group-size 64 --bits 4,3 --perplexity --peer-python /path/to/llmc-venv/bin/python

llm-compressor runs in its own virtualenv (`--peer-python`; it pins transformers <= 5.17) through
eval/peer_llmcompressor.py on the same token ids and GPTQ settings (sym, static act-order, damp 0.01, block 128).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import LLAMA2_7B, random_llama, random_tokens, run_peer, timed  # noqa: E402

import compress  # noqa: E402
from compress.data import calibration_batches  # noqa: E402

GIB = 2**30


def _peer(args, bits: int, ids_path: Path, weights_path: Path | None) -> dict:
    arguments = ["--ids", str(ids_path), "--bits", str(bits), "--group-size", str(args.group_size), "--device",
                 args.device, "--dtype", args.dtype,
                 "--model", "llama2-7b-shape" if args.model == "llama2-7b-shape" else str(args.base_folder)]
    if weights_path:
        arguments += ["--save-weights", str(weights_path)]
    return run_peer(args.peer_python, arguments, args.peer_pythonpath)


def _model(args):
    dtype = getattr(torch, args.dtype)
    if args.model == "llama2-7b-shape":
        return random_llama(LLAMA2_7B, dtype, args.device), None
    return compress.load_model(args.model, args.dtype, args.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama2-7b-shape", help="llama2-7b-shape or a compress model source")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--bits", default="4", help="comma-separated")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--modes", default="resident", help="resident,offload")
    parser.add_argument("--schedules", default="sequential", help="sequential,two_pass")
    parser.add_argument("--batch-tokens", default="auto", help="comma-separated: auto (whole set when it fits) or N "
                                                                "(chunks of N tokens, as when memory is short)")
    parser.add_argument("--perplexity", action="store_true", help="WikiText-2 perplexity of every result")
    parser.add_argument("--ppl-tokens", type=int, default=16384)
    parser.add_argument("--peer-python", help="python of a virtualenv with llm-compressor; omit to skip it")
    parser.add_argument("--peer-pythonpath", help="PYTHONPATH for the peer (e.g. a --target install)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")

    model, tokenizer = _model(args)
    if tokenizer is None:
        ids = random_tokens(args.samples, args.seq_len, model.config.vocab_size)
    else:
        ids = calibration_batches(tokenizer, "wikitext2-valid", args.samples, args.seq_len, seed=0)
    protocol = compress.Perplexity(seq_len=512, max_tokens=args.ppl_tokens, batch_size=8)
    ppl = (lambda m: compress.perplexity(m, tokenizer, protocol, show_progress=False)["perplexity"]) \
        if args.perplexity else (lambda m: None)
    results = []
    if args.perplexity:
        results.append({"tool": "base (no quantization)", "perplexity": ppl(model)})
    work = Path(tempfile.mkdtemp(prefix="bench-gptq-"))
    ids_path = work / "ids.pt"
    torch.save(ids, ids_path)
    pristine = None
    if args.model != "llama2-7b-shape":
        pristine = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        args.base_folder = work / "base"  # the peer reads a plain HF folder (it cannot take a GGUF file)
        compress.save_model(model, tokenizer, args.base_folder)

    def fresh():
        # 7B shape: the values do not matter for speed, and a pristine copy would double host memory
        if pristine is not None:
            model.load_state_dict(pristine)
        return model

    for bits in [int(b) for b in args.bits.split(",")]:
        setting = f"W{bits} g{args.group_size}"
        reference = None  # the first variant's first and last layers, to compare the others' weights against
        variants = [(mode, schedule, tokens) for mode in args.modes.split(",")
                    for schedule in args.schedules.split(",") for tokens in args.batch_tokens.split(",")]
        for mode, schedule, tokens in variants:
            if args.model == "llama2-7b-shape" and reference is not None:  # a fresh random model, the same weights
                m = None  # the previous variant's model freed before the next is built
                torch.cuda.empty_cache()
                model = random_llama(LLAMA2_7B, getattr(torch, args.dtype), args.device)
                m = model
            else:
                m = fresh()
            if mode == "offload":
                m.to("cpu")
            config = compress.GPTQ(bits=bits, group_size=args.group_size, act_order=True, damp=0.01,
                                   offload=(mode == "offload"), schedule=schedule,
                                   batch_tokens=None if tokens == "auto" else int(tokens))
            _, seconds, peak = timed(lambda: compress.quantize(m, config, ids, show_progress=False))
            edges = [m.model.layers[0], m.model.layers[-1]]
            weights = torch.cat([p.detach().flatten().float().cpu() for layer in edges for p in layer.parameters()])
            reference = weights if reference is None else reference
            results.append({"tool": f"compress {compress.__version__} ({mode}, {schedule}, batch_tokens {tokens})",
                            "setting": setting, "seconds": seconds, "peak_cuda_bytes": peak, "perplexity": ppl(m),
                            "same_weights_as_first_variant": (weights == reference).float().mean().item()})
            print(json.dumps(results[-1]), flush=True)
            if mode == "offload":
                m.to(args.device)
        if args.perplexity:
            m = compress.quantize(fresh(), compress.RTN(bits=bits, group_size=args.group_size))
            results.append({"tool": "RTN (compress)", "setting": setting, "perplexity": ppl(m)})
        if args.peer_python:
            weights_path = work / f"peer-w{bits}.safetensors" if args.perplexity else None
            if args.model == "llama2-7b-shape" and args.device.startswith("cuda"):
                model.to("cpu")  # free the GPU for the peer's own copy
                torch.cuda.empty_cache()
            peer = _peer(args, bits, ids_path, weights_path)
            if args.model == "llama2-7b-shape" and args.device.startswith("cuda"):
                model.to(args.device)
            peer.update(setting=setting)
            if weights_path:
                from safetensors.torch import load_file

                m = fresh()
                m.load_state_dict(load_file(weights_path), strict=False)
                peer["perplexity"] = ppl(m)
            results.append(peer)
            print(json.dumps(results[-1]), flush=True)

    print(f"\n{args.model}, {args.samples} x {args.seq_len} calibration, {args.device} ({_device_name(args.device)}), "
          f"{args.dtype}\n")
    print("| tool | setting | seconds | peak GPU GiB | WikiText-2 ppl |\n|---|---|---:|---:|---:|")
    for r in results:
        seconds = f"{r['seconds']:.1f}" if r.get("seconds") is not None else ""
        peak = f"{r['peak_cuda_bytes'] / GIB:.2f}" if r.get("peak_cuda_bytes") else ""
        perplexity = f"{r['perplexity']:.3f}" if r.get("perplexity") is not None else ""
        print(f"| {r['tool']} | {r.get('setting', '')} | {seconds} | {peak} | {perplexity} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{os.cpu_count()} CPU cores"


if __name__ == "__main__":
    main()

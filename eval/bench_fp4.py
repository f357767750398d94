"""FP4 grids on SmolLM2-135M: WikiText-2 perplexity of NVFP4 and MXFP4 weights by RTN and by GPTQ, NVFP4 W4A4
(simulated), and the integer W4 g64 grid beside them, with the protocol of eval/bench_gptq.py (128 x 512
wikitext2-valid calibration tokens, perplexity on 16,384 wikitext2-test tokens in 512-token windows):

    python eval/bench_fp4.py --out eval/results/bench_fp4_smollm2_cpu.json

Each variant starts from the same float weights. GPTQ runs with act-order (static groups) and damp 0.01, as the
integer figures in eval/results/bench_gptq_smollm2_w4_cpu.json. Variant llmcompressor-nvfp4a16 runs llm-compressor's
GPTQModifier with its NVFP4A16 preset (same settings and token ids) in its own virtualenv, through
eval/peer_llmcompressor.py (`--peer-python`; see eval/bench_gptq.py), and scores its weights here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import compress
from compress.data import calibration_batches

VARIANTS = {
    "rtn-nvfp4": lambda: compress.RTN(grid="nvfp4"),
    "rtn-mxfp4": lambda: compress.RTN(grid="mxfp4"),
    "rtn-w4g64": lambda: compress.RTN(bits=4, group_size=64),
    "gptq-nvfp4": lambda: compress.GPTQ(grid="nvfp4"),
    "gptq-mxfp4": lambda: compress.GPTQ(grid="mxfp4"),
    "gptq-nvfp4-w4a4": lambda: compress.GPTQ(grid="nvfp4", activations="dynamic"),
    "rtn-mxfp4-w4a4": lambda: compress.RTN(grid="mxfp4", activations="dynamic"),
    "gptq-w4g64": lambda: compress.GPTQ(bits=4, group_size=64),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--ppl-tokens", type=int, default=16384)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    parser.add_argument("--peer-python", help="python of a virtualenv with llm-compressor (llmcompressor-nvfp4a16)")
    parser.add_argument("--out", help="write the results as JSON here (each variant as it finishes)")
    args = parser.parse_args()

    model, tokenizer = compress.load_model(args.model, "float32", "cpu")
    ids = calibration_batches(tokenizer, "wikitext2-valid", args.samples, args.seq_len, seed=0)
    protocol = compress.Perplexity(seq_len=512, max_tokens=args.ppl_tokens, batch_size=8)
    pristine = {k: v.detach().clone() for k, v in model.state_dict().items()}
    results = {"model": args.model, "calibration": f"wikitext2-valid, {args.samples} x {args.seq_len} tokens",
               "perplexity_protocol": f"wikitext2-test, {args.ppl_tokens} tokens, windows of 512",
               "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}", "results": []}

    def record(entry: dict) -> None:
        results["results"].append(entry)
        print(json.dumps(entry), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    record({"variant": "float", "perplexity": compress.perplexity(model, tokenizer, protocol,
                                                                   show_progress=False)["perplexity"]})
    for name in args.variants.split(","):
        fresh, _ = compress.load_model(args.model, "float32", "cpu")  # a new model: quantize marks its Linears
        fresh.load_state_dict(pristine)
        if name == "llmcompressor-nvfp4a16":
            record(_peer(args, model, tokenizer, ids, fresh, protocol))
            continue
        config = VARIANTS[name]()
        start = time.perf_counter()
        compress.quantize(fresh, config, ids if name.startswith("gptq") else None, show_progress=False)
        seconds = time.perf_counter() - start
        ppl = compress.perplexity(fresh, tokenizer, protocol, show_progress=False)["perplexity"]
        record({"variant": name, "config": config.describe(), "seconds": round(seconds, 1), "perplexity": ppl})
        del fresh


def _peer(args, model, tokenizer, ids, fresh, protocol) -> dict:
    """llm-compressor's GPTQ onto NVFP4A16 on the same float model and token ids; its weights scored here."""
    from safetensors.torch import load_file

    work = Path(tempfile.mkdtemp(prefix="bench-fp4-"))
    compress.save_model(model, tokenizer, work / "base")  # the peer reads a plain folder
    torch.save(ids, work / "ids.pt")
    command = [args.peer_python, str(Path(__file__).with_name("peer_llmcompressor.py")), "--model", str(work / "base"),
               "--ids", str(work / "ids.pt"), "--scheme", "NVFP4A16", "--device", "cpu", "--dtype", "float32",
               "--save-weights", str(work / "peer.safetensors")]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"llm-compressor run failed (exit {done.returncode}): {done.stderr[-3000:]}")
    peer = json.loads(done.stdout.strip().splitlines()[-1])
    fresh.load_state_dict(load_file(work / "peer.safetensors"), strict=False)
    ppl = compress.perplexity(fresh, tokenizer, protocol, show_progress=False)["perplexity"]
    return {"variant": "llmcompressor-nvfp4a16", "config": f"{peer['tool']} GPTQModifier scheme NVFP4A16, act-order "
            f"static, damp 0.01, block 128", "seconds": round(peer["seconds"], 1), "perplexity": ppl}


if __name__ == "__main__":
    main()

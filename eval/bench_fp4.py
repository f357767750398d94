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
import sys
import time
from pathlib import Path

import compress

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wikitext_bench import WikitextBench, add_protocol_arguments, peer_weights  # noqa: E402

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
    add_protocol_arguments(parser, samples=128)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    parser.add_argument("--peer-python", help="python of a virtualenv with llm-compressor (llmcompressor-nvfp4a16)")
    args = parser.parse_args()

    bench = WikitextBench(args.model, args.samples, args.seq_len, args.ppl_tokens, args.out)
    bench.record({"variant": "float", "perplexity": bench.perplexity(bench.model)})
    for name in args.variants.split(","):
        if name == "llmcompressor-nvfp4a16":
            bench.record(_peer(args, bench))
            continue
        fresh = bench.fresh()
        config = VARIANTS[name]()
        start = time.perf_counter()
        compress.quantize(fresh, config, bench.ids if name.startswith("gptq") else None, show_progress=False)
        seconds = time.perf_counter() - start
        bench.record({"variant": name, "config": config.describe(), "seconds": round(seconds, 1),
                      "perplexity": bench.perplexity(fresh)})
        del fresh


def _peer(args, bench: WikitextBench) -> dict:
    """llm-compressor's GPTQ onto NVFP4A16 on the same float model and token ids; its weights scored here (on a copy
    made once the peer's process has ended: the 1.5B model's float32 copies, ours and the peer's, fill 24 GiB)."""
    weights, peer = peer_weights(args.peer_python, bench.model, bench.tokenizer, bench.ids, ["--scheme", "NVFP4A16"])
    fresh = bench.fresh()
    fresh.load_state_dict(weights, strict=False)
    return {"variant": "llmcompressor-nvfp4a16", "config": f"{peer['tool']} GPTQModifier scheme NVFP4A16, act-order "
            f"static, damp 0.01, block 128", "seconds": round(peer["seconds"], 1),
            "perplexity": bench.perplexity(fresh)}


if __name__ == "__main__":
    main()

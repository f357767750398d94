"""Pruning and GPTQ W4 at the shapes of the families beyond Llama-2 (random bf16 weights, random-token data: time and
memory do not depend on the values), one GPU, each (shape, part) in its own process so peaks do not mix.

    python eval/bench_families.py --shapes llama3.1-8b,qwen3-8b,mixtral-8x7b --parts prune,gptq \\
        --out eval/results/bench_families_h200.json
    python eval/bench_families.py --shapes mixtral-8x7b --layers 2 --parts gptq-resident,gptq-offload,peer \\
        --peer-python python3 --peer-pythonpath PEER_SITE:DEVICE_SITE --out eval/results/bench_families_peer_h200.json

prune: Taylor element1 on 10 x 128 calibration tokens, 25 % of heads and MLP channels in every layer (MoE: also 25 %
of the experts by REAP). When element1 is refused before any work because its float32 gradient sums do not fit
beside the weights (Mixtral-8x7B on one H200), the refusal is recorded and the same pruning runs with l2 importance
(no gradients). gptq: W4 g128, 128 x 2048 calibration tokens, sequential schedule; MoE shapes run with
`offload: true` (weights wait on the CPU, one decoder layer at a time on the GPU) unless a mode is named
(gptq-resident, gptq-offload), experts calibrated on every token. peer: llm-compressor's oneshot + GPTQModifier on
the same shape, token ids and grid (its own virtualenv; it linearizes fused experts and calibrates all of them by
default). `--layers N` keeps the first N decoder layers (a peer comparison that fits the time limits).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import PeerFailed, random_tokens, run_peer, timed  # noqa: E402

GIB = 2**30
PARTS = ("prune", "gptq", "gptq-resident", "gptq-offload", "peer")


def shape_config(shape: str, layers: int | None):
    from compress.models import architecture_config

    config = architecture_config(shape)
    if layers:
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:layers]
    return config


def random_model(config, device: str):
    """bf16 random weights. On a GPU transformers' own init is fast; on the CPU (a 47B offload model) it would take
    minutes, so the weights are left uninitialised and filled from one random pool (memory speed) instead; norm
    weights 1, biases 0."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if device != "cpu":
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers 5 releases
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    pool = (torch.randn(1 << 24, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.view(-1)
            if param.dim() == 1:
                flat.fill_(0.0 if name.endswith("bias") else 1.0)
                continue
            for start in range(0, flat.numel(), pool.numel()):
                part = flat[start:start + pool.numel()]
                part.copy_(pool[:part.numel()])
    return model


def run_prune(shape: str, model, config, importance: str) -> dict:
    import compress
    from compress.architectures import family

    moe = family(config).mlp == "experts"
    ids = random_tokens(10, 128, config.vocab_size)
    # uniform where the family needs it (MoE, Phi-3); elsewhere per-layer widths (LlamaConfig refuses 24 of 32
    # heads as a stock config: 4096 is not a multiple of 24)
    uniform = moe or family(config).attention == "qkv/o"
    prune = compress.TaylorPrune(importance=importance, ratio=0.25, uniform=uniform, multiple=128,
                                 experts=0.25 if moe else 0.0)
    params = sum(p.numel() for p in model.parameters())
    _, seconds, peak = timed(lambda: compress.prune(model, prune, ids, show_progress=False))
    kept = sum(p.numel() for p in model.parameters())
    return {"shape": shape, "part": "prune", "params": params, "params_after": kept, "seconds": round(seconds, 1),
            "peak_gib": peak and round(peak / GIB, 2), "setting": prune.describe()}


def run_one(shape: str, part: str, layers: int | None) -> list[dict]:
    import compress
    from compress.architectures import family
    from compress.errors import CompressError

    config = shape_config(shape, layers)
    moe = family(config).mlp == "experts"
    offload = part == "gptq-offload" or (part == "gptq" and moe)
    model = random_model(config, "cpu" if offload or not torch.cuda.is_available() else "cuda")
    if part == "prune":
        try:
            return [run_prune(shape, model, config, "element1")]
        except CompressError as error:  # refused before any work: the model is untouched
            refused = {"shape": shape, "part": "prune", "importance": "element1", "refused": str(error)}
        # outside the handler: its traceback would keep the original weights alive through the surgery
        return [refused, run_prune(shape, model, config, "l2")]
    params = sum(p.numel() for p in model.parameters())
    ids = random_tokens(128, 2048, config.vocab_size)
    gptq = compress.GPTQ(bits=4, group_size=128, offload=offload)
    _, seconds, peak = timed(lambda: compress.quantize(model, gptq, ids, show_progress=False))
    return [{"shape": shape, "part": part, "params": params, "seconds": round(seconds, 1),
             "peak_gib": peak and round(peak / GIB, 2), "offload": offload,
             "setting": "GPTQ W4 g128, 128 x 2048 tokens"}]


def peer_part(shape: str, layers: int | None, args) -> dict:
    """llm-compressor in its own interpreter on the same config (random weights) and the same token ids."""
    config = shape_config(shape, layers)
    with tempfile.TemporaryDirectory(prefix="peer-") as work:
        config.save_pretrained(work)
        ids_path = Path(work) / "ids.pt"
        torch.save(random_tokens(128, 2048, config.vocab_size), ids_path)
        try:
            row = run_peer(args.peer_python, ["--model", work, "--random", "--ids", str(ids_path), "--bits", "4",
                                              "--group-size", "128"], args.peer_pythonpath)
        except PeerFailed as failure:
            return {"shape": shape, "part": "peer", "error": str(failure).splitlines()[-3:]}
    return {"shape": shape, "part": "peer", "tool": row["tool"], "seconds": round(row["seconds"], 1),
            "peak_gib": row["peak_cuda_bytes"] and round(row["peak_cuda_bytes"] / GIB, 2),
            "setting": "GPTQ W4 g128, 128 x 2048 tokens"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama3.1-8b,qwen3-8b,mixtral-8x7b")
    parser.add_argument("--parts", default="prune,gptq", help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--layers", type=int, help="keep the first N decoder layers")
    parser.add_argument("--peer-python", help="python of a virtualenv with llm-compressor (part peer)")
    parser.add_argument("--peer-pythonpath", help="PYTHONPATH for the peer (e.g. a --target install)")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # shape part: run in this process
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.one:
        for row in run_one(*args.one, args.layers):
            print("RESULT " + json.dumps(row), flush=True)
        return
    rows = []
    for shape in args.shapes.split(","):
        for part in args.parts.split(","):
            if part not in PARTS:
                parser.error(f"unknown part {part!r}; the parts are {', '.join(PARTS)}")
            if part == "peer":
                found = [peer_part(shape, args.layers, args)]
            else:
                command = [sys.executable, __file__, "--one", shape, part]
                command += ["--layers", str(args.layers)] if args.layers else []
                done = subprocess.run(command, capture_output=True, text=True)
                found = [json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                found = found or [{"shape": shape, "part": part, "error": done.stderr.strip().splitlines()[-3:]}]
            for row in found:
                row.update({"layers": args.layers} if args.layers else {})
                print(json.dumps(row), flush=True)
            rows += found
    if args.out:
        result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                  "torch": torch.__version__, "rows": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

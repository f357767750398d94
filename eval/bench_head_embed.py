"""The head and the embeddings on integer grids, on SmolLM2-135M (tied head): W4 g64 alone, then with the head at 8
bits (g64), with the head and the embeddings at 8 bits, and with the head at 4 bits (g64), by RTN and by GPTQ
(act-order), on one calibration set, in one invocation:

    python eval/bench_head_embed.py --out eval/results/bench_head_embed_smollm2_cpu.json

Each variant starts from the same float weights and takes the same calibration token ids (wikitext2-valid); the
perplexity is WikiText-2 test's in 512-token windows (the protocol of eval/bench_mixed.py). Bytes: the checkpoint's
safetensors file as saved (the model runs in float32 here, so what stays float is 4 bytes a weight), and the same
checkpoint counted with bfloat16 for what is not on a grid (scales included), the dtype a model is usually shipped in:
each quantized module by compress.estimate.linear_bytes, every other tensor at 2 bytes, a tied tensor once.
Groups of 64, not 128: SmolLM2's hidden width 576 is 4.5 groups of 128 (compress refuses g128 on it).
SmolLM2 ties its head to its embedding: asking for the head unties it (compress.quantize.head_embed), so "+ head"
alone saves a float embedding and a quantized head where W4 alone saves one float tensor.

Another model and grid: `--model qwen2.5-coder-1.5b --group-size 128 --dtype bfloat16 --methods rtn` (names follow the
group: w4g128, w4g128+head4g128, ...). `+head8row` is the head at 8 bits with one scale per row, the int8 grid the
packed runtime has a kernel for (int8 in groups runs dequantized).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

import compress
from compress.checkpoint import save_model
from compress.data import calibration_batches
from compress.estimate import linear_bytes
from compress.modules import quantized_modules

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wikitext_bench import _public, add_protocol_arguments  # noqa: E402


def variants(group: int) -> dict[str, dict]:
    """Each variant's name (its grids: W4 in groups of `group`) and what it asks for beyond W4."""
    head_8, head_4 = {"bits": 8, "group_size": group}, {"bits": 4, "group_size": group}
    return {
        f"w4g{group}": {},
        f"w4g{group}+head8": {"lm_head": head_8},
        f"w4g{group}+head8+emb8": {"lm_head": head_8, "embeddings": {"bits": 8}},
        f"w4g{group}+head4g{group}": {"lm_head": head_4},
        f"w4g{group}+head8row": {"lm_head": {"bits": 8, "group_size": -1}},
    }


def config_of(method: str, group: int, extra: dict):
    if method == "gptq":
        return compress.GPTQ(bits=4, group_size=group, act_order=True, damp=0.01, **extra)
    return compress.RTN(bits=4, group_size=group, **extra)


def bytes_of(model: torch.nn.Module) -> dict[str, int]:
    """Bytes by part with bfloat16 for whatever is not on a grid (and for the scales): the decoder's quantized
    Linears, the head, the embedding, and the rest (norms)."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    parts = {"decoder_linears": 0, "head": 0, "embedding": 0, "rest": 0}
    on_grid = set()
    for _, module, quant in quantized_modules(model):
        group = -1 if quant.args.group_size is None else quant.args.group_size
        size = linear_bytes(*module.weight.shape, quant.args.num_bits, group, quant.args.symmetric, 2,
                            embedding=isinstance(module, torch.nn.Embedding))
        parts["head" if module is head else "embedding" if module is embedding else "decoder_linears"] += size
        on_grid.add(id(module.weight))
    for name, parameter in {id(p): (n, p) for n, p in model.named_parameters()}.values():
        if id(parameter) in on_grid:
            continue
        part = ("embedding" if parameter is embedding.weight else "head" if parameter is head.weight else "rest")
        parts[part] += parameter.numel() * 2
    parts["total"] = sum(parts.values())
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_arguments(parser)
    parser.add_argument("--methods", default="rtn,gptq")
    parser.add_argument("--group-size", type=int, default=64, help="W4's groups (and the head's, where grouped)")
    parser.add_argument("--dtype", default="float32", help="the model's dtype while it is quantized and scored")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", default=",".join(list(variants(64))[:4]),
                        help="comma-separated: " + ", ".join(variants(64)) + " (with --group-size's number)")
    args = parser.parse_args()
    grids = variants(args.group_size)

    model, tokenizer = compress.load_model(args.model, args.dtype, args.device)
    ids = calibration_batches(tokenizer, "wikitext2-valid", args.samples, args.seq_len, seed=0)
    protocol = compress.Perplexity(seq_len=512, max_tokens=args.ppl_tokens, batch_size=8)
    pristine = {k: v.detach().clone() for k, v in model.state_dict().items()}
    results = {"model": args.model, "calibration": f"wikitext2-valid, {args.samples} x {args.seq_len} tokens",
               "perplexity_protocol": f"wikitext2-test, {args.ppl_tokens} tokens, windows of 512",
               "machine": torch.cuda.get_device_name() if args.device.startswith("cuda")
               else f"{os.cpu_count()} CPU cores (shared), torch {torch.__version__}", "dtype": args.dtype,
               "command": _public(shlex.join(["python", "eval/bench_head_embed.py", *sys.argv[1:]])),
               "results": []}

    def write() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    float_ppl = compress.perplexity(model, tokenizer, protocol, show_progress=False)["perplexity"]
    results["results"].append({"variant": "float", "perplexity": float_ppl, "bytes_bf16": bytes_of(model)})
    write()
    for method in args.methods.split(","):
        for name in args.variants.split(","):
            # a new model: quantize marks its modules
            fresh, _ = compress.load_model(args.model, args.dtype, args.device)
            fresh.load_state_dict(pristine)
            config = config_of(method, args.group_size, grids[name])
            start = time.perf_counter()
            compress.quantize(fresh, config, ids if method == "gptq" else None, show_progress=False)
            seconds = time.perf_counter() - start
            ppl = compress.perplexity(fresh, tokenizer, protocol, show_progress=False)["perplexity"]
            with tempfile.TemporaryDirectory() as folder:
                save_model(fresh, tokenizer, folder)
                saved = (Path(folder) / "model.safetensors").stat().st_size
            entry = {"variant": f"{method} {name}", "config": config.describe(), "seconds": round(seconds, 1),
                     "perplexity": ppl, "ppl_vs_float": round(ppl / float_ppl, 4), "saved_bytes_float32": saved,
                     "bytes_bf16": bytes_of(fresh)}
            results["results"].append(entry)
            print(json.dumps(entry), flush=True)
            write()
            del fresh


if __name__ == "__main__":
    main()

"""Where a compiled decode step's GPU time goes, kernel by kernel: each variant of eval/bench_inference.py (Llama-2-7B
shape, random weights) built, its decode step compiled exactly as `compress bench --compile` runs it (static cache,
CUDA graph), warmed up at the same prompt and cache length, then `--steps` decode steps profiled (the prompt's
forward outside the profile):

    python eval/profile_decode.py --variants "base bf16,W4 g128" --out eval/results/profile_decode_7b_h100.json

With --prefill N, also one eager forward of N tokens per variant (as compress bench times prefill), kernel by kernel.

Per variant: wall time per step, GPU kernel time per step, and the kernels by time per step with their launches per
step (the int4 kernel's share against the bytes it reads is the figure to move)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import _without_out, variant  # noqa: E402
from bench_models import LLAMA2_7B  # noqa: E402

from compress import bench  # noqa: E402


def decode_steps(model, batch: int, prompt: int, steps: int):
    """A prompt's forward into a static cache, then a function running `steps` compiled decode steps."""
    from transformers import StaticCache

    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)
    cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 1)
    argument = bench._cache_argument(model)
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{argument: cache},
                       cache_position=torch.arange(prompt, device=device)).logits
    token = logits[:, -1].argmax(-1, keepdim=True)
    # transformers' static layers count the tokens written (cumulative_length, 5.x) and place the next ones there,
    # whatever cache_position says: each run winds them back to the prompt, in place (the graph holds the tensors)
    counters = [(layer.cumulative_length, layer.cumulative_length.clone()) for layer in getattr(cache, "layers", ())
                if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]

    def run():
        nonlocal token
        position = torch.tensor([prompt], device=device)
        with torch.inference_mode():
            for counter, at_prompt in counters:  # inference tensors where the prompt's forward made them
                counter.copy_(at_prompt)
            for _ in range(steps):  # the cache is rewritten at the same positions on every run: same shapes
                token = bench._compiled_decode_one()(model, token, cache, position, argument).clone()
                position += 1
    return run


def prefill_forward(model, tokens: int):
    """One eager forward of a `tokens`-token sequence, logits of the last token only (compress bench's prefill)."""
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device="cuda")

    def run():
        with torch.inference_mode():
            model(input_ids=ids, logits_to_keep=1)
    return run


def profiled_kernels(run, per: int, top: int) -> dict:
    """run() timed once, then profiled once: wall and GPU time per `per` (steps of the run), the top kernels."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / per
    with profile(activities=[ProfilerActivity.CUDA]) as profiled:
        run()
        torch.cuda.synchronize()
    kernels = [e for e in profiled.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in kernels) / per
    return {"wall_us": round(wall * 1e6, 1), "gpu_us": round(total, 1),
            "kernels": [{"name": e.key[:160], "us": round(e.self_device_time_total / per, 1),
                         "launches": round(e.count / per, 2)}
                        for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="base bf16,W4 g128")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64, help="decode steps profiled (0: none)")
    parser.add_argument("--prefill", type=int, default=0, help="also profile one eager prefill of this many tokens")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    for name in args.variants.split(","):
        model, _ = variant(name, LLAMA2_7B, torch.bfloat16, "cuda")
        row, run = {"variant": name}, None
        if args.steps:
            torch._dynamo.reset()
            run = decode_steps(model, args.batch, args.prompt, args.steps)
            for _ in range(3):  # compile, record the CUDA graph, settle
                run()
            row["decode"] = {"batch": args.batch, "per": "decode step", **profiled_kernels(run, args.steps, args.top)}
        if args.prefill:
            run = prefill_forward(model, args.prefill)
            run()  # warm-up: kernels chosen, memory cached
            row["prefill"] = {"tokens": args.prefill, "per": "forward", **profiled_kernels(run, 1, args.top)}
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
        if args.out:  # after each variant: a run stopped by its time limit keeps what it measured
            Path(args.out).write_text(json.dumps({
                "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "command": "python eval/profile_decode.py " + " ".join(_without_out(sys.argv[1:])),
                "variants": rows}, indent=1) + "\n")
        del model, run
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

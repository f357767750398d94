"""Compressed models run compressed: every variant of a Llama-2-7B-shape model (random weights: speed and memory do not
depend on their values) through the same harness (compress.bench.bench_model) in one invocation.

    python eval/bench_inference.py --device cuda --compile --out eval/results/bench_inference_7b_h200.json
    python eval/bench_inference.py --device cpu --shape smollm2 --out ...      # the CPU smoke test

Variants: base bf16; pruned 25 % (l2: no data needed; 24 heads do not divide Llama-2's 4096 hidden size, so LlamaConfig
refuses a uniform stock config and the widths are per layer, all alike, as compress.load reads them); W4 g128 (RTN), W4
g64 asymmetric (the demo's grid), pruned + W4 g128, FP8 W8A8 and (asked for by name: `W8A16`) int8 weights with one
scale per row and (`W8A8 int8`) SmoothQuant W8A8 int8 in the packed runtime (compress.quantize.packed); and W4 run
dequantized (what transformers' from_pretrained gives today), for the memory comparison; `FP8 W8A8 unfused` rounds its
inputs with PyTorch's kernels in eager prefill in place of gemlite's fused one (COMPRESS_FUSED_FP8_INPUT=0), and `W8A8
int8 unfused` its int8 inputs and outputs in place of one Triton kernel each (COMPRESS_FUSED_INT8=0); `unsliced` gives a
long input's fused q/k/v and gate/up outputs as slices of one output (COMPRESS_SLICED_OUTPUTS=0; the runtime gives each
its own memory); a name with `pdl` launches the int4 matmul and the compiled graph's kernels for programmatic dependent
launch (COMPRESS_INT4_PDL, TORCHINDUCTOR_ENABLE_PDL; with --compile), and one with `nocudnn` runs attention without
cuDNN's kernel (torch.backends.cuda.enable_cudnn_sdp(False)), and one with `cdt` compiles with Inductor's
coordinate-descent tuning of each generated kernel's launch; `direct` dequantizes int4 weights for long inputs with the
direct stores (COMPRESS_INT4_DEQUANTIZE_LINES=0) in place of the whole-sector ones. A W4 variant named with `head4` or
`head8` quantizes the output head too (int4 in the variant's groups, or int8 with one scale per row). A W4 variant whose
name ends in `gemlite`, `mma` or `tinygemm` runs that int4 kernel instead of the runtime's first choice
(COMPRESS_INT4_KERNEL), for a comparison in one invocation. The physical limit is reported beside each: bytes of weights
in memory / GPU memory bandwidth = the fastest batch-1 decode step.

With `--compile` each variant runs in its own process (`--jobs` at once): they build, pack and compile side by side
(compiling a decode step costs ~40 s of CPU per batch size), wait for one another, and then take turns on the GPU, so
no timing overlaps another variant's work. The measured matrix: decode at each --batches, prefill (one sequence,
logits of the last token only, as a server computes them) at each --prefill length, time to first token, weight bytes,
GPU memory after load, peak GPU memory. `--batches ""` times the prefill alone (nothing to compile).
`--compile-prefill` times each prefill compiled too (Inductor, one graph per length), beside the eager figure: eager,
every variant pays the same unfused norms and rotary embedding (~25 ms of a 2048-token 7B prefill), which hides what
the low-bit GEMMs save; a server compiles or graph-captures its prefill."""

from __future__ import annotations

import argparse
import fcntl
import gc
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import LLAMA2_7B, random_llama  # noqa: E402

import compress  # noqa: E402
from compress.bench import bench_model  # noqa: E402
from compress.quantize.int4_mma import DEQUANTIZE_LINES_VARIABLE, PDL_VARIABLE, dependent_launch  # noqa: E402
from compress.quantize.packed import (  # noqa: E402
    FUSED_FP8_INPUT_VARIABLE,
    FUSED_INT8_VARIABLE,
    INT4_KERNEL_VARIABLE,
    SLICED_OUTPUTS_VARIABLE,
    pack_model,
)

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True)
# GPU memory bandwidth by name (bytes/s): H200 HBM3e, H100 SXM HBM3; the batch-1 limit is given where it is known
BANDWIDTH = {"h200": 4.8e12, "h100": 3.35e12}


def memory_bandwidth() -> float | None:
    name = torch.cuda.get_device_name().lower()
    return next((value for key, value in BANDWIDTH.items() if key in name), None)


def variant(name: str, shape: dict, dtype: torch.dtype, device: str):
    model = random_llama(shape, dtype, device)
    group = 128 if shape is LLAMA2_7B else 64
    if "pruned" in name:
        compress.prune(model, compress.TaylorPrune(importance="l2", ratio=0.25, uniform=False,
                                                   multiple=128 if shape is LLAMA2_7B else 64), show_progress=False)
    if "W4" in name:
        sym = "asym" not in name
        group = 64 if "g64" in name else group
        # "... head4" / "... head8": the output head too (int4 in the W4 variant's groups, or int8 one scale per row:
        # the two grids with a packed kernel), which every batch-1 step reads whole (262 MB in bf16 at this shape)
        head = {"bits": 4, "group_size": group} if "head4" in name else \
            {"bits": 8, "group_size": -1} if "head8" in name else None
        compress.quantize(model, compress.RTN(bits=4, group_size=group, sym=sym, lm_head=head), show_progress=False)
    if "W8A16" in name:  # int8 weights, one scale per row (the packed runtime's int8 weight-only kernel)
        compress.quantize(model, compress.RTN(bits=8, group_size=-1), show_progress=False)
    if "FP8" in name:
        compress.quantize(model, compress.FP8(), show_progress=False)
    if "W8A8 int8" in name:  # SmoothQuant reads calibration ids; random ones serve (speed does not depend on values)
        ids = torch.randint(0, shape["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(0))
        compress.quantize(model, compress.SmoothQuant(), ids.to(device), show_progress=False)
    kernel = next((k for k in ("gemlite", "mma", "tinygemm") if k in name), None)  # "W4 g128 mma": that kernel
    asked = {INT4_KERNEL_VARIABLE: kernel} if kernel else {}
    if "unfused" in name:  # "FP8 W8A8 unfused", "W8A8 int8 unfused": the PyTorch forms in eager prefill too
        asked[FUSED_FP8_INPUT_VARIABLE] = asked[FUSED_INT8_VARIABLE] = "0"
    # "W4 g128 unsliced": a long input's fused outputs as slices of one output (the runtime gives each its own memory)
    asked[SLICED_OUTPUTS_VARIABLE] = "0" if "unsliced" in name else "1"
    # "W4 g128 direct": the int4 dequantization with its direct stores (half sectors) in place of the runtime's
    # whole-sector ones; read at every call, so set for the process, on or off, as PDL is below
    os.environ[DEQUANTIZE_LINES_VARIABLE] = "0" if "direct" in name else "1"
    # "W4 g128 pdl": programmatic dependent launch of the int4 matmul and of the compiled graph's own kernels. Set for
    # every variant, on or off, for the process: eval/profile_decode.py runs its variants in one
    pdl, pdl_notes = "pdl" in name, []
    os.environ[PDL_VARIABLE] = "1" if pdl else "0"
    dependent_launch.cache_clear()
    if hasattr(torch._inductor.config.triton, "enable_pdl"):  # PyTorch 2.10 and newer
        torch._inductor.config.triton.enable_pdl = pdl
    elif pdl:
        pdl_notes.append(f"torch {torch.__version__}: inductor has no PDL option, so only the int4 matmul used it")
    # "W4 g128 nocudnn": attention by PyTorch's next SDPA kernel (flash, or memory-efficient where a mask is passed)
    # with cuDNN's turned off; cuDNN's took 8.1 us a layer for a batch-1 decode step's one query on an H100
    # (eval/results/profile_7b_h100.json), 11 % of the W4 step. Set for every variant, as PDL above; read when a
    # kernel is chosen, so a CUDA graph keeps the choice it was captured with
    torch.backends.cuda.enable_cudnn_sdp("nocudnn" not in name)
    # "... cdt": Inductor tunes each generated kernel's launch by coordinate descent (gpt-fast turns it on); at batch 1
    # the ten small fused kernels a layer (norms, rotary embedding, cache writes, SiLU) are 15 % of a W4 step
    # (eval/results/profile_7b_h100.json). Set for every variant, on or off, as cuDNN above
    torch._inductor.config.coordinate_descent_tuning = "cdt" in name
    with mock.patch.dict(os.environ, asked):  # restored as it was
        notes = ([] if "dequantized" in name else pack_model(model)) + pdl_notes
    return model, notes


def measure_variant(name: str, args, shape, dtype, batches, prefills, barrier: dict | None = None) -> dict:
    """One variant built, packed and measured; with a barrier ({"ready": folder, "count": n, "lock": file}), compiled
    first, then timed only once every variant is compiled and while holding the GPU lock."""
    model, notes = variant(name, shape, dtype, args.device)
    memory_after_load = None
    if args.device == "cuda":
        torch.cuda.synchronize()
        memory_after_load = torch.cuda.memory_allocated()
    if barrier is not None:  # warm-up pass: every kernel autotuned and every decode step compiled, untimed
        bench_model(model, batches, args.prompt, 3, prefills, 1, args.compile, compile_prefill=args.compile_prefill)
        Path(barrier["ready"], name.replace(" ", "_").replace("%", "pc")).touch()
        while len(os.listdir(barrier["ready"])) < barrier["count"]:
            time.sleep(1)
        lock = open(barrier["lock"], "w")
        fcntl.flock(lock, fcntl.LOCK_EX)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
    row = {"variant": name, **bench_model(model, batches, args.prompt, args.new, prefills, args.repeats,
                                          args.compile, reset=barrier is None, compile_prefill=args.compile_prefill),
           "notes": notes}
    if barrier is not None:
        lock.close()
    if args.device == "cuda":
        row["gpu_memory_after_load_bytes"] = memory_after_load
        if bandwidth := memory_bandwidth():  # (an H100 was given the H200's 4.8 TB/s before)
            row["bandwidth_limit_tokens_per_s"] = round(bandwidth / row["weight_bytes"], 1)
    return row


def _without_out(argv: list[str]) -> list[str]:
    """The command line less its --out (the children write their rows elsewhere; results name no local path)."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--out="):
            skip = False
            continue
        if arg == "--out":
            skip = True
            continue
        kept.append(arg)
    return kept


def _jobs_that_fit(shape: dict, jobs: int, device: str) -> int:
    """At most as many variants at once as the GPU's free memory holds while each builds its model (random_llama
    initialises in bfloat16: 2 bytes a parameter, plus half for quantizing, compiling and the caches)."""
    if device != "cuda":
        return jobs
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        parameters = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**shape)).parameters())
    free = torch.cuda.mem_get_info()[0]
    fit = max(1, int(free // (parameters * 2 * 1.5)))
    if fit < jobs:
        print(f"--jobs {jobs}: {fit} at once fit in the GPU's free memory "
              f"({free / 2**30:.0f} GiB, ~{parameters * 3 / 2**30:.0f} GiB a variant)", flush=True)
    return min(jobs, fit)


def _in_processes(names: list[str], argv: list[str], jobs: int, finished=lambda rows: None) -> list[dict]:
    """Each variant in a child process of this script (`--variant-only`), in waves of at most `jobs` (the next wave
    starts when the whole wave has ended); `finished` gets the rows so far as each variant ends (so a run cut short
    keeps what it measured)."""
    ready = tempfile.mkdtemp(prefix="bench-ready-")
    lock = os.path.join(ready, "..", os.path.basename(ready) + ".lock")
    rows, running, pending = {}, [], list(names)
    while pending or running:
        # a wave at a time: a variant started as soon as another ends would build its model on the GPU and compile
        # while the rest of the wave is timed (a 7B prefill read 107 ms against 52-56 ms that way)
        if pending and not running:
            wave, pending = pending[:jobs], pending[jobs:]
            for name in wave:
                out = os.path.join(tempfile.mkdtemp(), "row.json")
                command = [sys.executable, __file__, *argv, "--variant-only", name, "--row-out", out, "--barrier",
                           f"{ready}:{len(wave)}:{lock}"]
                running.append((name, out, subprocess.Popen(command)))
        for item in list(running):
            name, out, process = item
            if process.poll() is not None:
                running.remove(item)
                succeeded = process.returncode == 0 and Path(out).is_file()
                rows[name] = json.loads(Path(out).read_text()) if succeeded \
                    else {"variant": name, "error": f"exit {process.returncode}"}
                finished([rows[n] for n in names if n in rows])
                if succeeded:  # it passed the barrier: the next wave waits for its own members only
                    for done in os.listdir(ready):
                        os.remove(os.path.join(ready, done))
                else:  # it may have died before the barrier: its wave must not wait for it
                    Path(ready, "failed-" + name.replace(" ", "_").replace("%", "pc")).touch()
        time.sleep(1)
    return [rows[name] for name in names]


def _int4_table(device: str) -> dict | None:
    """The int4 kernel's launch settings measured on this GPU that the W4 variants ran with (None: the rule)."""
    if device != "cuda":
        return None
    from compress.quantize import int4_mma

    table = int4_mma.tuned_table()
    return {key: table[key] for key in ("settings", "dequantize_chunk", "command") if key in table} or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", choices=["llama2-7b", "smollm2"], default="llama2-7b")
    parser.add_argument("--variants", default="base bf16,pruned 25%,W4 g128,W4 g64 asym,pruned 25% + W4 g128,"
                                              "FP8 W8A8,W4 g128 dequantized")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--prefill", default="512,2048,8192")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="static KV cache + compiled decode step")
    parser.add_argument("--compile-prefill", action="store_true",
                        help="time each prefill compiled too (Inductor, static length), beside the eager figure")
    parser.add_argument("--jobs", type=int, default=4, help="variants compiled at once (with --compile; fewer where "
                                                            "the GPU's free memory holds fewer)")
    parser.add_argument("--out")
    parser.add_argument("--variant-only", help=argparse.SUPPRESS)
    parser.add_argument("--row-out", help=argparse.SUPPRESS)
    parser.add_argument("--barrier", help=argparse.SUPPRESS)
    args = parser.parse_args()

    shape = LLAMA2_7B if args.shape == "llama2-7b" else SMOLLM2
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    batches = tuple(int(b) for b in args.batches.split(",") if b)  # --batches "": prefill alone
    prefills = tuple(int(n) for n in args.prefill.split(","))
    if args.variant_only:
        ready, count, lock = args.barrier.split(":")
        row = measure_variant(args.variant_only, args, shape, dtype, batches, prefills,
                              {"ready": ready, "count": int(count), "lock": lock})
        print(json.dumps(row), flush=True)
        Path(args.row_out).write_text(json.dumps(row))
        return
    names = [n for n in args.variants.split(",") if n]
    if args.compile or args.compile_prefill:
        rows = _in_processes(names, _without_out(sys.argv[1:]), _jobs_that_fit(shape, args.jobs, args.device),
                             lambda rows: write_result(rows, args, batches, prefills, partial=True))
    else:
        rows = []
        for name in names:
            rows.append(measure_variant(name, args, shape, dtype, batches, prefills))
            print(json.dumps(rows[-1]), flush=True)
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
    write_result(rows, args, batches, prefills)


def write_result(rows: list[dict], args, batches, prefills, partial: bool = False) -> None:
    """Each row against the first (the base), printed and written to --out; `partial`: written as variants end."""
    rows = [dict(row) for row in rows]
    base = rows[0] if rows and rows[0]["variant"] == args.variants.split(",")[0] else {}
    for row in rows:
        if "error" in row or not base or "error" in base:
            continue
        if row.get("decode_tokens_per_s") and base.get("decode_tokens_per_s"):
            row["decode_vs_base"] = round(row["decode_tokens_per_s"] / base["decode_tokens_per_s"], 3)
            row["decode_vs_base_by_batch"] = {
                d["batch"]: round(d["decode_tokens_per_s"] / b["decode_tokens_per_s"], 3)
                for d, b in zip(row["decode"], base["decode"])
                if "decode_tokens_per_s" in d and "decode_tokens_per_s" in b}
        row["weight_bytes_vs_base"] = round(row["weight_bytes"] / base["weight_bytes"], 3)
        row["prefill_time_vs_base_by_tokens"] = {
            p["tokens"]: round(p["ms"] / b["ms"], 3) for p, b in zip(row["prefill"], base["prefill"])
            if "ms" in p and "ms" in b}
        compiled = {p["tokens"]: round(p["compiled_ms"] / b["compiled_ms"], 3)
                    for p, b in zip(row["prefill"], base["prefill"]) if "compiled_ms" in p and "compiled_ms" in b}
        if compiled:
            row["prefill_compiled_time_vs_base_by_tokens"] = compiled
        if row.get("gpu_memory_after_load_bytes") and base.get("gpu_memory_after_load_bytes"):
            row["memory_after_load_vs_base"] = round(row["gpu_memory_after_load_bytes"]
                                                     / base["gpu_memory_after_load_bytes"], 3)
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "shape": args.shape, "compile": args.compile,
              "compile_prefill": args.compile_prefill, "batches": list(batches),
              "prompt": args.prompt, "new": args.new, "prefill": list(prefills),
              "command": shlex.join(["python", "eval/bench_inference.py", *_without_out(sys.argv[1:])]),
              "int4_mma_table": _int4_table(args.device), "variants": rows}
    if partial:
        result["partial"] = True
    else:
        summary = ("decode_vs_base_by_batch", "prefill_time_vs_base_by_tokens",
                   "prefill_compiled_time_vs_base_by_tokens", "weight_bytes_vs_base",
                   "memory_after_load_vs_base", "error")
        print(json.dumps({r["variant"]: {k: r.get(k) for k in summary} for r in rows}, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

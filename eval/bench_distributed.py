"""Several GPUs: compress under torchrun at 1 and at N processes, and llm-compressor's distributed oneshot on the same
GPUs, in one invocation (random weights: speed and memory do not depend on their values).

    python eval/bench_distributed.py --gpus 2 --parts gptq,lora,distill --out eval/results/bench_distributed_h200x2.json
    python eval/bench_distributed.py --gpus 2 --parts peer --peer-pythonpath PEER_SITE --out ...

Parts (each launched with torchrun at 1 and at --gpus processes; a worker prints one JSON line from rank 0):
  gptq     Llama-2-7B shape bf16, GPTQ W4 g128 act-order, 128 x 2048 random tokens: seconds, peak memory per GPU, and
           whether the quantized weights agree with the 1-process run's
  gptq-offload  the same with `offload: true` (weights on the CPU, one decoder layer at a time on each GPU)
  lora     Llama-2-7B shape bf16, LoRA r 16 on every Linear, global batch 16 x 512: tokens/s (median step after 3)
  distill  Llama-2-13B shape: bf16 teacher + bf16 full student + AdamW, global batch 8 x 512: one process (does it
           fit one GPU?) and N processes with FSDP2 (`sharding: fsdp`): seconds per step, peak memory per GPU
  peer     llm-compressor's data-parallel GPTQ (eval/peer_llmcompressor_distributed.py) at 1 and N processes, on the
           same token ids and grid
Smoke test on the CPU: --device cpu --shape tiny (gloo; the distill part needs GPUs)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import LLAMA2_7B, random_llama, random_tokens  # noqa: E402

LLAMA2_13B = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                  num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)
GIB = 2**30


# ---------------------------------------------------------------- workers (one per process, under torchrun)


def _peaks(distributed) -> list:
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return distributed.gather(peak)


def _timed_region(distributed, work):
    distributed.barrier()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = work()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    distributed.barrier()
    return result, time.perf_counter() - start


class StepTimer(TrainerCallback):
    """Trainer callback: wall time of every optimizer step."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.start)


def _time_parts() -> dict:
    """Wrap the GPTQ pieces with synchronised timers (a breakdown; the synchronisation itself costs a little)."""
    from compress import distributed
    from compress.quantize import gptq, layerwise

    totals: dict[str, float] = {}

    def timed(owner, name: str, label: str):
        inner = getattr(owner, name)

        def wrapper(*a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                totals[label] = totals.get(label, 0.0) + time.perf_counter() - start

        setattr(owner, name, wrapper)

    timed(gptq, "inverse_hessian_factor", "cholesky")
    timed(gptq, "gptq_solve", "solve (incl. cholesky)")
    timed(gptq, "add_gram", "hessian sums")
    timed(gptq, "output_energy_per_row", "sensitivity")
    timed(distributed, "all_sum_", "all-reduce")
    timed(distributed, "gather_rows", "gather rows")
    timed(layerwise.LayerwiseCalibration, "propagate", "layer forwards (incl. hooks: sums, solves)")
    return totals


def worker(part: str, args) -> dict:
    import compress
    from compress import distributed
    from compress.modules import quantized_linears
    from compress.training import train, with_lora

    distributed.start(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    big = args.shape != "tiny"
    processes = distributed.world_size()
    row: dict = {"part": part, "processes": processes}
    if part in ("gptq", "gptq-offload"):
        timings = _time_parts() if args.breakdown else {}
        offload = part == "gptq-offload"  # the weights wait on the CPU (a copy per process), a layer at a time on GPU
        model = random_llama(LLAMA2_7B if big else TINY, dtype, "cpu" if offload else args.device)
        ids = random_tokens(args.samples, args.seq_len, model.config.vocab_size)
        config = compress.GPTQ(bits=4, group_size=128 if big else 32, act_order=True, offload=offload)
        _, seconds = _timed_region(distributed, lambda: compress.quantize(model, config, ids, show_progress=False))
        row.update(seconds=round(seconds, 2), peak_cuda_bytes_per_rank=_peaks(distributed),
                   settings=f"W4 g{config.group_size} act-order{', offload' if offload else ''}, {args.samples} x "
                            f"{args.seq_len} tokens",
                   mean_relative_output_error=statistics.mean(
                       quant.output_error for _, _, quant in quantized_linears(model)),
                   **({"seconds_in": {k: round(v, 2) for k, v in timings.items()}} if timings else {}))
        if distributed.is_main() and args.save:  # for the agreement check against the 1-process run
            layers = model.model.layers
            torch.save({"first_q": layers[0].self_attn.q_proj.weight.cpu(),
                        "last_down": layers[-1].mlp.down_proj.weight.cpu()}, args.save)
    elif part == "lora":
        model = random_llama(LLAMA2_7B if big else TINY, dtype, args.device)
        windows = random_tokens(args.batch * (args.steps + 2), args.train_seq_len, model.config.vocab_size)
        budget = compress.LoRARecovery(steps=args.steps, batch_size=args.batch, seq_len=args.train_seq_len, lr=1e-4,
                                       lora={"r": 16, "dropout": 0.0})
        timer = StepTimer()
        _, seconds = _timed_region(distributed, lambda: train(with_lora(model, budget.lora), budget, windows,
                                                              show_progress=False, callbacks=[timer]))
        step = statistics.median(timer.times[3:] or timer.times)
        row.update(seconds=round(seconds, 2), step_seconds=round(step, 4),
                   tokens_per_s=round(args.batch * args.train_seq_len / step, 1),
                   peak_cuda_bytes_per_rank=_peaks(distributed),
                   settings=f"LoRA r 16 all-linear, global batch {args.batch} x {args.train_seq_len}, {args.steps} "
                            f"steps")
    elif part == "distill":
        from compress.distill import DistillationTrainer

        shape = LLAMA2_13B if big else TINY
        sharding = "fsdp" if processes > 1 else "replicate"
        row["sharding"] = sharding
        try:
            teacher = random_llama(shape, dtype, args.device, seed=1)
            student = random_llama(shape, dtype, args.device, seed=0).train().requires_grad_(True)
            windows = random_tokens(args.batch * (args.steps + 2), args.train_seq_len, shape["vocab_size"])
            config = compress.Distill(steps=args.steps, batch_size=args.batch, seq_len=args.train_seq_len, lr=1e-5,
                                      sharding=sharding)
            timer = StepTimer()
            _, seconds = _timed_region(distributed, lambda: train(
                student, config, windows, show_progress=False, trainer_class=DistillationTrainer, teacher=teacher,
                kd=config.kd, callbacks=[timer]))
            step = statistics.median(timer.times[1:] or timer.times)
            row.update(seconds=round(seconds, 2), step_seconds=round(step, 3),
                       peak_cuda_bytes_per_rank=_peaks(distributed))
        except torch.OutOfMemoryError as error:
            row.update(out_of_memory=str(error).splitlines()[0][:200], peak_cuda_bytes_per_rank=_peaks(distributed))
        row["settings"] = (f"{'Llama-2-13B' if big else 'tiny'} shape bf16 teacher + bf16 full student + AdamW, "
                           f"global batch {args.batch} x {args.train_seq_len}, {args.steps} steps")
    return row


# ---------------------------------------------------------------- the driver


def _launch(command: list[str], processes: int, env: dict | None = None) -> dict:
    full = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *command]
    done = subprocess.run(full, capture_output=True, text=True, env={**os.environ, **(env or {})})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        print(done.stderr[-3000:], file=sys.stderr)
        return {"processes": processes, "failed": f"exit {done.returncode}", "stderr_tail": done.stderr[-600:]}
    return json.loads(lines[-1])


def _agreement(one: Path, many: Path) -> dict:
    a, b = torch.load(one), torch.load(many)
    return {name: {"identical": round((a[name] == b[name]).float().mean().item(), 5),
                   "relative_difference": round(((a[name] - b[name]).float().norm()
                                                 / a[name].float().norm()).item(), 5)}
            for name in a}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--parts", default="gptq,lora,distill")
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", choices=["big", "tiny"], default="big")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--train-seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--save")
    parser.add_argument("--counts", help="process counts to run (default: 1 and --gpus)")
    parser.add_argument("--breakdown", action="store_true", help="gptq: time its pieces (synchronised)")
    parser.add_argument("--peer-pythonpath", help="PYTHONPATH with llmcompressor 0.14 and compressed-tensors 0.19")
    parser.add_argument("--out")
    args = parser.parse_args()

    if args.worker:
        row = worker(args.worker, args)
        from compress import distributed

        if distributed.is_main():
            print(json.dumps(row), flush=True)
        return

    me = [str(Path(__file__).resolve()), "--device", args.device, "--shape", args.shape, "--samples",
          str(args.samples), "--seq-len", str(args.seq_len), "--train-seq-len", str(args.train_seq_len)]
    results: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                     "gpus": args.gpus, "torch": torch.__version__, "parts": {}}
    scratch = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    for part in args.parts.split(","):
        rows = []
        for processes in sorted({int(n) for n in args.counts.split(",")} if args.counts else {1, args.gpus}):
            extra = ["--batch", str(8 if part == "distill" else args.batch),
                     "--steps", str(4 if part == "distill" else args.steps)]
            if part == "gptq":
                extra += ["--save", str(scratch / f"gptq-{processes}.pt")] + (["--breakdown"] if args.breakdown else [])
            if part == "peer":
                ids = scratch / "ids.pt"
                vocab = (LLAMA2_7B if args.shape == "big" else TINY)["vocab_size"]
                torch.save(random_tokens(args.samples, args.seq_len, vocab), ids)
                peer = [str(Path(__file__).with_name("peer_llmcompressor_distributed.py")), "--model",
                        "llama2-7b-shape" if args.shape == "big" else "tiny", "--ids", str(ids), "--bits", "4",
                        "--group-size", "128" if args.shape == "big" else "32", "--device", args.device]
                row = _launch(peer, processes, {"PYTHONPATH": args.peer_pythonpath or ""})
            else:
                row = _launch([*me, "--worker", part, *extra], processes)
            rows.append(row)
            print(json.dumps(row), flush=True)
        if part == "gptq" and len(rows) == 2 and all("seconds" in r for r in rows):
            rows[1]["share_of_identical_weights_vs_1_process"] = _agreement(scratch / "gptq-1.pt",
                                                                            scratch / f"gptq-{args.gpus}.pt")
        results["parts"][part] = rows
    for part, rows in list(results["parts"].items()):
        if len(rows) == 2 and all("seconds" in r for r in rows):
            one, many = rows
            if "tokens_per_s" in one:
                results["parts"][part + "_speedup"] = round(many["tokens_per_s"] / one["tokens_per_s"], 3)
            else:
                results["parts"][part + "_time_ratio"] = round(many["seconds"] / one["seconds"], 3)
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        existing = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
        existing.setdefault("parts", {}).update(results["parts"])
        Path(args.out).write_text(json.dumps({**results, "parts": existing["parts"]}, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""W8A8 int8 measured two ways.

Per Linear (default): the W8A8 int8 Linear against the alternatives, float32 and bfloat16 F.linear, int8 weights with
bf16 activations (aten._weight_int8pack_mm, the packed runtime's W8A16), and W8A8 int8 as the packed runtime runs it
(per-token quantization + torch._int_mm + scaling), plus torch._int_mm alone and with the weight passed as a
contiguous [in, out] copy instead of the transposed view. Medians of --repeats runs after a warm-up, in microseconds.

    python eval/bench_int8_w8a8.py --device cpu --shape smollm2 --rows 1,16,512 --out OUT.json

Whole model (`--run RUN`): every step folder of a run loaded packed, one prefill of --prefill tokens (logits of the
last token, as `compress bench` times it) per folder in turn, --repeats rounds, so a loaded machine slows every folder
alike; the wall time and the process's CPU time of each call, medians in milliseconds.

    python eval/bench_int8_w8a8.py --run RUN --threads 2 --prefill 512 --repeats 5 --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from compress.modules import WeightQuant
from compress.quantize.int8_runtime import (
    ACTIVATION_ARGS,
    WEIGHT_ARGS,
    int8_matmul,
    quantize_activation,
)
from compress.quantize.packed import Int8W8A8Linear

SHAPES = {  # name -> (in, out) of each Linear of a decoder layer (q/k/v and gate/up fused, as the packed runtime runs)
    "smollm2": {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576)},
    "llama2-7b": {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)},
}


def _time(function, repeats: int, device: str) -> float:
    function()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e6, 1)


def prefill_steps(run: Path, tokens: int, repeats: int, device: str) -> dict:
    """Each step folder's prefill, the folders interleaved in every round."""
    import compress
    from compress.bench import step_folders

    models = {folder.name: compress.load(folder, device=device, runtime="packed")[0] for folder in step_folders(run)}
    ids = torch.randint(0, 49152, (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    wall: dict[str, list[float]] = {name: [] for name in models}
    cpu: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        for _ in range(repeats):
            for name, model in models.items():
                started, cpu_started = time.perf_counter(), time.process_time()
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
                wall[name].append(1000 * (time.perf_counter() - started))
                cpu[name].append(1000 * (time.process_time() - cpu_started))
    first = next(iter(models))
    out = {}
    for label, data in (("wall_ms", wall), ("cpu_ms", cpu)):
        medians = {name: round(statistics.median(v), 1) for name, v in data.items()}
        out[label] = {"median": medians, "all": {name: [round(x, 1) for x in v] for name, v in data.items()},
                      f"{first}_over_each": {name: round(medians[first] / m, 3) for name, m in medians.items()}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", choices=list(SHAPES), default="smollm2")
    parser.add_argument("--rows", default="1,16,512")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--run", type=Path, help="time the prefill of this run's step folders instead")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python eval/bench_int8_w8a8.py " + " ".join(
        "RUN" if a == str(args.run) else "OUT.json" if a == args.out else a for a in sys.argv[1:])
    if args.run:
        result = {"device": "cpu" if device == "cpu" else torch.cuda.get_device_name(),
                  "threads": torch.get_num_threads(), "torch": torch.__version__, "command": command,
                  "prefill_tokens": args.prefill, **prefill_steps(args.run, args.prefill, args.repeats, device)}
        print(json.dumps(result, indent=1))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        return
    generator = torch.Generator().manual_seed(0)
    rows_out = []
    for name, (in_features, out_features) in SHAPES[args.shape].items():
        weight = torch.randn(out_features, in_features, generator=generator).to(device)
        scale = weight.abs().amax(1, keepdim=True) / 127.5
        codes = torch.round(weight / scale).clamp(-128, 127).to(torch.int8)
        quant = WeightQuant(WEIGHT_ARGS, scale, torch.zeros_like(scale, dtype=torch.int8), ACTIVATION_ARGS)
        w8a8 = Int8W8A8Linear(codes, scale, None, quant)
        w_bf16, scale_bf16 = weight.bfloat16(), scale.reshape(-1).bfloat16()
        codes_in_out = codes.T.contiguous()
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, in_features, generator=generator).to(device)
            x_bf16 = x.bfloat16()
            x_int8, _ = quantize_activation(x)
            timings = {
                "float32 F.linear": _time(lambda: F.linear(x, weight), args.repeats, device),
                "bf16 F.linear": _time(lambda: F.linear(x_bf16, w_bf16), args.repeats, device),
                "W8A16 _weight_int8pack_mm": _time(
                    lambda: torch.ops.aten._weight_int8pack_mm(x_bf16, codes, scale_bf16), args.repeats, device),
                "W8A8 Int8W8A8Linear (quantize + _int_mm + scale)": _time(lambda: w8a8(x), args.repeats, device),
                "_int_mm alone (transposed view)": _time(lambda: int8_matmul(x_int8, codes), args.repeats, device),
                "_int_mm alone ([in, out] contiguous)": _time(
                    lambda: torch._int_mm(x_int8, codes_in_out), args.repeats, device),
                "per-token quantization alone": _time(lambda: quantize_activation(x), args.repeats, device),
            }
            rows_out.append({"linear": name, "in": in_features, "out": out_features, "rows": rows, "us": timings})
            print(json.dumps(rows_out[-1]), flush=True)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "shape": args.shape,
              "command": command, "results": rows_out}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Memory while loading a quantized step folder with the packed runtime: built straight from the checkpoint
(compress.quantize.packed_load) against the earlier way (the dense model first, then packed). Each load runs in a fresh
process, after the imports, the model's modeling code and the folder's tokenizer (so those are not counted); its peak
is the high-water mark of resident memory (Linux VmHWM, reset just before the load) minus the resident memory before
it, and on CUDA the peak of allocated GPU memory; both are divided by the packed model's bytes (every parameter and
buffer once).

    python eval/bench_packed_load.py runs/smollm2-135m-rtn4/01-quantize --device cpu --out eval/results/...json
    python eval/bench_packed_load.py --random-7b-layers 8 --device cuda --out ...   # a machine without the model

`--random-7b-layers N` measures, instead of a folder, a Llama-2-7B-shape model with N layers and random weights (the
bytes do not depend on the values), quantized W4 g128 (RTN) and saved with a stand-in tokenizer to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measure(folder: str, device: str, dtype: str, way: str) -> dict:
    import compressed_tensors.quantization  # noqa: F401
    import torch
    import transformers
    from transformers import AutoConfig

    from compress.models import load_tokenizer, resolve_source
    from compress.quantize import packed_load
    from compress.quantize.packed import weight_bytes

    # imports (the model's modeling module too: built once on the meta device) and the tokenizer before the baseline:
    # what is measured is the model
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        transformers.AutoModelForCausalLM.from_config(config)
    load_tokenizer(resolve_source(folder))
    if device == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    gpu_before = torch.cuda.memory_allocated() if device == "cuda" else 0
    with open("/proc/self/clear_refs", "w") as clear:  # VmHWM := VmRSS
        clear.write("5")
    rss_before = _status("VmRSS")
    if way == "dense then packed":  # the earlier path: the dense model, then every quantized Linear packed
        from compress.models import load_model
        from compress.quantize.packed import pack_model

        model, _ = load_model(folder, dtype=dtype, device=device)
        pack_model(model)
    else:  # what compress.load(folder, runtime="packed") builds, less the tokenizer (measured before the baseline)
        from compress.models import DTYPES

        with torch.device(device):
            model = packed_load.load_packed(Path(folder), DTYPES[dtype], device)
    row = {"way": way, "packed_bytes": weight_bytes(model),
           "host_peak_bytes": _status("VmHWM") - rss_before, "host_after_bytes": _status("VmRSS") - rss_before}
    if device == "cuda":
        row["gpu_peak_bytes"] = torch.cuda.max_memory_allocated() - gpu_before
    for key in ("host_peak_bytes", "gpu_peak_bytes"):
        if key in row:
            row[key.replace("_bytes", "_vs_packed")] = round(row[key] / row["packed_bytes"], 3)
    return row


def random_checkpoint(layers: int, device: str, folder: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_models import LLAMA2_7B, random_llama

    import compress
    from compress.checkpoint import save_model

    model = random_llama(dict(LLAMA2_7B, num_hidden_layers=layers), torch.bfloat16, device)
    compress.quantize(model, compress.RTN(bits=4, group_size=128), show_progress=False)
    vocabulary = {f"t{i}": i for i in range(16)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocabulary, unk_token="t0")),
                                        unk_token="t0")
    save_model(model, tokenizer, folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?")
    parser.add_argument("--random-7b-layers", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--way", help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=3,
                        help="fresh processes per way (the peak depends on the allocator)")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.way:
        print(json.dumps(measure(args.folder, args.device, args.dtype, args.way)))
        return
    if args.random_7b_layers:
        with tempfile.TemporaryDirectory() as temporary:
            args.folder = str(Path(temporary, f"llama2-7b-shape-{args.random_7b_layers}-layers-w4g128"))
            random_checkpoint(args.random_7b_layers, args.device, Path(args.folder))
            if args.device == "cuda":
                import torch

                torch.cuda.empty_cache()  # the children measure their own peaks; this one's cache only takes room
            return run_ways(args)
    if not args.folder:
        parser.error("a step folder or --random-7b-layers")
    run_ways(args)


def run_ways(args) -> None:
    rows = []
    for way in ("packed from the checkpoint", "dense then packed"):
        for _ in range(args.runs):
            output = subprocess.run([sys.executable, __file__, args.folder, "--device", args.device, "--dtype",
                                     args.dtype, "--way", way], capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(output.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    result = {"folder": Path(args.folder).name, "device": args.device, "dtype": args.dtype, "rows": rows,
              "command": "python eval/bench_packed_load.py " + (
                  f"--random-7b-layers {args.random_7b_layers}" if args.random_7b_layers else
                  f"RUN/{Path(args.folder).name}") + f" --device {args.device} --dtype {args.dtype} --runs {args.runs}"}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""What each PTQ method and quantization-aware recovery keep of a task-adapted model, in one table.

The model is first adapted to the tasks as the demo recipe's first step does (LoRA on politeness + RTE rows), so there
is a skill to lose. Then, per bit width: RTN, GPTQ, AWQ and AWQ + GPTQ, each followed (with --qat STEPS) by QAT-KD
recovery from its own result (train: --qat-train, distilling from the adapted float model on task rows + WikiText-2);
and the float control, trained with the same budget and teacher without quantization. Each row: WikiText-2
perplexity, RTE and politeness accuracy, impolite F1, seconds and peak memory of the step. With --peer-python,
llm-compressor's GPTQ and AWQ (its AWQModifier then round-to-nearest; eval/peer_llmcompressor.py, in its own
virtualenv) run on the same adapted weights and calibration ids, and their weights are scored by the same evals.

    python eval/bench_recovery.py --bits 4,3 --qat 100 --control --out eval/results/bench_recovery_smollm2_h200.json
    python eval/bench_recovery.py --bits 4 --methods awq-gptq,gptq --tasks wikitext2 \\
        --peer-python LLMC/bin/python --out eval/results/bench_recovery_peer_smollm2_cpu.json
"""

from __future__ import annotations

import argparse
import atexit
import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import yaml

import compress
from compress.data import calibration_batches, load_text
from compress.measure import measure
from compress.training import training_examples

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import run_peer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
METHODS = {
    "rtn": lambda g: compress.RTN(**g),
    "gptq": lambda g: compress.GPTQ(**g),
    "awq": lambda g: compress.AWQ(**g),
    "awq-linear": lambda g: compress.AWQ(**g, loss="linear"),
    "awq-gptq": lambda g: compress.AWQ(**g, gptq={}),
    "awq-linear-gptq": lambda g: compress.AWQ(**g, loss="linear", gptq={}),
    "awq-noclip": lambda g: compress.AWQ(**g, clip=False),
    "awq-qprop": lambda g: compress.AWQ(**g, propagate="quantized"),
    "awq-noduo": lambda g: compress.AWQ(**g, duo_scaling=False),
    "rtn-asym": lambda g: compress.RTN(**g, sym=False),
    "awq-asym": lambda g: compress.AWQ(**g, sym=False),
}
RECOVERY_DATA = ("politeness-train", "rte-train", "wikitext2-valid")


def wikitext2_test_ids(tokenizer) -> torch.Tensor:
    """The raw WikiText-2 test text tokenized whole, as Hugging Face's perplexity guide does (once per run)."""
    return tokenizer(load_text("wikitext2-test"), return_tensors="pt").input_ids[0]


def independent_perplexity(model, ids: torch.Tensor, windows: int, seq_len: int = 512) -> float:
    """WikiText-2 test perplexity from transformers' own loss (labels = the inputs), not compress's evaluator: the
    first `windows` windows of `seq_len` tokens of `ids` (wikitext2_test_ids) side by side, each scored alone."""
    device = next(model.parameters()).device
    losses = []
    with torch.inference_mode():
        for first in range(0, min(windows, len(ids) // seq_len) * seq_len, seq_len):
            window = ids[first:first + seq_len][None].to(device)
            losses.append(model(input_ids=window, labels=window).loss.float().item())
    return float(torch.tensor(losses).mean().exp())


def _scores(model, tokenizer, tasks, independent: tuple[torch.Tensor, int] | None = None) -> dict:
    metrics = compress.evaluate(model, tokenizer, tasks, wikitext2=compress.Perplexity(
        seq_len=512, stride=512, max_tokens=16384), choice=compress.ChoiceEval(num_fewshot=0), show_progress=False)
    row = {}
    if "wikitext2" in metrics:
        row["wikitext2_ppl"] = metrics["wikitext2"]["perplexity"]
    if independent:
        row["wikitext2_ppl_independent"] = independent_perplexity(model, *independent)
    for task in ("rte", "politeness"):
        if task in metrics:
            row[f"{task}_acc"] = metrics[task]["accuracy"]
    if "politeness" in metrics:
        row["impolite_f1"] = metrics["politeness"]["per_label"]["impolite"]["f1"]
    return row


def _adapted(args):
    """The demo recipe's first step (task adaptation), run on the model."""
    model, tokenizer = compress.load_model(args.model, args.dtype, args.device)
    recipe = yaml.safe_load((REPO / "recipes" / "smollm2-135m-4bit-prune25.yaml").read_text())
    step = compress.LoRARecovery(**recipe["steps"][0]["finetune"])
    data = training_examples(tokenizer, step.data, step.seq_len)
    model = compress.finetune(model, step, data, seed=0, show_progress=False)
    return model, tokenizer


def _peer(args, method: str, bits: int, folder: Path, ids_path: Path, weights: Path) -> dict:
    return run_peer(args.peer_python, ["--model", str(folder), "--ids", str(ids_path), "--method", method, "--bits",
                                       str(bits), "--group-size", str(args.group_size), "--device", args.device,
                                       "--dtype", args.dtype, "--save-weights", str(weights)], args.peer_pythonpath)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapted", help="skip the adaptation and quantize this model as it is: a task-adapted "
                                          "folder, or a base model (folder, GGUF file or model name)")
    parser.add_argument("--bits", default="4,3")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--methods", default="rtn,gptq,awq,awq-gptq")
    parser.add_argument("--samples", type=int, default=64, help="calibration windows of 512 tokens")
    parser.add_argument("--qat", type=int, default=0, help="QAT-KD recovery steps after each method (0: none)")
    parser.add_argument("--qat-train", default="weights_and_scales", choices=["scales", "weights_and_scales"])
    parser.add_argument("--qat-lr", type=float, default=2e-5)
    parser.add_argument("--control", action="store_true", help="the float model trained with the QAT budget")
    parser.add_argument("--recovery-data", default=",".join(RECOVERY_DATA),
                        help="what QAT-KD and the control train on (task rows need lm-eval)")
    parser.add_argument("--tasks", default="wikitext2,rte,politeness")
    parser.add_argument("--peer-python", help="python of a virtualenv with llm-compressor; omit to skip it")
    parser.add_argument("--peer-methods", default="gptq,awq")
    parser.add_argument("--peer-pythonpath", default="", help="PYTHONPATH for the peer (e.g. a --target install)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--independent-windows", type=int, default=0,
                        help="also WikiText-2 perplexity from transformers' own loss on this many 512-token windows")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    tasks = args.tasks.split(",")

    work = Path(tempfile.mkdtemp(prefix="bench-recovery-"))  # the adapted model, calibration ids, the peer's weights
    atexit.register(shutil.rmtree, work, True)
    if args.adapted:
        adapted, tokenizer = compress.load_model(args.adapted, args.dtype, args.device)
        folder = Path(args.adapted)
        if not (folder / "config.json").is_file():  # a GGUF file or a model name: the peer reads a plain folder
            folder = work / "adapted"
            compress.save_model(adapted, tokenizer, folder)
    else:
        with measure() as cost:
            adapted, tokenizer = _adapted(args)
        folder = work / "adapted"
        compress.save_model(adapted, tokenizer, folder)
        print(f"adapted in {cost['seconds']:.0f} s", flush=True)
    ids = calibration_batches(tokenizer, "wikitext2-valid", args.samples, 512, seed=0)
    torch.save(ids, work / "ids.pt")
    data = tuple(args.recovery_data.split(","))
    recovery_data = training_examples(tokenizer, data, 256) if args.qat else None
    budget = dict(steps=args.qat, lr=args.qat_lr, batch_size=8, seq_len=256, data=data)
    rows = []

    def record(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps({"device": args.device, "dtype": args.dtype, "samples": args.samples,
                                              "group_size": args.group_size, "qat": budget, "rows": rows}, indent=1))

    independent = (wikitext2_test_ids(tokenizer), args.independent_windows) if args.independent_windows else None

    def scores(model) -> dict:
        return _scores(model, tokenizer, tasks, independent)

    record({"method": "adapted float", "bits": 16, **scores(adapted)})
    if args.control and args.qat:
        model = copy.deepcopy(adapted)
        config = compress.Distill(**budget, kd=compress.KD())
        with measure() as cost:
            model = compress.distill(model, config, recovery_data, teacher=adapted, seed=0, show_progress=False)
        record({"method": "float control (same KD budget)", "bits": 16, "seconds": cost["seconds"],
                "peak_bytes": cost.get("peak_cuda_bytes", cost["peak_rss_bytes"]), **scores(model)})
        del model
    for bits in [int(b) for b in args.bits.split(",")]:
        grid = dict(bits=bits, group_size=args.group_size)
        for name in [m for m in args.methods.split(",") if m]:
            model = copy.deepcopy(adapted)
            with measure() as cost:
                compress.quantize(model, METHODS[name](grid), ids, show_progress=False)
            record({"method": name, "bits": bits, "seconds": cost["seconds"],
                    "peak_bytes": cost.get("peak_cuda_bytes", cost["peak_rss_bytes"]),
                    **scores(model)})
            if args.qat:
                config = compress.QAT(**grid, **budget, train=args.qat_train, kd=compress.KD())
                with measure() as cost:
                    compress.quantize(model, config, train_data=recovery_data, teacher=adapted,
                                      show_progress=False)
                record({"method": f"{name} + QAT-KD ({args.qat_train})", "bits": bits, "seconds": cost["seconds"],
                        "peak_bytes": cost.get("peak_cuda_bytes", cost["peak_rss_bytes"]),
                        **scores(model)})
            del model
        if args.peer_python:
            from safetensors.torch import load_file

            for method in args.peer_methods.split(","):
                weights = work / f"peer-{method}-w{bits}.safetensors"
                peer = _peer(args, method, bits, folder, work / "ids.pt", weights)
                model = copy.deepcopy(adapted)
                model.load_state_dict(load_file(weights, device=args.device), strict=False)
                record({"method": peer["tool"], "bits": bits, "seconds": peer["seconds"],
                        "peak_bytes": peer["peak_cuda_bytes"], **scores(model)})
                del model


if __name__ == "__main__":
    main()

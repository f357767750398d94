"""The protocol the SmolLM2 quantization benchmarks share (eval/bench_fp4.py, eval/bench_rotate.py): the float model
loaded once, calibration token ids from wikitext2-valid, WikiText-2 test perplexity in 512-token windows, a fresh
copy of the float weights for each variant, and a results file rewritten as each variant finishes."""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import torch
from bench_models import run_peer

import compress
from compress.data import calibration_batches


def add_protocol_arguments(parser, samples: int = 32, seq_len: int = 512) -> None:
    """The command-line options every script on this protocol takes."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=samples)
    parser.add_argument("--seq-len", type=int, default=seq_len)
    parser.add_argument("--ppl-tokens", type=int, default=16384)
    parser.add_argument("--out", help="write the results as JSON here (each variant as it finishes)")


def peer_weights(python: str, model, tokenizer, ids: torch.Tensor, arguments: list[str]) -> tuple[dict, dict]:
    """llm-compressor (eval/peer_llmcompressor.py, `arguments` naming the method) on `model`, saved as a plain folder,
    calibrated on the same token ids, in float32 on the CPU: the weights it made (a state dict) and its report."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="peer-llmcompressor-") as folder:  # the base model and the peer's weights
        work = Path(folder)
        compress.save_model(model, tokenizer, work / "base")
        torch.save(ids, work / "ids.pt")
        report = run_peer(python, ["--model", str(work / "base"), "--ids", str(work / "ids.pt"), "--device", "cpu",
                                   "--dtype", "float32", "--save-weights", str(work / "peer.safetensors"), *arguments])
        return load_file(work / "peer.safetensors"), report


def _public(text: str) -> str:
    """`text` with each absolute path of this machine (a model file, --out) cut to its file name: results are
    published."""
    return " ".join(Path(word).name if word.startswith(("/", "~")) else word for word in text.split(" "))


class WikitextBench:
    def __init__(self, model: str, samples: int, seq_len: int, ppl_tokens: int, out: str | None, **header):
        self.name, self.out = model, out
        self.model, self.tokenizer = compress.load_model(model, "float32", "cpu")
        self.ids = calibration_batches(self.tokenizer, "wikitext2-valid", samples, seq_len, seed=0)
        self.protocol = compress.Perplexity(seq_len=512, max_tokens=ppl_tokens, batch_size=8)
        public_header = {key: _public(value) if isinstance(value, str) else value for key, value in header.items()}
        self.results = {"model": _public(model), "calibration": f"wikitext2-valid, {samples} x {seq_len} tokens",
                        "perplexity_protocol": f"wikitext2-test, {ppl_tokens} tokens, windows of 512",
                        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}", **public_header,
                        "results": []}

    def fresh(self) -> torch.nn.Module:
        """A new model with the float weights (quantize marks its Linears, rotate unties its head): a copy of the loaded
        model, which is only ever evaluated. Two float32 copies, not three (a kept state dict and a reload): the 1.5B
        model's 7 GB each, with a rotation's or W4A4's temporaries, went over 24 GiB."""
        return copy.deepcopy(self.model)

    def perplexity(self, model: torch.nn.Module) -> float:
        return compress.perplexity(model, self.tokenizer, self.protocol, show_progress=False)["perplexity"]

    def write(self) -> None:
        if self.out:
            Path(self.out).write_text(json.dumps(self.results, indent=2) + "\n")

    def record(self, entry: dict) -> None:
        self.results["results"].append(entry)
        print(json.dumps(entry), flush=True)
        self.write()

    def merge(self, paths: list[str]) -> None:
        """Add the variants of other invocations' results files (same model, calibration and protocol: e.g. variants
        run side by side) that this one did not run."""
        for other in paths:
            merged = json.loads(Path(other).read_text())
            for key in ("model", "calibration", "perplexity_protocol"):
                if merged[key] != self.results[key]:
                    raise SystemExit(f"{other}: {key} {merged[key]!r} differs from this run's {self.results[key]!r}")
            seen = {entry["variant"] for entry in self.results["results"]}
            self.results["results"] += [entry for entry in merged["results"] if entry["variant"] not in seen]

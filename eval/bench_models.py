"""Models and calibration for the GPTQ benchmark, shared by our side (bench_gptq.py) and the llm-compressor side
(peer_llmcompressor.py, run in its own virtualenv), and the one way our benchmarks start that side (`run_peer`).
Imports only torch and transformers."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import torch

# Llama-2-7B's shape (random weights: speed does not depend on their values)
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)


def random_llama(shape: dict, dtype: torch.dtype, device: str, seed: int = 0):
    """A Llama of the given shape with random weights, initialised directly on `device` (fast on a GPU) and in
    `dtype` (a 7B model built in float32 first would need twice the memory while it is cast)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**shape, dtype=dtype)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).to(dtype)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def random_tokens(samples: int, seq_len: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (samples, seq_len), generator=torch.Generator().manual_seed(seed))


def timed(fn):
    """Run fn() and return (result, seconds, peak CUDA bytes or None), synchronising around it."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize()
    return result, time.perf_counter() - start, (torch.cuda.max_memory_allocated() if cuda else None)


class PeerFailed(RuntimeError):
    """llm-compressor's side ended with an error or printed no report."""


def run_peer(python: str, arguments: list[str], pythonpath: str | None = None) -> dict:
    """eval/peer_llmcompressor.py with `arguments` under `python` (llm-compressor's own virtualenv: it pins
    transformers <= 5.17); its report, the last JSON line it prints. PYTHONPATH is `pythonpath` or empty, so the
    peer never imports our environment's packages."""
    command = [python, str(Path(__file__).with_name("peer_llmcompressor.py")), *arguments]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": pythonpath or ""})
    reports = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not reports:
        raise PeerFailed(f"llm-compressor run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(reports[-1])

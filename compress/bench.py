"""`compress bench`: how fast and how big a model is when it runs — decode tokens/s, prefill time, time to first token,
weight bytes in memory and peak memory — for one model folder or every step folder of a run, side by side.

Protocol (written into the result): random token ids (speed does not depend on them); greedy decoding of `new`
tokens after a `prompt`-token prompt at each batch size, through transformers' `generate`, or with `compile=True` (the
default on a GPU: compiled_by_default) the path that measures the weights rather than Python: a static KV cache, the
prompt in one forward and every later token by one compiled step (a CUDA graph on a GPU; gpt-fast's loop: generate's
own per-token Python costs as much as a 4-bit 7B model's weights take to stream); a model the compiler refuses is
timed eagerly, with a note; decode tokens/s = batch × (new − 1) / (time of the whole generation − time to first token);
prefill = one forward of a `prefill`-token sequence. Each timing is the median of `repeats` runs after one warm-up.
Quantized folders load with the packed runtime (compress.quantize.packed) unless told otherwise."""

from __future__ import annotations

import functools
import statistics
import time
from pathlib import Path

import torch
from rich.progress import Progress

from compress.checkpoint import STEP_FILE
from compress.config.sources import STEP_FOLDER
from compress.errors import CompressError
from compress.measure import measure


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(work, device: torch.device, repeats: int) -> float:
    work()  # warm-up: kernels chosen, caches allocated (and, compiled, the graph built)
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        work()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _generate(model, ids: torch.Tensor, new: int, compile: bool):
    if compile:
        return _static_greedy(model, ids, new)
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, pad_token_id=0)


def _cache_argument(model) -> str:
    """transformers renamed `past_key_values` to `cache` (5.24; the old name warns on every call)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _decode_one(model, token: torch.Tensor, cache, position: torch.Tensor, cache_argument: str) -> torch.Tensor:
    logits = model(input_ids=token, cache_position=position, use_cache=True, **{cache_argument: cache}).logits
    return logits[:, -1].argmax(-1, keepdim=True)


@functools.cache
def _compiled_decode_one():
    """The decode step compiled (built on first use: torch.compile imports dynamo, ~2 s, which a report needs not)."""
    return torch.compile(_decode_one, mode="reduce-overhead", fullgraph=True, dynamic=False)


def _static_greedy(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy decoding of `new` tokens: static KV cache, one forward over the prompt, then the compiled step."""
    from transformers import StaticCache

    prompt = ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=prompt + new)
    cache_argument = _cache_argument(model)
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_argument: cache},
                       cache_position=torch.arange(prompt, device=ids.device)).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        position = torch.tensor([prompt], device=ids.device)
        for _ in range(new - 1):
            # the compiled graph reuses its output buffer: clone the token
            token = _compiled_decode_one()(model, token, cache, position, cache_argument).clone()
            position += 1
    return token


def _prefill(model, ids: torch.Tensor) -> torch.Tensor:
    """One forward over a whole prompt, the last token's logits only (what a server computes before decoding)."""
    return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits


@functools.cache
def _compiled_prefill():
    """The prefill compiled for its exact length (Inductor fuses the norms, rotary embedding and activation rounding
    that eager PyTorch runs as separate kernels; a server's prefill is compiled or graph-captured too)."""
    return torch.compile(_prefill, dynamic=False)


def _first_line(error: Exception) -> str:
    """A compiler's refusal in one line for the result: its type and the first 200 characters of its message."""
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200]}" if str(error) else type(error).__name__


def _lengths(value) -> tuple[int, ...]:
    return (value,) if isinstance(value, int) else tuple(value)


def bench_model(model, batches=(1,), prompt: int = 128, new: int = 128, prefill=2048, repeats: int = 3,
                compile: bool = False, seed: int = 0, reset: bool = True, compile_prefill: bool = False) -> dict:
    """Speed and memory of a loaded model (see the module's protocol); `prefill` is one length or several. A batch size
    or prefill length that runs out of memory gives a row saying so and the others still run. reset=False keeps the
    compiled decode steps of an earlier call on the same model (a warm-up pass). compile_prefill: each prefill length
    is timed compiled too (`compiled_ms` beside the eager `ms`)."""
    from compress.quantize.packed import packed_kernels, weight_bytes

    if new < 2:
        raise CompressError("--new must be at least 2: decoding speed is measured after the first token")
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    # a fresh compile cache per model: each model is a recompile, and dynamo stops at 8
    if (compile or compile_prefill) and reset:
        torch._dynamo.reset()
    generator = torch.Generator().manual_seed(seed)
    row: dict = {"weight_bytes": weight_bytes(model), "kernels": packed_kernels(model) or {"dense": 0},
                 "kv_cache": kv_cache_bytes(model)}
    with measure() as cost:
        prefills = []
        for length in _lengths(prefill):
            long = torch.randint(0, vocab, (1, length), generator=generator).to(device)
            try:
                with torch.inference_mode():
                    seconds = _median_seconds(lambda: _prefill(model, long), device, repeats)
                prefills.append({"tokens": length, "ms": round(1000 * seconds, 2)})
            except torch.OutOfMemoryError:
                prefills.append({"tokens": length, "error": "out of memory"})
                torch.cuda.empty_cache()
                continue
            if compile_prefill:
                try:
                    with torch.inference_mode():
                        seconds = _median_seconds(lambda: _compiled_prefill()(model, long), device, repeats)
                    prefills[-1]["compiled_ms"] = round(1000 * seconds, 2)
                except torch.OutOfMemoryError:
                    prefills[-1]["compiled_error"] = "out of memory"
                    torch.cuda.empty_cache()
                except Exception as error:  # noqa: BLE001 -- the eager figure stands; say why there is no other
                    prefills[-1]["compiled_error"] = _first_line(error)
        def first_and_whole(ids: torch.Tensor) -> tuple[float, float]:  # reads `compile` when called
            return (_median_seconds(lambda: _generate(model, ids, 1, compile), device, repeats),
                    _median_seconds(lambda: _generate(model, ids, new, compile), device, repeats))

        decode = []
        for batch in batches:
            ids = torch.randint(0, vocab, (batch, prompt), generator=generator).to(device)
            try:
                first, whole = first_and_whole(ids)
            except torch.OutOfMemoryError:
                decode.append({"batch": batch, "error": "out of memory"})
                torch.cuda.empty_cache()
                continue
            except Exception as error:  # noqa: BLE001 -- a model the compiler refuses is timed eagerly, and says so
                if not compile:
                    raise
                compile = False
                row["compile_error"] = _first_line(error)
                first, whole = first_and_whole(ids)
            if whole <= first:  # timing noise larger than the decoding itself: no figure rather than a wrong one
                decode.append({"batch": batch, "time_to_first_token_ms": round(1000 * first, 2),
                               "error": f"decoding {new} tokens timed no longer than the first token; raise --new"})
                continue
            decode.append({"batch": batch, "time_to_first_token_ms": round(1000 * first, 2),
                           "decode_tokens_per_s": round(batch * (new - 1) / (whole - first), 2)})
    row["prefill"] = prefills
    row["prefill_ms"] = next((p["ms"] for p in prefills if "ms" in p), None)
    row["decode"] = decode
    first_row = next((d for d in decode if "decode_tokens_per_s" in d), {})
    row["decode_tokens_per_s"] = first_row.get("decode_tokens_per_s")
    row["time_to_first_token_ms"] = first_row.get("time_to_first_token_ms")
    row["peak_bytes"] = cost.get("peak_cuda_bytes", cost["peak_rss_bytes"])
    row["decode_compiled"] = compile
    return row


KV_CONTEXT = 8192  # the context at which the KV cache's bytes are given


def kv_cache_bytes(model) -> dict:
    """The KV cache's precision and bytes, per token and for one sequence of KV_CONTEXT tokens, as a serving engine
    stores it (compress's own runtime keeps an FP8 cache's values in the compute dtype: compress.quantize.kv_cache)."""
    from compress.quantize.kv_cache import kv_bytes_per_token, kv_cache_precision

    per_token = kv_bytes_per_token(model)
    return {"precision": kv_cache_precision(model), "bytes_per_token": per_token, "context": KV_CONTEXT,
            "bytes_at_context": per_token * KV_CONTEXT}


def _loaded(folder: Path, dtype: str, device: str, runtime: str):
    """(model, the packed runtime's notes about settings it runs dequantized)."""
    import warnings

    from compress.models import load

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = load(folder, dtype=dtype, device=device, runtime=runtime)
    return model, [str(note.message) for note in caught if "packed kernel" in str(note.message)]


def bench_folder(folder: Path, speed, dtype: str, device: str) -> dict:
    """A step folder loaded with the packed runtime and timed as `speed` (a SpeedBench) says: the pipeline's bench."""
    model, notes = _loaded(folder, dtype, device, "packed")
    compile = compiled_by_default(speed.compile, device)
    row = bench_model(model, tuple(speed.batches), speed.prompt, speed.new, speed.prefill, speed.repeats, compile)
    protocol = _protocol(speed.batches, speed.prompt, speed.new, speed.prefill, speed.repeats, compile, "packed", dtype,
                         device)
    return {**row, "notes": notes + _compile_notes(row), "protocol": protocol}


def _compile_notes(row: dict) -> list[str]:
    return [f"the compiled decode step failed ({row['compile_error']}): decoding was timed eagerly"] \
        if "compile_error" in row else []


def _protocol(batches, prompt, new, prefill, repeats, compile, runtime, dtype, device) -> dict:
    return {"device": torch.cuda.get_device_name() if str(device).startswith("cuda")
            else f"cpu ({torch.get_num_threads()} threads)", "dtype": dtype, "runtime": runtime,
            "batches": list(batches), "prompt_tokens": prompt, "new_tokens": new, "prefill_tokens": prefill
            if isinstance(prefill, int) else list(prefill),
            "repeats": repeats, "static_cache_compiled": compile, "torch": torch.__version__}


def step_folders(path: Path) -> list[Path]:
    """A run folder's complete step folders in order, or the model folder itself."""
    if (path / "config.json").is_file():
        return [path]
    steps = sorted(p for p in path.iterdir() if p.is_dir() and STEP_FOLDER.match(p.name)
                   and not p.name.endswith(".partial") and (p / STEP_FILE).is_file()) if path.is_dir() else []
    if not steps:
        raise CompressError(f"{path} is neither a model folder (config.json) nor a run folder with complete step "
                            f"folders (00-base, 01-...)")
    return steps


DTYPE_NAMES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
# `compress bench`'s defaults where the command line gives none: the issue-26 matrix on a GPU, a lighter one on a CPU
DEFAULT_MATRIX = {"cuda": ((1, 16, 64), (512, 2048, 8192)), "cpu": ((1, 16), (512,))}


def compiled_by_default(compile: bool | None, device: str | torch.device) -> bool:
    """`compile` as given, or where it is not (None): compiled on a GPU, where the decode step is a CUDA graph and
    eager decoding times Python rather than the weights (a 7B W4 model read 0.57x bf16's tokens/s eagerly on an H100,
    eval/results/bench_prefill_sliced_h100.json, and 2.48x compiled); eager on a CPU, where compiling costs ~40 s a
    batch size and gains little."""
    return str(device).startswith("cuda") if compile is None else compile


def bench_settings(device: str, dtype: str, batches, prefill) -> tuple[str, str, tuple, tuple]:
    """(device, dtype, batches, prefill lengths) with "auto" and missing values resolved; a clear error for a dtype
    that is not one."""
    from compress.models import DTYPES

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":  # the kernels compute in bf16 on a GPU; float32 is the CPU's fast float path
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    dtype = DTYPE_NAMES.get(dtype, dtype)
    if dtype not in DTYPES:
        raise CompressError(f"unknown dtype '{dtype}'; allowed: auto, {', '.join(DTYPES)} (or fp32, bf16, fp16)")
    default_batches, default_prefill = DEFAULT_MATRIX["cuda" if device.startswith("cuda") else "cpu"]
    return device, dtype, tuple(batches or default_batches), _lengths(prefill or default_prefill)


def bench(path: str | Path, batches=None, prompt: int = 128, new: int = 128, prefill=None, repeats: int = 3,
          compile: bool | None = None, runtime: str = "packed", dtype: str = "auto", device: str = "auto",
          show_progress: bool = True) -> dict:
    """`compress bench`: every step folder of a run (or one model folder), loaded with `runtime`, measured alike;
    `compile` None: compiled on a GPU (compiled_by_default)."""
    device, dtype, batches, prefill = bench_settings(device, dtype, batches, prefill)
    compile = compiled_by_default(compile, device)
    folders = step_folders(Path(path))
    rows = []
    with Progress(transient=True, disable=not show_progress) as progress:
        task = progress.add_task("bench", total=len(folders))
        for folder in folders:
            progress.update(task, description=f"bench {folder.name}")
            model, notes = _loaded(folder, dtype, device, runtime)
            row = bench_model(model, batches, prompt, new, prefill, repeats, compile)
            rows.append({"step": folder.name, **row, "notes": notes + _compile_notes(row)})
            del model
            progress.advance(task)
    return {"steps": rows, "protocol": _protocol(batches, prompt, new, prefill, repeats, compile, runtime, dtype,
                                                 device)}

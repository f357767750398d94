"""Evaluations: WikiText-2 perplexity (here) and the choice tasks RTE and politeness (compress.tasks, through lm-eval).

Perplexity protocol (written into every report): the test text is tokenized as one stream; windows of `seq_len`
tokens start every `stride` tokens; each window scores only the tokens no earlier window scored, and a token is
scored only with at least one token of context inside its window (so with stride == seq_len the first token of each
window goes unscored, as in the transformers perplexity guide). `tokens_scored` in the result is the exact count."""

from __future__ import annotations

import math
import time

import torch
from rich.progress import Progress

from compress import distributed
from compress.config.evals import TASKS, ChoiceEval, Perplexity
from compress.data import source_of, token_stream
from compress.errors import CompressError
from compress.tasks import score_choice_tasks


def _windows(n_tokens: int, seq_len: int, stride: int):
    """(begin, end, n_new): each window [begin, end) scores its last n_new tokens."""
    scored_until = 0
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + seq_len, n_tokens)
        n_new = end - max(scored_until, begin + 1)  # the first token of the stream has no prediction
        if n_new > 0:
            yield begin, end, n_new
        scored_until = end
        if end == n_tokens:
            break


@torch.inference_mode()
def perplexity(model, tokenizer, config: Perplexity = Perplexity(), data_dir=None, show_progress: bool = True) -> dict:
    """WikiText-2 (or any text) perplexity; returns the value and the protocol that produced it."""
    start = time.perf_counter()
    full = token_stream(tokenizer, config.dataset, data_dir)
    stream = full[: config.max_tokens] if config.max_tokens is not None else full
    stride = config.stride or config.seq_len
    windows = list(_windows(stream.numel(), config.seq_len, stride))
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    # batches of windows; under several processes each scores its share and the sums are added
    batches = distributed.share([windows[i : i + config.batch_size] for i in range(0, len(windows), config.batch_size)])
    with Progress(transient=True, disable=not show_progress) as progress:
        task = progress.add_task(f"perplexity on {config.dataset}", total=sum(map(len, batches)))
        for batch in batches:
            # windows that score the same positions run together: all of them but the first (it scores from its
            # second token on, under overlapping windows) and the ragged final one, which run alone
            groups: dict[tuple[int, int], list] = {}
            for b, e, n_new in batch:
                groups.setdefault((e - b, n_new), []).append((b, e))
            for (length, n_new), group in groups.items():
                ids = torch.stack([stream[b:e] for b, e in group]).to(device)
                # the model's own forward, so its head's post-processing (Gemma 2/3's final logit soft-capping, any
                # family's logit scale) is in every score; logits_to_keep: the head runs only at the scored positions
                kept = torch.arange(length - n_new - 1, length - 1, device=device)
                logits = model(input_ids=ids, use_cache=False, logits_to_keep=kept).logits
                for row in range(len(group)):
                    nll += torch.nn.functional.cross_entropy(logits[row].float(), ids[row, -n_new:],
                                                             reduction="sum").item()
                count += n_new * len(group)
                progress.advance(task, len(group))
    nll, count = distributed.all_sum(nll), int(distributed.all_sum(count))
    return {
        "perplexity": math.exp(nll / count),
        "protocol": {
            "dataset": config.dataset,
            "source": source_of(config.dataset, data_dir),
            "seq_len": config.seq_len,
            "stride": stride,
            "tokens_scored": count,
            "tokens_available": int(full.numel()),
            "max_tokens": config.max_tokens,
        },
        "seconds": round(time.perf_counter() - start, 2),
    }


def check_tasks(tasks) -> None:
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise CompressError(f"unknown eval task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                            f"known: {', '.join(TASKS)}")


def evaluate(model, tokenizer, tasks=TASKS, wikitext2: Perplexity = Perplexity(), choice: ChoiceEval = ChoiceEval(),
             data_dir=None, show_progress: bool = True, seed: int = 0) -> dict:
    """Run the named evals on the in-memory model; returns {task: result} in the order asked."""
    check_tasks(tasks)
    results = {}
    if "wikitext2" in tasks:
        results["wikitext2"] = perplexity(model, tokenizer, wikitext2, data_dir, show_progress)
    choice_tasks = [task for task in tasks if task != "wikitext2"]
    if choice_tasks:
        results.update(score_choice_tasks(model, tokenizer, choice_tasks, choice, data_dir, show_progress, seed))
    return {task: results[task] for task in tasks}


def headline(task: str, result: dict) -> str:
    """One line for a console: the task's main number and how it was measured."""
    if "perplexity" in result:
        return (f"{task} perplexity {result['perplexity']:.3f} ({result['protocol']['tokens_scored']:,} tokens, "
                f"{result['seconds']:.0f} s)")
    return (f"{task} accuracy {100 * result['accuracy']:.2f} % ± {100 * result['stderr']:.2f} over {result['n']} rows "
            f"(majority class {100 * result['majority_baseline']:.1f} %, {result['seconds']:.0f} s)")


def evaluate_source(source: str, tasks=TASKS, wikitext2: Perplexity = Perplexity(), choice: ChoiceEval = ChoiceEval(),
                    dtype: str = "float32", device: str = "auto", data_dir=None, show_progress: bool = True) -> dict:
    """`compress eval`: load a step folder (or any model source) and run the named evals on it. dtype "auto" is
    bfloat16 on a GPU and float32 on a CPU, and the short names (bf16, fp16, fp32) are accepted, as `compress bench`
    does."""
    from compress.bench import DTYPE_NAMES
    from compress.models import DTYPES, load_model

    if not tasks:
        raise CompressError(f"no eval task named; known: {', '.join(TASKS)}")
    check_tasks(tasks)  # before the model loads
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    dtype = DTYPE_NAMES.get(dtype, dtype)
    if dtype not in DTYPES:
        raise CompressError(f"unknown dtype '{dtype}'; allowed: auto, {', '.join(DTYPES)} (or fp32, bf16, fp16)")
    model, tokenizer = load_model(source, dtype, device)
    return evaluate(model, tokenizer, tasks, wikitext2=wikitext2, choice=choice, data_dir=data_dir,
                    show_progress=show_progress)

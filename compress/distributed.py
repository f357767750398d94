"""Several processes: a recipe under `torchrun` or `accelerate launch` (or one process, where every function here is a
no-op or the identity).

Every rank runs every step on its own copy of the model (one GPU each, or the CPU); the work that reads data is split
between them and summed: calibration samples (GPTQ/AWQ Hessians and statistics, Taylor gradients), evaluation rows,
training batches (transformers' Trainer under accelerate). Results that must be identical on every rank (quantized
weights, pruning decisions) are computed once and broadcast, or computed from all-reduced sums. Rank 0 alone writes
step folders, reports and Hub uploads; `on_main` runs such work and hands its result, or its failure, to every rank.

Transport is torch.distributed: NCCL between GPUs (with gloo beside it for CPU tensors), gloo on the CPU.

A failure on any rank stops every rank within seconds, with that rank's error: the failing rank writes its error into
the launcher's key-value store (`failures_reach_every_rank`), and a watcher thread on every rank reads it there. A rank
blocked in a collective that its failed peer will never join (NCCL waits for its timeout; gloo too while the peer's
process lingers) cannot raise by itself, so the watcher ends the process, as torchrun would once it noticed."""

from __future__ import annotations

import atexit
import os
import sys
import threading
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from compress.errors import CompressError

T = TypeVar("T")
TIMEOUT_ENV = "COMPRESS_DIST_TIMEOUT"  # seconds a collective waits for the other ranks (default 30 min)
FAILURE_KEY = "compress/failure"  # in the process group's store: "rank N: error" of the first rank that failed
WATCH_SECONDS = 0.5  # how often each rank looks for a failure of another
# how long a watcher lets its own rank report a failure it also meets (a collective that broke when the failed peer
# exited; an error every rank raises alike) before ending the process with the other rank's error
GRACE_SECONDS = 5.0
_reporting = threading.Event()  # set once this process is reporting a failure of its own
_exiting = threading.Event()  # set at interpreter exit: the watcher stops before the store it reads is torn down


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def start(device: str) -> None:
    """Join the launcher's process group (once): NCCL with gloo beside it on GPUs, gloo on the CPU. Each rank takes
    the GPU of its LOCAL_RANK, so "cuda" means that GPU from here on."""
    if not launched() or dist.is_initialized():
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
    if device.startswith("cuda"):
        if local_world > torch.cuda.device_count():
            raise CompressError(f"{local_world} processes on this machine but {torch.cuda.device_count()} GPU(s): "
                                f"launch at most one process per GPU (torchrun --nproc-per-node "
                                f"{torch.cuda.device_count()})")
        torch.cuda.set_device(local_rank)
        dist.init_process_group("cpu:gloo,cuda:nccl", timeout=timeout, device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo", timeout=timeout)
    store = _store()
    watcher = None
    if store is not None:
        watcher = threading.Thread(target=_watch_for_failures, args=(store, rank()), name="compress-failure-watcher",
                                   daemon=True)
        watcher.start()
    atexit.register(_shut_down, watcher)


def _shut_down(watcher: threading.Thread | None) -> None:
    # C++ threads still running while the interpreter's teardown destroys their owners made a rank abort (SIGABRT,
    # "terminate called without an active exception") after a run that had succeeded: first the watcher, inside the
    # store's client; then, rarely, the process group's own threads. atexit handlers run before that teardown, so the
    # watcher stops and the process group is destroyed here, in that order.
    _exiting.set()
    if watcher is not None:
        watcher.join(timeout=WATCH_SECONDS + 10)
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a peer or the launcher already gone: the process is ending anyway
            pass


def _store():
    """The process group's key-value store (the launcher's), or None where this torch keeps it out of reach."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def _error_line(error: BaseException) -> str:
    text = "; ".join(line for line in str(error).splitlines() if line.strip())
    return text if isinstance(error, CompressError) else f"{type(error).__name__}: {text}"


def announce_failure(error: BaseException) -> None:
    """Tell every rank that this one failed, and with what. The first failure announced is kept: it is the cause, and
    later ones (peers whose collectives broke) its consequences."""
    _reporting.set()
    store = _store() if active() else None
    if store is None:
        return
    try:
        store.compare_set(FAILURE_KEY, "", f"rank {rank()}: {_error_line(error)}")
    except Exception:  # noqa: BLE001 - the store is gone: the launcher is already stopping every rank
        pass


def announced_failure() -> str | None:
    """The first failure any rank announced ("rank N: error"), or None."""
    store = _store() if active() else None
    try:
        return store.get(FAILURE_KEY).decode() if store is not None and store.check([FAILURE_KEY]) else None
    except Exception:  # noqa: BLE001 - the store is gone with the launcher
        return None


@contextmanager
def failures_reach_every_rank() -> Iterator[None]:
    """Any exception raised inside is announced to the other ranks (then re-raised here), so that they stop at once
    with it instead of waiting in a collective this rank will never join. Wrap a whole run in it."""
    try:
        yield
    except Exception as error:
        announce_failure(error)
        raise


def _watch_for_failures(store, me: int) -> None:
    """Watcher thread: once another rank announces a failure, give this rank GRACE_SECONDS to report a failure of
    its own, then print the other rank's error and end the process (it may be blocked in a collective forever)."""
    while not _exiting.wait(WATCH_SECONDS):
        try:
            if not store.check([FAILURE_KEY]):
                continue
            failure = store.get(FAILURE_KEY).decode()
        except Exception:  # noqa: BLE001 - the store closed: the run or its launcher is ending
            return
        if failure.startswith(f"rank {me}:") or _reporting.wait(GRACE_SECONDS):
            return  # this rank reports its own failure
        sys.stderr.write(f"error: rank {me}: stopped because {_failure_sentence(failure)}\n")
        sys.stderr.flush()
        os._exit(1)


def _failure_sentence(failure: str) -> str:
    failed, _, error = failure.partition(": ")
    return (f"{failed} failed: {error} (see its output); rerun the same command to resume from the last complete "
            f"step")


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast(value: T) -> T:
    """Rank 0's `value` on every rank (any picklable object)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: T) -> list[T]:
    """Every rank's `value`, in rank order, on every rank."""
    if not active():
        return [value]
    values: list = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def all_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks, in place (every rank gets the sum)."""
    if active():
        dist.all_reduce(tensor)
    return tensor


def all_sum(value: float) -> float:
    """A number summed over the ranks (float64 on the way, so counts and log-likelihood sums stay exact enough)."""
    if not active():
        return value
    return all_sum_(torch.tensor([value], dtype=torch.float64, device=_collective_device())).item()


def all_true(flag: bool) -> bool:
    """Whether `flag` holds on every rank (a branch all ranks must take together)."""
    if not active():
        return flag
    value = torch.tensor([int(flag)], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def same_(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's values in `tensor` on every rank, in place: results every rank computed alike are made identical
    (floating-point reductions need not agree to the last bit across devices)."""
    if active():
        dist.broadcast(tensor, src=0)
    return tensor


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() != "gloo" else torch.device("cpu")


def share(items: T) -> T:
    """This rank's contiguous share of a sequence or of a tensor's rows (sizes differ by at most one)."""
    if not active():
        return items
    n, parts, me = len(items), world_size(), rank()
    begin = me * (n // parts) + min(me, n % parts)
    return items[begin : begin + n // parts + (me < n % parts)]


def gather_rows(rows: torch.Tensor, total: int) -> torch.Tensor:
    """The inverse of `share` for tensors: every rank's share of rows, concatenated in rank order ([total, ...])."""
    if not active():
        return rows
    parts = world_size()
    most = -(-total // parts)
    padded = rows.new_zeros((most, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    gathered = rows.new_empty((parts * most, *rows.shape[1:]))
    dist.all_gather_into_tensor(gathered, padded.contiguous())
    sizes = [total // parts + (r < total % parts) for r in range(parts)]
    return torch.cat([gathered[r * most : r * most + size] for r, size in enumerate(sizes)])


def on_main(work: Callable[[], T], what: str) -> T:
    """Run `work` on rank 0 only (writing files) and return its result on every rank; if it fails there, every rank
    raises, naming `what`. No rank waits forever on a rank that failed."""
    if not active():
        return work()
    outcome: tuple = (None, None)
    if is_main():
        try:
            outcome = (work(), None)
        except CompressError as error:
            outcome = (None, str(error))
        except Exception as error:  # noqa: BLE001 - every rank must hear of it, then rank 0 re-raises as is
            broadcast((None, f"{type(error).__name__}: {error}"))
            raise
    result, failure = broadcast(outcome)
    if failure is not None:
        raise CompressError(failure if is_main() else f"rank 0 failed while {what}: {failure}")
    return result


def check_same_everywhere(description: dict, what: str) -> None:
    """Stop before any work if the ranks do not agree on `description` (recipe, code versions), naming the ranks
    that differ from rank 0 and the fields."""
    everyone = gather(description)
    differing = []
    for other, theirs in enumerate(everyone[1:], start=1):
        fields = sorted(key for key in set(theirs) | set(everyone[0]) if theirs.get(key) != everyone[0].get(key))
        if fields:
            differing.append(f"rank {other} ({', '.join(fields)})")
    if differing:
        raise CompressError(f"the processes disagree on {what}: {'; '.join(differing)} differ from rank 0; launch "
                            f"every rank with the same recipe, data and compress/torch/transformers versions")


def describe_failure(error: BaseException) -> str | None:
    """A line for a collective that timed out or lost a peer (another rank died or hangs), or None."""
    if not launched():
        return None
    text = str(error)
    if isinstance(error, getattr(dist, "DistBackendError", ())) or "timed out" in text.lower() or \
            "connection closed by peer" in text.lower() or "connection reset" in text.lower():
        _reporting.set()
        me = os.environ.get("RANK", "?")
        failure = announced_failure()
        if failure is not None and not failure.startswith(f"rank {me}:"):
            return f"rank {me}: stopped because {_failure_sentence(failure)}"
        limit = os.environ.get(TIMEOUT_ENV, "1800")
        return (f"rank {os.environ.get('RANK', '?')}: waiting for the other processes failed ({text.splitlines()[0]}); "
                f"another rank failed or is stuck (see its output; collectives wait {limit} s, "
                f"${TIMEOUT_ENV}); rerun the same command to resume from the last complete step")
    return None

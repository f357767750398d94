"""The llm-compressor side of a distributed GPTQ benchmark: peer_llmcompressor.py's GPTQ (same grid, block 128,
damp 0.01, static act-order, lm_head ignored) through llm-compressor's data-parallel distributed `oneshot`, set up
the way its guide docs/guides/big_models_and_distributed/distributed_oneshot.md and its example
examples/quantization_w4a16/llama3_ddp_example.py do it:

1. `compressed_tensors.offload.init_dist()` (one process per GPU, NCCL; on `--device cpu` a plain gloo
   `init_process_group`, since `init_dist` needs an accelerator);
2. the model is loaded inside `load_offloaded_model()` with `device_map="auto_offload"` (rank 0 reads the weights,
   the other ranks build it on the meta device and then share rank 0's copy; here rank 0 first saves the random
   model to a temporary folder so that there is something to load);
3. each rank calibrates on its own share of the token ids, split as `get_rank_partition` splits a dataset;
4. `oneshot`: each rank accumulates partial Hessians on its share, every Linear is then given to one rank (greedy
   bin packing by Hessian size), the partial Hessians are summed onto that rank (`dist.reduce`), it runs GPTQ, and
   the quantized weight, scale and zero point go back to the others (`dist.broadcast`, or shared CPU memory).

Launch with torchrun (one process per GPU), in llm-compressor's own environment:
  torchrun --nproc-per-node N eval/peer_llmcompressor_distributed.py --model llama2-7b-shape --ids IDS.pt \\
      --bits 4 --group-size 128
Only the oneshot call is timed (barriers on both sides). Rank 0 prints one JSON line on stdout; everything else
(logs, progress bars) goes to stderr.

`--device cpu` (gloo) is a smoke test, not a reference: llm-compressor broadcasts no weights for modules that run on
the CPU (`broadcast_qparams_and_cleanup(..., skip_cpu=True)` in llmcompressor/utils/dist.py), relying on the shared
CPU offload, with no barrier after a layer's GPTQ. A rank may then propagate a layer's activations before another
rank has written its share of that layer's quantized weights (or, once weights spill to disk, never sees them until
the end), so from the second layer on the CPU result can differ from a one-process run. On GPUs the broadcast keeps
every rank's copy current."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import LLAMA2_7B, random_llama  # noqa: E402
from peer_llmcompressor import save_weights  # noqa: E402

# a few-second smoke test on CPU
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 256}
SHAPES = {"llama2-7b-shape": LLAMA2_7B, "tiny": TINY}


def _word_level_tokenizer():
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))


def _init_distributed(device: str) -> None:
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        raise SystemExit("launch with torchrun --nproc-per-node N (or python -m torch.distributed.run)")
    if device == "cpu":
        # compressed_tensors' init_dist reads torch.accelerator.current_accelerator().type, which is None without
        # an accelerator; the rest of its distributed path (gloo collectives, shared-memory CPU offload) works on CPU
        dist.init_process_group(backend="gloo", init_method="env://")
        dist.barrier()
    else:
        from compressed_tensors.offload import init_dist

        init_dist()  # the guide's step 1: NCCL, one GPU per process (cuda:LOCAL_RANK)


def _shared_folder(tmpdir: str | None) -> str:
    """A scratch folder made by rank 0, its path sent to every rank (all ranks are on one host)."""
    box = [tempfile.mkdtemp(prefix="peer-llmc-dist-", dir=tmpdir) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _rank_share(num_samples: int) -> tuple[int, int]:
    """This rank's [start, end) of the calibration samples: the guide's get_rank_partition split."""
    from llmcompressor.datasets.utils import get_rank_partition

    bounds = get_rank_partition("ids", num_samples)  # "ids[start:end]"
    start, end = bounds[bounds.index("[") + 1:-1].split(":")
    return int(start), int(end)


def _weights_digest(model) -> float:
    """A number that differs between ranks if any rank holds other quantized weights or scales than rank 0."""
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for index, (name, tensor) in enumerate(sorted(model.state_dict().items())):
            if name.endswith((".weight", ".weight_scale", ".weight_zero_point")):
                total += (index + 1) * tensor.detach().double().abs().sum().cpu()
    return total.item()


def run(args) -> dict | None:
    _init_distributed(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = args.device != "cpu"

    from compressed_tensors.offload import load_offloaded_model
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    dtype = getattr(torch, args.dtype)
    work = _shared_folder(args.tmpdir)
    try:
        if args.model in SHAPES:  # rank 0 writes a random model for load_offloaded_model to read
            folder = os.path.join(work, "model")
            if rank == 0:
                model = random_llama(SHAPES[args.model], dtype, "cuda" if cuda else "cpu")
                model.save_pretrained(folder)
                del model
                if cuda:
                    torch.cuda.empty_cache()
            dist.barrier()
        else:
            folder = args.model
        # the guide's step 2: rank 0 loads, the others get its weights (shared CPU memory, or broadcast GPU replicas)
        extra = {} if args.max_cpu_memory is None else {"max_memory": {"cpu": int(args.max_cpu_memory * 2**30)}}
        with load_offloaded_model():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=args.device_map,
                                                         offload_folder=os.path.join(work, "offload"), **extra)
        model.eval()
        processor = PreTrainedTokenizerFast(tokenizer_object=_word_level_tokenizer())  # unused: ids are given

        # the guide's step 3: each rank calibrates on its own share of the samples
        ids = torch.load(args.ids)
        start, end = _rank_share(len(ids))
        if end <= start:
            raise SystemExit(f"rank {rank} got no calibration sample: {len(ids)} samples for {world} processes")
        rows = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids[start:end]]
        loader = torch.utils.data.DataLoader(rows, batch_size=1)  # llm-compressor's default calibration batch

        grid = {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": args.bits, "type": "int", "symmetric": True, "strategy": "group",
            "group_size": args.group_size}}}
        recipe = GPTQModifier(targets="Linear", ignore=["lm_head"], block_size=128, dampening_frac=0.01,
                              actorder="static", config_groups=grid)

        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        dist.barrier()
        begin = time.perf_counter()
        oneshot(model=model, dataset=loader, recipe=recipe, processor=processor,
                num_calibration_samples=len(rows), max_seq_length=ids.shape[1])
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        seconds = time.perf_counter() - begin
        peak = torch.cuda.max_memory_allocated() if cuda else None

        peaks = [None] * world
        dist.all_gather_object(peaks, peak)
        if args.check:  # every rank must end with the same quantized model
            digests = [None] * world
            dist.all_gather_object(digests, _weights_digest(model))
            if rank == 0:
                print(f"weight digests per rank: {digests}", file=sys.stderr)
            if len(set(digests)) != 1:  # every rank stops, none waits at a barrier
                raise SystemExit("ranks disagree on the quantized weights")
        if args.save_weights and rank == 0:
            save_weights(model, args.save_weights)
        dist.barrier()
    finally:
        if rank == 0:
            shutil.rmtree(work, ignore_errors=True)

    import llmcompressor

    result = {"tool": f"llm-compressor {llmcompressor.__version__} gptq distributed", "processes": world,
              "seconds": seconds, "peak_cuda_bytes_per_rank": peaks}
    dist.destroy_process_group()
    return result if rank == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="llama2-7b-shape, tiny, or a model folder")
    parser.add_argument("--ids", required=True, help="calibration token ids saved with torch.save [samples, seq_len]")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--device", default="cuda", help="cuda (NCCL, one GPU per process) or cpu (gloo)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device-map", default="auto_offload",
                        help="load_offloaded_model's device_map: auto_offload (the guide's choice for the sequential "
                             "pipeline: weights in CPU memory shared by the ranks, onloaded a layer at a time), "
                             "or cuda (rank 0 loads onto its GPU and broadcasts a replica to every GPU)")
    parser.add_argument("--max-cpu-memory", type=float,
                        help="GiB of (shared) CPU memory the loaded weights may take before spilling to disk; default: "
                             "load_offloaded_model's estimate, /dev/shm's size less 5 GB, capped by vm.max_map_count "
                             "times the mean tensor size (which sends a tiny model entirely to disk)")
    parser.add_argument("--tmpdir", help="where the random model and any disk offload are written (default: $TMPDIR)")
    parser.add_argument("--save-weights", help="rank 0 writes the quantized model's tensors here (safetensors)")
    parser.add_argument("--check", action="store_true", help="check that all ranks end with the same weights")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on a network

    # stdout carries only rank 0's JSON line: send everything else written to fd 1 (logs, C-level prints) to stderr
    sys.stdout.flush()
    stdout_fd = os.dup(1)
    os.dup2(2, 1)
    result = run(args)
    sys.stdout.flush()
    if result is not None:
        os.write(stdout_fd, (json.dumps(result) + "\n").encode())
    os.close(stdout_fd)


if __name__ == "__main__":
    main()

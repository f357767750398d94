"""AWQ's cost against GPTQ's, on SmolLM2-135M on the CPU, in float32 and bfloat16, with the perplexity of each result:

    python eval/bench_awq_cost.py --before b9a1950 --out eval/results/bench_awq_cost_smollm2_cpu.json

Variants, each from the same float weights and the same calibration token ids (wikitext2-valid):
  gptq          GPTQ W4 g64 sym act-order (damp 0.01): the yardstick;
  awq-before    AWQ W4 g64 (clip, 20 grid points) with compress/quantize/awq.py as it was at revision `--before`
                (loaded from git in place of today's module; the rest of the package is today's);
  awq-all       AWQ today, the search's block forwards on every calibration token (search_tokens: null): the same
                computation as before but a lone Linear's output error taken from XᵀX; its perplexity should match
                awq-before's up to noise;
  awq-quarter   AWQ today with search_tokens a quarter of the calibration set (2 of 8 sequences by default: 512
                tokens, far fewer than the default budget of 16384, which takes 1/16 of a 128 x 2048 set).
Each AWQ variant also records how many of its groups chose the scales awq-all chose (one α of the grid per group;
awq-before's where awq-all does not run, as in bfloat16 by default).
Seconds are wall time and the process's CPU time (the cores are shared with other work, so wall time is noisier);
the perplexity is WikiText-2 test's in 512-token windows.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wikitext_bench import WikitextBench, add_protocol_arguments  # noqa: E402

import compress  # noqa: E402
from compress.quantize import awq  # noqa: E402

GRID = dict(bits=4, group_size=64, sym=True)


def awq_at(revision: str):
    """compress/quantize/awq.py as it was at `revision`, loaded as a module beside today's."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "show", f"{revision}:compress/quantize/awq.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader(f"awq_at_{revision}", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    exec(compile(source, f"awq.py@{revision}", "exec"), module.__dict__)
    return module


def recording_scales(module, chosen: list) -> None:
    """Make `module`'s quantize_awq append each group's chosen scales to `chosen` as it folds them."""
    fold = module.fold_scales

    def recorded(layer, group, scales):
        chosen.append(scales.detach().float().clone())
        fold(layer, group, scales)

    module.fold_scales = recorded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_arguments(parser, samples=8, seq_len=256)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--variants", default="gptq,awq-before,awq-all,awq-quarter", help="in float32")
    parser.add_argument("--bf16-variants", default="gptq,awq-before,awq-quarter", help="in bfloat16")
    parser.add_argument("--before", default="b9a1950", help="the git revision whose awq.py is awq-before")
    parser.add_argument("--command", default="python eval/bench_awq_cost.py --before b9a1950 "
                                              "--out eval/results/bench_awq_cost_smollm2_cpu.json",
                        help="the command line to record with the results")
    args = parser.parse_args()

    bench = WikitextBench(args.model, args.samples, args.seq_len, args.ppl_tokens, args.out, command=args.command,
                          setting="W4 g64 sym; AWQ: clip, 20 grid points, duo scaling, block loss",
                          before=args.before)
    quarter = max(1, args.samples // 4) * args.seq_len
    fold = awq.fold_scales
    for dtype in args.dtypes.split(","):
        scales: dict[str, list[torch.Tensor]] = {}  # each AWQ variant's chosen scales, in folding order
        for name in (args.bf16_variants if dtype == "bfloat16" else args.variants).split(","):
            model = bench.fresh().to(getattr(torch, dtype))
            module = awq
            if name == "gptq":
                config = compress.GPTQ(**GRID, act_order=True, damp=0.01)
            elif name == "awq-before":
                config, module = compress.AWQ(**GRID), awq_at(args.before)
            else:
                config = compress.AWQ(**GRID, search_tokens=None if name == "awq-all" else quarter)
            if name != "gptq":
                recording_scales(module, scales.setdefault(name, []))
            wall, cpu = time.perf_counter(), time.process_time()
            if name == "gptq":
                compress.quantize(model, config, bench.ids, show_progress=False)
            else:
                module.quantize_awq(model, config, bench.ids, show_progress=False)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            awq.fold_scales = fold
            bench.record({"variant": name, "dtype": dtype, "config": config.describe(),
                          "search_tokens": config.search_tokens if name.startswith("awq-") and name != "awq-before"
                          else None,
                          "seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
                          "perplexity": bench.perplexity(model)})
            del model
        against = "awq-all" if "awq-all" in scales else "awq-before"
        reference = scales.get(against)
        for entry in bench.results["results"]:
            if reference and entry["dtype"] == dtype and entry["variant"] in scales:
                same = sum(torch.allclose(a, b, rtol=1e-3) for a, b in zip(scales[entry["variant"]], reference))
                entry[f"groups_with_{against}_scales"] = f"{same} of {len(reference)}"
        bench.write()


if __name__ == "__main__":
    main()

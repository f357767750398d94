"""report.json and report.md: one row per step (params, size on disk, metrics, wall time, peak memory) and the
evaluation protocol, so a reader can tell exactly how every number was produced."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from compress.checkpoint import write_json
from compress.recipe import Recipe

MIB = 2**20


def _row(record: dict) -> dict:
    ppl = record.get("metrics", {}).get("wikitext2", {}).get("perplexity")
    return {
        "step": record["step"],
        "kind": record["kind"],
        "config": record["config"],
        "summary": record.get("summary"),
        "params": record["params"],
        "size_bytes": record["size_bytes"],
        "wikitext2_perplexity": ppl,
        "seconds": record["seconds"],
        "eval_seconds": record["eval_seconds"],
        "peak_rss_bytes": record["peak_rss_bytes"],
        **({"peak_cuda_bytes": record["peak_cuda_bytes"]} if "peak_cuda_bytes" in record else {}),
    }


def _describe(row: dict) -> str:
    if row.get("summary"):
        return row["summary"]
    config = row["config"]
    if row["kind"] == "base":
        return f"base ({config['dtype']})"
    details = ", ".join(f"{k}={v}" for k, v in config.items())
    return f"{row['kind']} ({details})"


def build_report(recipe: Recipe, records: list[dict]) -> dict:
    rows = [_row(record) for record in records]
    protocols = {task: result["protocol"] for record in records
                 for task, result in record.get("metrics", {}).items()}
    return {
        "recipe": recipe.name,
        "model": recipe.model,
        "steps": rows,
        "protocol": protocols,
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "cpu_threads": torch.get_num_threads()},
    }


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def render_markdown(report: dict) -> str:
    base = report["steps"][0]
    lines = [
        f"# {report['recipe']}",
        "",
        f"Model: `{report['model']}`",
        "",
        "| step | what | params | size on disk | vs base | WikiText-2 ppl | step time | eval time | peak RSS |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["steps"]:
        lines.append(
            f"| {row['step']} | {_describe(row)} | {row['params'] / 1e6:,.1f} M | {row['size_bytes'] / MIB:,.1f} MiB "
            f"| {row['size_bytes'] / base['size_bytes']:.2f}x | {_fmt(row['wikitext2_perplexity'], '.3f')} "
            f"| {row['seconds']:.1f} s | {row['eval_seconds']:.1f} s | {row['peak_rss_bytes'] / MIB:,.0f} MiB |"
        )
    lines += ["", "## Evaluation protocol", ""]
    for task, p in report["protocol"].items():
        limit = f"the first {p['max_tokens']:,} tokens" if p["max_tokens"] else "the whole set"
        lines.append(
            f"- **{task}**: perplexity on `{p['dataset']}` ({limit}; {p['tokens_available']:,} tokens in the set), "
            f"windows of {p['seq_len']} tokens every {p['stride']} tokens, {p['tokens_scored']:,} tokens scored, "
            f"each with at least one token of context in its window."
        )
    if not report["protocol"]:
        lines.append("No evaluations were run (`eval.after: none`).")
    machine = report["machine"]
    lines += ["", f"Measured on {machine['cuda'] or 'CPU'} ({machine['cpu_threads']} threads), torch "
              f"{machine['torch']}, {machine['platform']}. Peak RSS is the process's resident-set high-water mark "
              f"during the step and its evals.", ""]
    return "\n".join(lines)


def write_report(out: Path, recipe: Recipe, records: list[dict]) -> dict:
    report = build_report(recipe, records)
    write_json(out / "report.json", report)
    (out / "report.md").write_text(render_markdown(report))
    return report

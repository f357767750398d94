"""report.json, report.md and tradeoff.png: one row per step (params, size on disk, every metric, wall time, peak
memory), each accuracy with its standard error and a paired test against the previous evaluated step, the plot of
size against every metric, and the evaluation protocol, so a reader can tell exactly how every number was produced.

Reports are made to be published: the model is named by its registry name, hub id or folder name, datasets by their
name and the sha256 of the file read, and no path of this machine appears (`local_paths`)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from compress.checkpoint import write_json
from compress.config.data import DATA_FILE_SUFFIXES
from compress.data import public_dataset_name
from compress.stats import mcnemar
from compress.tasks import task_for_split

MIB = 2**20
SIGNIFICANT = 0.05  # two-sided McNemar p-value below which a change between steps is called significant
TASK_TITLES = {"wikitext2": "WikiText-2 ppl", "rte": "RTE acc %", "politeness": "politeness acc %"}


def _paired_changes(records: list[dict]) -> dict[tuple[str, str], dict]:
    """(step, task) -> McNemar test of that step's per-row correctness against the previous step scored on the
    same rows."""
    changes, previous = {}, {}
    for record in records:
        for task, result in record.get("metrics", {}).items():
            if "correct" not in result:
                continue
            before = previous.get(task)
            if before is not None and len(before[1]) == len(result["correct"]):
                test = mcnemar([c == "1" for c in before[1]], [c == "1" for c in result["correct"]])
                changes[record["step"], task] = {"against": before[0], **test,
                                                 "delta": result["accuracy"] - before[2]}
            previous[task] = (record["step"], result["correct"], result["accuracy"])
    return changes


def _row(record: dict, changes: dict) -> dict:
    metrics = {}
    for task, result in record.get("metrics", {}).items():
        kept = {k: v for k, v in result.items() if k not in ("correct", "protocol")}
        if (record["step"], task) in changes:
            kept["vs_previous"] = changes[record["step"], task]
        metrics[task] = kept
    return {
        "step": record["step"],
        "kind": record["kind"],
        "config": record["config"],
        "summary": record.get("summary"),
        "params": record["params"],
        "size_bytes": record["size_bytes"],
        "wikitext2_perplexity": metrics.get("wikitext2", {}).get("perplexity"),
        "metrics": metrics,
        "seconds": record["seconds"],
        "eval_seconds": record["eval_seconds"],
        "peak_rss_bytes": record["peak_rss_bytes"],
        **({"peak_cuda_bytes": record["peak_cuda_bytes"]} if "peak_cuda_bytes" in record else {}),
        **({"most_sensitive": _most_sensitive(record["sensitivity"])} if record.get("sensitivity") else {}),
        **({key: record[key] for key in ("grids", "kept_by_budget") if key in record}),
        **({"speed": record["speed"]} if record.get("speed") else {}),
        **({"kv_cache": record["kv_cache"]} if record.get("kv_cache") else {}),
    }


SENSITIVE_SHOWN = 5


def _grid_lines(report: dict) -> list[str]:
    """Steps whose Linears lie on several grids (overrides, a `keep` budget): which Linears got which grid."""
    mixed = [row for row in report["steps"] if row.get("grids")]
    if not mixed:
        return []
    lines = ["", "## Mixed precision", "", "Each grid of a step, its Linears and their saved bytes; the Linears of "
                                           "the grid most of them share are all the others.", ""]
    for row in mixed:
        for grid, entry in row["grids"].items():
            size = f", {entry['bytes'] / MIB:,.2f} MiB" if entry.get("bytes") is not None else ""
            names = f": {', '.join(f'`{n}`' for n in entry['names'])}" if entry.get("names") else ""
            lines.append(f"- {row['step']}, {grid}: {entry['linears']} Linears{size}{names}")
        kept = row.get("kept_by_budget")
        if kept:
            errors = ", ".join(f"`{names}` {error:.4g}" for names, error in kept["kept"].items())
            seconds = f", {kept['probe_seconds']:g} s" if "probe_seconds" in kept else ""
            lines.append(f"- {row['step']}: kept at {kept['grid']} by the budget ({kept['budget']}; {kept['probe']}"
                         f"{seconds}): {errors}; the highest score not kept: {kept['highest_not_kept']:.4g} (a group "
                         f"of Linears that did not fit in what was left of the budget is passed over for smaller ones)")
    return lines


def _most_sensitive(sensitivity: dict[str, float]) -> dict[str, float]:
    """The Linears whose rounding changed their output most (step.json keeps them all)."""
    return dict(sorted(sensitivity.items(), key=lambda item: -item[1])[:SENSITIVE_SHOWN])


def _adaptation(records: list[dict]) -> dict[str, str]:
    """task -> the first step that trained on that task's own train split (the model is task-adapted from there)."""
    adapted = {}
    for record in records:
        for dataset in record.get("training_data", ()):
            found = task_for_split(dataset)
            if found and found[0] not in adapted:
                adapted[found[0]] = f"{record['step']} (trained on {dataset})"
    return adapted


def _final_against_earlier(records: list[dict]) -> list[dict]:
    """The last step against every earlier step scored on the same rows, per task (McNemar): what the whole chain
    after that step cost, e.g. the final model against the task-adapted one."""
    final = records[-1]
    rows = []
    for record in records[:-1]:
        for task, result in record.get("metrics", {}).items():
            last = final.get("metrics", {}).get(task, {})
            if "correct" in result and len(last.get("correct", "")) == len(result["correct"]):
                test = mcnemar([c == "1" for c in result["correct"]], [c == "1" for c in last["correct"]])
                rows.append({"step": record["step"], "task": task, "accuracy": result["accuracy"],
                             "final_accuracy": last["accuracy"], "delta": last["accuracy"] - result["accuracy"],
                             "kept": last["accuracy"] / result["accuracy"] if result["accuracy"] else None, **test})
    return rows


def _is_local_path(value: str) -> bool:
    path = Path(value).expanduser()
    return (value.startswith(("/", "~", "./", "../")) or path.suffix in (*DATA_FILE_SUFFIXES, ".gguf")
            or ("/" in value and path.exists()))


def local_paths(recipe: dict, out: Path | None = None) -> dict[str, str]:
    """Every local path a (resolved, JSON-dumped) recipe names — model folder or file, data files, teachers, data
    directory, output directory — in each form it may be written (as given, expanded, absolute), mapped to its own
    name: what a published file shows instead."""
    found: dict[str, str] = {}

    def add(value: str) -> None:
        path = Path(value).expanduser()
        name = path.resolve().name
        if not name:  # the root: no name to show, and "/" is in every path
            return
        for form in (value, str(path), str(path.absolute()), str(path.resolve())):
            found[form] = name

    def walk(node) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str) and _is_local_path(node):
            add(node)

    walk(recipe)
    if out is not None:
        add(str(out))
    return found


def without_local_paths(value, paths: dict[str, str]):
    """`value` (JSON-like: keys and strings) with every local path of `paths` replaced by its public name."""
    if isinstance(value, dict):
        return {without_local_paths(k, paths): without_local_paths(v, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [without_local_paths(v, paths) for v in value]
    if isinstance(value, str):
        for local in sorted(paths, key=len, reverse=True):  # longest first: a folder's files before the folder
            if local in value:
                value = value.replace(local, paths[local])
    return value


def _datasets(records: list[dict]) -> dict[str, str]:
    """Every dataset the run's steps and evaluations read -> the sha256 of its file."""
    read = {}
    for record in records:
        read.update((record.get("inputs") or {}).get("data") or {})
        read.update(record.get("eval_datasets") or {})
    return {public_dataset_name(name): digest for name, digest in sorted(read.items())}


def build_report(name: str, model: str, records: list[dict], paths: dict[str, str] | None = None) -> dict:
    """The report of a run: `model` is the model's public name; `paths` (local path -> public name, `local_paths`)
    are replaced wherever a step's config or protocol names them."""
    changes = _paired_changes(records)
    protocols = {task: result["protocol"] for record in records
                 for task, result in record.get("metrics", {}).items()}
    return without_local_paths({
        "recipe": name,
        "model": model,
        "model_identity": (records[0].get("inputs") or {}).get("model") if records else None,
        "datasets": _datasets(records),
        "steps": [_row(record, changes) for record in records],
        "protocol": protocols,
        "task_adapted_from": _adaptation(records),
        "final_against_earlier": _final_against_earlier(records) if len(records) > 1 else [],
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "cpu_threads": torch.get_num_threads()},
    }, paths or {})


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _describe(row: dict) -> str:
    if row.get("summary"):
        return row["summary"]
    config = row["config"]
    if row["kind"] == "base":
        return f"base ({config['dtype']})"
    details = ", ".join(f"{k}={v}" for k, v in config.items())
    return f"{row['kind']} ({details})"


def _metric_cell(result: dict | None) -> str:
    if result is None:
        return "—"
    if "perplexity" in result:
        return f"{result['perplexity']:.3f}"
    cell = f"{100 * result['accuracy']:.1f} ± {100 * result['stderr']:.1f}"
    change = result.get("vs_previous")
    if change:
        text = f"{100 * change['delta']:+.1f}, p {change['p_value']:.2g}"
        cell += f" ({'**' + text + '**' if change['p_value'] < SIGNIFICANT else text})"
    return cell


def _tasks(report: dict) -> list[str]:
    seen: list[str] = []
    for row in report["steps"]:
        seen += [task for task in row["metrics"] if task not in seen]
    return seen


def render_results(source: str, results: dict) -> str:
    """`compress eval`'s table: one row per task."""
    lines = [f"| {source} | result | per label (P / R / F1) | time |", "|---|---:|---|---:|"]
    for task, result in results.items():
        labels = result.get("per_label", {})
        per_label = ", ".join(f"{name} {v['precision']:.3f} / {v['recall']:.3f} / {v['f1']:.3f}"
                              for name, v in labels.items())
        value = _metric_cell(result) + ("" if "perplexity" in result else
                                        f" (majority {100 * result['majority_baseline']:.1f})")
        lines.append(f"| {TASK_TITLES.get(task, task)} | {value} | {per_label or '—'} | {result['seconds']:.0f} s |")
    return "\n".join(lines)


def _prefill_lengths(value) -> tuple[int, ...]:
    return (value,) if isinstance(value, int) else tuple(value)


def render_bench(result: dict) -> str:
    """A markdown table of a bench result ({"steps": [...], "protocol": {...}}), for the CLI and the report: one row
    per step, one column per prefill length and per decode batch size."""
    protocol = result["protocol"]
    lengths = _prefill_lengths(protocol["prefill_tokens"])
    lines = [f"Decode: {protocol['prompt_tokens']}-token prompt, {protocol['new_tokens']} new tokens, greedy; "
             f"prefill: one sequence; {protocol['device']}, {protocol['dtype']}, runtime {protocol['runtime']}"
             f"{', static cache + compiled decode step' if protocol['static_cache_compiled'] else ''}.", "",
             "| step | kernels | weights in memory | KV cache, 8k tokens | peak memory | "
             + " | ".join(f"prefill {n} ms" for n in lengths) + " | first token ms | "
             + " | ".join(f"decode b{b} tok/s" for b in protocol["batches"]) + " |",
             "|---|---|---:|---:|---:|" + "---:|" * (len(lengths) + 1 + len(protocol["batches"]))]
    for row in result["steps"]:
        kernels = ", ".join(f"{name} ×{count}" if count else name for name, count in row["kernels"].items())
        prefills = {p["tokens"]: p.get("ms", p.get("error")) for p in row.get("prefill", [])} or \
            {lengths[0]: row["prefill_ms"]}
        decode = {d["batch"]: d.get("decode_tokens_per_s", d.get("error")) for d in row["decode"]}
        first = row["time_to_first_token_ms"]
        cells = [_bench_cell(prefills.get(n)) for n in lengths] + ["" if first is None else f"{first:,.1f}"] + \
            [_bench_cell(decode.get(b)) for b in protocol["batches"]]
        kv = row.get("kv_cache")
        kv_cell = f"{kv['bytes_at_context'] / 2**20:,.1f} MiB ({kv['precision']})" if kv else ""
        lines.append(f"| {row['step']} | {kernels} | {row['weight_bytes'] / 2**20:,.1f} MiB | {kv_cell} | "
                     f"{row['peak_bytes'] / 2**20:,.1f} MiB | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _bench_cell(value) -> str:
    return "" if value is None else value if isinstance(value, str) else f"{value:,.1f}"


def render_markdown(report: dict, plot: str | None = None) -> str:
    base = report["steps"][0]
    tasks = _tasks(report)
    politeness = "politeness" in tasks
    lines = [f"# {report['recipe']}", "", f"Model: `{report['model']}`", ""]
    if tasks:
        header = ["step", "size on disk", *(TASK_TITLES.get(t, t) for t in tasks)]
        header += ["F1 polite", "F1 impolite"] if politeness else []
        lines += ["## Trade-off", "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        for row in report["steps"]:
            cells = [row["step"], f"{row['size_bytes'] / MIB:,.1f} MiB"]
            cells += [_metric_cell(row["metrics"].get(task)) for task in tasks]
            if politeness:
                labels = row["metrics"].get("politeness", {}).get("per_label")
                cells += [f"{labels[name]['f1']:.3f}" if labels else "—" for name in ("polite", "impolite")]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Accuracy is ± its standard error; in brackets, the change from the previous step scored on the "
                      f"same rows and the two-sided p-value of McNemar's exact test on per-row correctness (**bold**: "
                      f"p < {SIGNIFICANT}, a change larger than chance).", ""]
        if plot:
            lines += [f"![size against every metric, one point per step]({plot})", ""]
    gpu = any("peak_cuda_bytes" in row for row in report["steps"])
    lines += ["## Cost", "",
              "| step | what | KV cache | params | size on disk | vs base | step time | eval time | peak RSS |"
              + (" peak GPU memory (step) |" if gpu else ""),
              "|---|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else "")]
    for row in report["steps"]:
        lines.append(
            f"| {row['step']} | {_describe(row)} | {row.get('kv_cache', '—')} | {row['params'] / 1e6:,.1f} M "
            f"| {row['size_bytes'] / MIB:,.1f} MiB "
            f"| {row['size_bytes'] / base['size_bytes']:.2f}x | {row['seconds']:.1f} s | {row['eval_seconds']:.1f} s "
            f"| {row['peak_rss_bytes'] / MIB:,.0f} MiB |"
            + (f" {row.get('peak_cuda_bytes', 0) / 2**30:,.1f} GiB |" if gpu else ""))
    simulated = [row["step"] for row in report["steps"] if row["config"].get("grid") in ("nvfp4", "mxfp4")
                 and row["config"].get("activations") == "dynamic"]
    if simulated:
        lines += ["", f"W4A4 FP4 ({', '.join(simulated)}): simulated. The inputs are rounded onto the FP4 grid in "
                      "floating point (compress has no FP4 kernels, and only Blackwell GPUs have FP4 units): the "
                      "accuracy is the W4A4 model's, its speed is not measured."]
    timed = [{"step": row["step"], **row["speed"]} for row in report["steps"] if row.get("speed")]
    if timed:
        lines += ["", "## When it runs", "", "Each step folder loaded with the packed runtime (low-bit kernels where "
                  "the grid has one) and timed on the run's device.", "",
                  render_bench({"steps": timed, "protocol": timed[-1]["protocol"]}).rstrip()]
    if politeness:
        lines += ["", "## Politeness per label", "",
                  "| step | polite P | polite R | polite F1 | impolite P | impolite R | impolite F1 |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for row in report["steps"]:
            labels = row["metrics"].get("politeness", {}).get("per_label")
            if labels:
                cells = [f"{labels[n][m]:.3f}" for n in ("polite", "impolite") for m in ("precision", "recall", "f1")]
                lines.append(f"| {row['step']} | " + " | ".join(cells) + " |")
    against = report.get("final_against_earlier") or []
    if against:
        final = report["steps"][-1]["step"]
        lines += ["", f"## {final} against each earlier step", "",
                  "Accuracy of the final step against each earlier step on the same rows, the share of it kept, and "
                  "McNemar's exact p (bold below 0.05).", "",
                  "| step | task | its accuracy % | final % | change | kept | p |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for row in against:
            p = f"{row['p_value']:.2g}"
            lines.append(f"| {row['step']} | {row['task']} | {100 * row['accuracy']:.1f} "
                         f"| {100 * row['final_accuracy']:.1f} | {100 * row['delta']:+.1f} | "
                         f"{_fmt(row['kept'] and 100 * row['kept'], '.1f')} % | "
                         f"{f'**{p}**' if row['p_value'] < 0.05 else p} |")
    sensitive = [row for row in report["steps"] if row.get("most_sensitive")]
    if sensitive:
        lines += ["", "## Most sensitive Linears", "",
                  "Relative output error ‖(Q − W)X‖² / ‖WX‖² on the calibration inputs, highest first (every Linear's "
                  "is in the step's step.json); name them in the quantize step's `ignore` to keep them in full "
                  "precision.", ""]
        for row in sensitive:
            errors = ", ".join(f"`{name}` {error:.4f}" for name, error in row["most_sensitive"].items())
            lines.append(f"- {row['step']}: {errors}")
    lines += _grid_lines(report)
    lines += ["", "## Evaluation protocol", ""] + _protocol_lines(report)
    if report.get("datasets"):
        lines += ["", "Data read by the steps and the evaluations, with the sha256 of each file (its first 16 "
                      "digits; report.json has them whole): "
                  + ", ".join(f"`{name}` {digest[:16]}" for name, digest in report["datasets"].items()) + "."]
    machine = report["machine"]
    lines += ["", f"Measured on {machine['cuda'] or 'CPU'} ({machine['cpu_threads']} threads), torch "
              f"{machine['torch']}, {machine['platform']}. Peak RSS is the process's resident-set high-water mark "
              f"during the step and its evals.", ""]
    return "\n".join(lines)


def _protocol_lines(report: dict) -> list[str]:
    if not report["protocol"]:
        return ["No evaluations were run (`eval.after: none`)."]
    lines = []
    for task, p in report["protocol"].items():
        if "seq_len" in p:
            limit = f"the first {p['max_tokens']:,} tokens" if p["max_tokens"] else "the whole set"
            lines.append(
                f"- **{task}**: perplexity on `{p['dataset']}`{' from ' + p['source'] if p.get('source') else ''} "
                f"({limit}; {p['tokens_available']:,} tokens in the "
                f"set), windows of {p['seq_len']} tokens every {p['stride']} tokens, {p['tokens_scored']:,} tokens "
                f"scored, each with at least one token of context in its window.")
            continue
        rows = next(row["metrics"][task] for row in report["steps"] if task in row["metrics"])
        shots = f"{p['num_fewshot']}-shot (examples from `{p['fewshot_from']}`)" if p["num_fewshot"] else "zero-shot"
        adapted = report["task_adapted_from"].get(task)
        mode = (f"task-adapted from step {adapted} onward, the steps before it score the model as given"
                if adapted else "the model as given (not trained on this task)")
        limit = f", only the first {p['limit']} rows" if p["limit"] else ""
        lines.append(
            f"- **{task}** (lm-eval, {shots}): `{p['dataset']}` from {p['source']}, {rows['n']} rows{limit}; prompt "
            f"`{p['prompt']!r}`, answers {', '.join(map(repr, p['choices']))} for labels {', '.join(p['labels'])}; "
            f"prediction = {p['scoring']}. Majority class: {100 * rows['majority_baseline']:.1f} %. Scoring mode: "
            f"{mode}.{POLITENESS_LICENCE if task == 'politeness' else ''}")
    return lines


POLITENESS_LICENCE = (" Corpus: Danescu-Niculescu-Mizil et al., \"A computational approach to politeness with "
                      "application to social factors\", ACL 2013 (cite it); its files carry no licence statement, the "
                      "request texts are Wikipedia and Stack Exchange user content under CC BY-SA.")


def plot_tradeoff(report: dict, path: Path) -> bool:
    """Size on disk against every metric, one labelled point per step; False when there is nothing to plot."""
    tasks = _tasks(report)
    if not tasks:
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.8), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        rows = [row for row in report["steps"] if task in row["metrics"]]
        sizes = [row["size_bytes"] / MIB for row in rows]
        results = [row["metrics"][task] for row in rows]
        if task == "wikitext2":
            values = [r["perplexity"] for r in results]
            axis.plot(sizes, values, "o-", color="tab:red")
            axis.set_ylabel("perplexity (lower is better)")
        else:
            values = [100 * r["accuracy"] for r in results]
            axis.errorbar(sizes, values, yerr=[100 * r["stderr"] for r in results], fmt="o-", capsize=3)
            axis.axhline(100 * results[0]["majority_baseline"], ls="--", color="grey", lw=1, label="majority class")
            axis.set_ylabel("accuracy % (± standard error)")
            axis.legend(loc="best", fontsize=8)
        for i, (row, x, y) in enumerate(zip(rows, sizes, values)):  # alternate sides: steps of equal size overlap
            axis.annotate(row["step"], (x, y), textcoords="offset points", xytext=(5, 4 if i % 2 else -11),
                          fontsize=8)
        axis.set_title(TASK_TITLES.get(task, task))
        axis.set_xlabel("size on disk (MiB)")
        axis.grid(alpha=0.3)
    figure.suptitle(f"{report['recipe']}: size against quality, one point per step", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_report(out: Path, name: str, model: str, records: list[dict], paths: dict[str, str] | None = None) -> dict:
    report = build_report(name, model, records, paths)
    write_json(out / "report.json", report)
    plotted = plot_tradeoff(report, out / "tradeoff.png")
    (out / "report.md").write_text(render_markdown(report, "tradeoff.png" if plotted else None))
    return report

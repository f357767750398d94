"""The step loop: load the model, run each recipe step, evaluate, write each step folder atomically, and resume.

Step i's fingerprint hashes everything that made it: its config and seed, the identity of what it read (the input
weights' sha256s or hub commit, the sha256 of every dataset file, an outside teacher's weights) and step i-1's
fingerprint, so changing a step or its inputs invalidates it and every later step. A complete step (fingerprint
matches, every file's sha256 verifies) is skipped on rerun; a step that is redone says why, one line each. No algorithm
code lives here: each step kind maps to one verb of the package.

Under torchrun every rank runs this same loop on its own copy of the model (the verbs split their data between the
ranks, compress.distributed); rank 0 alone decides what is complete, writes and reports, and every rank hears its
decisions and failures."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from functools import lru_cache
from pathlib import Path

import torch
from rich.console import Console

from compress import __version__, distributed
from compress.checkpoint import (
    STEP_FILE,
    fingerprint,
    read_step,
    recorded_inputs,
    save_model,
    what_changed,
    write_json,
    write_step,
)
from compress.config import HubPush, WeightOnlyConfig
from compress.config.sources import STEP_FOLDER, STEP_FOLDER_NAME, step_folder_name
from compress.data import calibration_batches, dataset_digest
from compress.distill import check_same_tokenizer
from compress.errors import CompressError
from compress.evaluate import evaluate, headline
from compress.hub import STAGING, push
from compress.measure import measure
from compress.models import load_model, public_name, quantized_input, resolve_source, source_identity
from compress.modules import is_quantized, quantized_linears
from compress.quantize.grid import check_group_size
from compress.recipe import Recipe, load_recipe, resolved_yaml
from compress.report import local_paths, write_report
from compress.steps import spec_of, teacher_name
from compress.tasks import datasets_of_eval
from compress.training import training_examples


def _base_summary(recipe: Recipe) -> str:
    """The base row of the report; a checkpoint another tool quantized says how (compress.models.quantized_input)."""
    quantized = quantized_input(recipe.model)
    return f"base ({recipe.dtype})" + (f", from a quantized checkpoint: {quantized}" if quantized else "")


def _plan(recipe: Recipe, steps: list) -> list[dict]:
    """Each step's inputs, which its fingerprint hashes: the previous step's fingerprint, its kind, config and seed,
    and the identity of what it reads: the input weights for the base step, the content of each dataset, and a
    teacher from outside the run (`base` and earlier step folders are already in the chain)."""
    plans, previous = [], ""
    for kind, config in steps:
        config_dict = config if isinstance(config, dict) else config.model_dump(mode="json")
        inputs = {"previous": previous, "kind": kind, "config": config_dict, "seed": recipe.seed}
        if kind == "base":
            inputs["model"] = source_identity(recipe.model)
        else:
            read = spec_of(config).datasets_read(config)
            if read:
                inputs["data"] = {name: dataset_digest(name, recipe.data.dir) for name in read}
            teacher = teacher_name(config)
            if teacher is not None and teacher != "base" and not STEP_FOLDER_NAME.match(teacher):
                inputs["teacher"] = source_identity(teacher)
        previous = fingerprint(inputs)
        plans.append(inputs)
    return plans


def _eval_change(record: dict, eval_datasets: dict[str, str]) -> str:
    """Why a complete step's metrics are stale: the data its evaluations read, or their settings."""
    before = record.get("eval_datasets")
    changed = sorted(name for name in set(before or {}) | set(eval_datasets)
                     if (before or {}).get(name) != eval_datasets.get(name)) if before is not None else []
    return f"evaluation data changed ({', '.join(changed)})" if changed else "eval settings changed"


def _label(index: int, steps: list, name: str) -> str:
    return f"[{index}/{len(steps) - 1}] {name}"


def _redo_lines(out: Path, steps: list, plans: list[dict], first: int, why: str) -> list[str]:
    """One line for each existing step folder from `first` on, all of which are redone: why it is."""
    first_name = step_folder_name(first, steps[first][0])
    lines = []
    for index in range(first, len(steps)):
        folder = out / step_folder_name(index, steps[index][0])
        if not folder.is_dir():
            continue
        if index == first:
            lines.append(f"{_label(index, steps, folder.name)}: {why}; redoing it")
            continue
        try:
            own = what_changed(json.loads((folder / STEP_FILE).read_text()), plans[index])
        except (OSError, ValueError):
            own = [f"{STEP_FILE} is missing or unreadable"]
        reason = "; ".join(own) if own else f"it follows {first_name}, which is redone"
        lines.append(f"{_label(index, steps, folder.name)}: {reason}; redoing it")
    return lines


def _param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() skips tied duplicates


@lru_cache(maxsize=4)  # the preflight check and the step itself ask for the same windows: tokenize once
def _calibration_ids(tokenizer, spec, seed: int, data_dir: str | None) -> torch.Tensor:
    return calibration_batches(tokenizer, spec.dataset, spec.samples, spec.seq_len, seed, data_dir)


@lru_cache(maxsize=4)  # as _calibration_ids: the preflight check and the step build the same examples
def _training_examples(tokenizer, datasets: tuple[str, ...], seq_len: int, data_dir: str | None) -> list[dict]:
    return training_examples(tokenizer, datasets, seq_len, data_dir)


def _teacher_source(name: str, recipe: Recipe, out: Path) -> str:
    """A teacher named in a step: `base` (the recipe's model), an earlier step's folder (`01-prune`), or a source."""
    if name == "base":
        return recipe.model
    if STEP_FOLDER_NAME.match(name):
        if not (out / name / STEP_FILE).is_file():
            raise CompressError(f"teacher '{name}' is not a completed step folder in {out}; name an earlier step "
                                f"(e.g. 00-base), base, or a model source")
        return str(out / name)
    return name


def _data_inputs(config, tokenizer, recipe: Recipe) -> dict:
    """The data the step's spec says its verb reads: calibration ids, training rows (and the seed)."""
    spec = spec_of(config)
    inputs: dict = {}
    if spec.calibrates:
        inputs["calibration"] = _calibration_ids(tokenizer, config.calibration, recipe.seed, recipe.data.dir)
    if spec.trains:
        inputs["train_data"] = _training_examples(tokenizer, config.data, config.seq_len, recipe.data.dir)
        inputs["seed"] = recipe.seed
    return inputs


def _step_inputs(config, tokenizer, recipe: Recipe, out: Path, device: str) -> dict:
    """Everything the step's verb needs: its data and, when its spec distils, the teacher."""
    spec = spec_of(config)
    inputs = _data_inputs(config, tokenizer, recipe)
    if spec.teacher != "never":
        name = teacher_name(config)
        teacher = None
        if name is not None:
            teacher, teacher_tokenizer = load_model(_teacher_source(name, recipe, out), recipe.dtype, device)
            check_same_tokenizer(tokenizer, teacher_tokenizer)
        inputs["teacher"] = teacher
    return inputs


def _preflight(model, tokenizer, recipe: Recipe) -> None:
    """Check what can be checked before any long work starts: the model is float if a step needs it to be,
    calibration and training data are long enough, the first prune step fits the model, and group sizes divide the
    widths each quantize step will see (the base model's, and after a prune step also its width multiple)."""
    if is_quantized(model):
        needs_float = []
        for step in recipe.steps:  # until a dequantize step
            if step.spec.dequantizes:
                break
            if not step.spec.accepts_quantized:
                needs_float.append(step.spec.name)
        if needs_float:
            raise CompressError(f"{recipe.model} is a quantized checkpoint, and {', '.join(needs_float)} need a float "
                                f"model; start from the unquantized model, or put a `- dequantize: {{}}` step first "
                                f"(the weights keep their values, the grid is dropped)")
    for step in recipe.steps:  # enough data for each (cached: the step itself gets the same tensors)
        _data_inputs(step.config, tokenizer, recipe)
    pruned_to = None
    for step in recipe.steps:
        config, spec = step.config, step.spec
        if pruned_to is None:  # until a step changes the widths, the base model is what each step will see
            spec.check_model(model, config)
        if spec.prunes:
            pruned_to = config
        elif isinstance(config, WeightOnlyConfig) and config.group_size != -1:
            check_group_size(model, config.group_size)  # the hidden size and unpruned layers keep these widths
            if pruned_to is not None and pruned_to.multiple % config.group_size:
                raise CompressError(f"the prune step rounds widths to multiples of {pruned_to.multiple}, which "
                                    f"quantize group_size {config.group_size} does not divide; set prune "
                                    f"multiple: {config.group_size} (or a multiple of it)")


def _timed_running(folder: Path, record: dict, recipe: Recipe, device: str, console: Console, label: str) -> dict:
    """The step folder loaded with the packed runtime and timed (`eval.speed`); the result goes into its step.json."""
    from compress.bench import bench_folder

    with console.status(f"{label}: timing the saved model (packed runtime)"):
        speed = bench_folder(folder, recipe.eval.speed, recipe.dtype, device)
    for note in speed["notes"]:
        console.print(f"{label}: note: {note}")
    console.print(f"{label}: {speed['weight_bytes'] / 2**20:,.1f} MiB of weights in memory, "
                  f"{speed['decode_tokens_per_s']} tokens/s decoding at batch {recipe.eval.speed.batches[0]}")
    record = {**record, "speed": speed}
    write_json(folder / STEP_FILE, record)
    return record


def _remove_steps_from(out: Path, index: int) -> None:
    for stale in sorted(out.iterdir()):
        if stale.is_dir() and STEP_FOLDER.match(stale.name) and int(stale.name[:2]) >= index:
            shutil.rmtree(stale)


def _peak_memory(step_cost: dict, eval_cost: dict) -> dict:
    """The step's peak memory: this process's, or under several processes the largest rank's and each rank's."""
    peaks = {"peak_rss_bytes": max(step_cost["peak_rss_bytes"], eval_cost["peak_rss_bytes"])}
    if "peak_cuda_bytes" in step_cost:
        peaks["peak_cuda_bytes"] = step_cost["peak_cuda_bytes"]
    if distributed.active():
        per_rank = distributed.gather(peaks)
        peaks = {key: max(p[key] for p in per_rank) for key in peaks}
        peaks.update({f"{key}_per_rank": [p[key] for p in per_rank] for key in peaks}, processes=len(per_rank))
    return peaks


def _sensitivity(model) -> dict:
    """Each quantized Linear's relative output error on the calibration inputs, where the quantizer measured it."""
    errors = {name: quant.output_error for name, _, quant in quantized_linears(model) if quant.output_error is not None}
    return {"sensitivity": errors} if errors else {}


def _raised_damping(model) -> dict:
    """GPTQ's damp where it had to be raised above the configured one (a Hessian not positive definite), per Linear."""
    from compress.quantize.gptq import raised_damping

    raised = raised_damping(model)
    return {"gptq_raised_damp": raised} if raised else {}


def _code_digest() -> str:
    """A digest of this package's source files: ranks launched from different checkouts must not mix."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _check_ranks_agree(recipe: Recipe, out: Path) -> None:
    import transformers

    distributed.check_same_everywhere({
        "recipe": resolved_yaml(recipe), "output_dir": str(out.resolve()), "compress code": _code_digest(),
        "compress": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
    }, "the run")


def _silence_library_progress() -> None:
    """The libraries' own progress bars (transformers' loading, lm-eval's tokenizing) off on ranks other than 0."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    os.environ["TQDM_DISABLE"] = "1"  # tqdm >= 4.66 reads it for every bar created from now on


def _prepare_output(out: Path, recipe: Recipe, overwrite: bool) -> None:
    source = resolve_source(recipe.model)
    if source.kind == "dir":
        model_dir = Path(source.location).resolve()
        resolved = out.resolve()
        if resolved == model_dir or model_dir in resolved.parents or resolved in model_dir.parents:
            raise CompressError(f"output dir {out} overlaps the input model folder {source.location}; the input model "
                                f"is never written to: choose another --output-dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise CompressError(f"output dir {out} is not writable ({error.strerror or error}); choose a writable "
                            f"--output-dir")
    if overwrite:  # only what a run writes: never unrelated files in a user's folder
        for entry in out.iterdir():
            if entry.is_dir() and STEP_FOLDER.match(entry.name):
                shutil.rmtree(entry)
            elif entry.name in ("recipe.yaml", "report.json", "report.md", "tradeoff.png"):
                entry.unlink()
            elif entry.name == STAGING:
                shutil.rmtree(entry)


def _hub_settings(recipe: Recipe, push_to_hub: str | None, dry_run: bool) -> HubPush | None:
    """The recipe's `hub:` section, with --push-to-hub's repo id in place of its own."""
    if push_to_hub:
        return HubPush(**{**(recipe.hub.model_dump() if recipe.hub else {}), "repo_id": push_to_hub})
    if dry_run and recipe.hub is None:
        raise CompressError("--dry-run prepares a Hub upload: give --push-to-hub ORG/NAME or a hub: section in the "
                            "recipe")
    return recipe.hub


def run(recipe: Recipe | str | Path, output_dir: str | Path | None = None, overwrite: bool = False,
        console: Console | None = None, show_progress: bool = True, push_to_hub: str | None = None,
        dry_run: bool = False, data_dir: str | Path | None = None) -> dict:
    """Run (or resume) a recipe (a Recipe or a path to its YAML); returns the report also written to report.json.
    Then, with `push_to_hub` (a repo id) or the recipe's `hub:`, push a step folder with a model card; `dry_run`
    writes the upload (card and files) to RUN/hub-upload without sending it."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if data_dir is not None:  # --data-dir: in place of the recipe's data.dir
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"dir": str(data_dir)})})
    # inherited defaults (data dir, calibration sets) are filled in before anything is fingerprinted or written
    recipe = recipe.resolved()
    hub = _hub_settings(recipe, push_to_hub, dry_run)  # a bad repo id fails now, not after the run
    console = console or Console(stderr=True)
    out = Path(output_dir) if output_dir else recipe.resolved_output_dir
    device = recipe.resolved_device
    distributed.start(device)
    _check_ranks_agree(recipe, out)
    if not distributed.is_main():  # one voice: rank 0 prints and shows progress, every rank works
        console, show_progress = Console(stderr=True, quiet=True), False
        _silence_library_progress()

    def prepare():
        _prepare_output(out, recipe, overwrite)
        (out / "recipe.yaml").write_text(resolved_yaml(recipe))

    distributed.on_main(prepare, f"preparing {out}")

    steps = [("base", recipe.model_dump(mode="json", include={"model", "dtype"}))]
    steps += [(step.kind, step.config) for step in recipe.steps]
    eval_at = {"every_step": set(range(len(steps))), "last": {len(steps) - 1}, "none": set()}[recipe.eval.after]
    data_dir = recipe.data.dir
    # rank 0 hashes what every step reads (weights, data files; sha256s of large files are cached) and all follow
    plans, eval_datasets = distributed.on_main(
        lambda: (_plan(recipe, steps),
                 {name: dataset_digest(name, data_dir) for name in datasets_of_eval(recipe.eval)} if eval_at else {}),
        "fingerprinting the inputs")
    eval_fingerprint = fingerprint({**recipe.eval.model_dump(mode="json"), "datasets": eval_datasets})
    model_description = resolve_source(recipe.model).describe()

    def run_evals(model, tokenizer, index):
        if index not in eval_at:
            return {}
        return evaluate(model, tokenizer, recipe.eval.tasks, wikitext2=recipe.eval.wikitext2, choice=recipe.eval.choice,
                        data_dir=data_dir, show_progress=show_progress, seed=recipe.seed)

    processes = f" x {distributed.world_size()} processes" if distributed.active() else ""
    console.print(f"[bold]compress run[/] {recipe.name}: {len(steps)} steps on {device}{processes} -> {out}")
    model = tokenizer = None
    last_complete: Path | None = None
    records: list[dict] = []
    redo = False
    for index, (kind, config) in enumerate(steps):
        keyed_by = plans[index]  # what made the step: its fingerprint's inputs
        key, config_dict = fingerprint(keyed_by), keyed_by["config"]
        spec = None if kind == "base" else spec_of(config)
        folder = out / step_folder_name(index, kind)
        label = _label(index, steps, folder.name)
        if not redo:
            # rank 0 reads the folder and every rank follows its verdict: all agree on the first step to run
            record, why = distributed.on_main(lambda: read_step(folder, key, keyed_by), f"checking {folder}")
            if record is not None:
                if index in eval_at and record.get("eval_fingerprint") != eval_fingerprint:
                    console.print(f"{label}: complete; {_eval_change(record, eval_datasets)}, re-evaluating")
                    step_model, step_tokenizer = load_model(str(folder), recipe.dtype, device)
                    record.update(metrics=run_evals(step_model, step_tokenizer, index),
                                  eval_fingerprint=eval_fingerprint, eval_datasets=eval_datasets)
                    del step_model
                    distributed.on_main(lambda: write_json(folder / STEP_FILE, record), f"writing {folder}")
                    if recipe.eval.speed is not None:
                        record = distributed.on_main(
                            lambda: _timed_running(folder, record, recipe, device, console, label), f"timing {folder}")
                else:
                    console.print(f"{label}: complete, skipped (sha256 verified)")
                records.append(record)
                last_complete, model = folder, None  # any model in memory is now behind this step
                continue
            redo = True
            for line in distributed.on_main(lambda: _redo_lines(out, steps, plans, index, why), f"checking {out}"):
                console.print(line)
            distributed.on_main(lambda: _remove_steps_from(out, index), f"removing stale step folders in {out}")

        torch.manual_seed(recipe.seed)
        if model is None and kind != "base":
            console.print(f"{label}: loading the model from {last_complete}")
            model, tokenizer = load_model(str(last_complete), recipe.dtype, device)
        with measure() as step_cost:
            if kind == "base":
                console.print(f"{label}: loading {model_description}")
                model, tokenizer = load_model(recipe.model, recipe.dtype, device)
                _preflight(model, tokenizer, recipe)
            else:
                console.print(f"{label}: {config.describe()}")
                inputs = _step_inputs(config, tokenizer, recipe, out, device)
                ran_with = spec.run_config(model, config, inputs)
                model = spec.load_verb()(model, ran_with, **inputs, show_progress=show_progress)
                inputs.clear()  # the teacher, if any, is freed before the evals
        with measure() as eval_cost:
            metrics = run_evals(model, tokenizer, index)
        for task, result in metrics.items():
            console.print(f"{label}: {headline(task, result)}")
        record = {
            "step": folder.name, "kind": kind, "config": config_dict, "fingerprint": key, "inputs": recorded_inputs(keyed_by),
            "summary": _base_summary(recipe) if kind == "base" else config.describe(),
            "eval_fingerprint": eval_fingerprint, "params": _param_count(model), "metrics": metrics,
            **({"eval_datasets": eval_datasets} if index in eval_at else {}),
            "quantized": is_quantized(model), **_sensitivity(model), **_raised_damping(model), "save_format": "dense" if spec is None else spec.save_format(config),
            **({"training_data": list(config.data)} if spec is not None and spec.trains else {}),
            **({"ran_with": ran_with.model_dump(mode="json")} if spec is not None and ran_with != config else {}),
            "seconds": step_cost["seconds"], "eval_seconds": eval_cost["seconds"], **_peak_memory(step_cost, eval_cost),
            "compress_version": __version__, "torch_version": torch.__version__,
        }
        with console.status(f"{label}: saving"):
            # a dense step's model is saved as is; a quantized one in its spec's format (the default when the step
            # itself is dense: a quantized input model passed through)
            save_format = "compressed-tensors" if record["save_format"] == "dense" else record["save_format"]
            record = distributed.on_main(
                lambda: write_step(folder, lambda partial: save_model(model, tokenizer, partial, save_format), record),
                f"writing {folder}")
        if recipe.eval.speed is not None and index in eval_at:
            record = distributed.on_main(lambda: _timed_running(folder, record, recipe, device, console, label),
                                         f"timing {folder}")
        console.print(f"{label}: done in {step_cost['seconds']:.1f} s, {record['params'] / 1e6:,.1f} M parameters, "
                      f"saved {record['size_bytes'] / 2**20:,.1f} MiB")
        records.append(record)
        last_complete = folder

    public = local_paths(recipe.model_dump(mode="json"), out)  # local paths -> the names a published file shows
    report = distributed.on_main(lambda: write_report(out, recipe.name, public_name(recipe.model), records, public),
                                 f"writing the report in {out}")
    console.print(f"[bold green]done[/]: {out / 'report.md'}")
    if hub:
        with console.status(f"staging {hub.repo_id}" if dry_run else f"pushing to {hub.repo_id}"):
            pushed = distributed.on_main(lambda: push(out, hub, dry_run=dry_run), f"pushing to {hub.repo_id}")
        if dry_run:
            console.print(f"dry run: {len(pushed['files'])} files for {hub.repo_id} (step {pushed['step']}) staged in "
                          f"{pushed['staging']}, the model card is its README.md; nothing was sent")
        else:
            console.print(f"[bold green]pushed[/] step {pushed['step']} to {hub.repo_id}: {pushed['commit_url']}")
        report["hub"] = pushed
    return report


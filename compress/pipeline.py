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
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

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
from compress.config.sources import STEP_FOLDER, STEP_FOLDER_NAME, Base, step_folder_name
from compress.data import calibration_batches, dataset_digest
from compress.distill import check_same_tokenizer
from compress.errors import CompressError, StepConfigError
from compress.evaluate import evaluate, headline
from compress.hub import STAGING, push
from compress.measure import measure
from compress.models import load_model, public_name, resolve_source, source_identity
from compress.modules import is_quantized, quantized_linears
from compress.quantize.grid import check_group_size
from compress.quantize.kv_cache import centred_key_layers, kv_cache_precision, kv_quantized
from compress.quantize.mixed import grids_record
from compress.recipe import Recipe, load_recipe, locate, resolved_yaml
from compress.report import local_paths, write_report
from compress.steps import StepSpec, spec_of, teacher_name
from compress.tasks import datasets_of_eval
from compress.training import training_examples


@dataclass
class _Step:
    """One step of a run: its spec and config, its folder, and what made it (the inputs its fingerprint hashes)."""

    index: int
    spec: StepSpec
    config: Any
    folder: Path
    label: str
    made_of: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return fingerprint(self.made_of)


def _steps(recipe: Recipe, out: Path) -> list[_Step]:
    """The base step (the recipe's model, step 00) and the recipe's steps, as step objects."""
    configs = [Base(model=recipe.model, dtype=recipe.dtype)] + [step.config for step in recipe.steps]
    steps = []
    for index, config in enumerate(configs):
        spec = spec_of(config)
        folder = out / step_folder_name(index, spec.kind)
        steps.append(_Step(index, spec, config, folder, f"[{index}/{len(configs) - 1}] {folder.name}"))
    return steps


def _plan(recipe: Recipe, steps: list[_Step]) -> list[dict]:
    """Each step's inputs, which its fingerprint hashes: the previous step's fingerprint, its kind, config and seed,
    and the identity of what it reads: the input weights for the step that loads the model, the content of each
    dataset, and a teacher from outside the run (`base` and earlier step folders are already in the chain)."""
    plans, previous = [], ""
    for step in steps:
        spec, config = step.spec, step.config
        inputs = {"previous": previous, "kind": spec.kind, "config": config.model_dump(mode="json"),
                  "seed": recipe.seed}
        if spec.loads:
            inputs["model"] = source_identity(config.model)
        read = spec.datasets_read(config)
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


def _redo_lines(steps: list[_Step], first: int, why: str) -> list[str]:
    """One line for each existing step folder from `first` on, all of which are redone: why it is."""
    lines = []
    for step in steps[first:]:
        if not step.folder.is_dir():
            continue
        if step.index == first:
            lines.append(f"{step.label}: {why}; redoing it")
            continue
        try:
            own = what_changed(json.loads((step.folder / STEP_FILE).read_text()), step.made_of)
        except (OSError, ValueError):
            own = [f"{STEP_FILE} is missing or unreadable"]
        reason = "; ".join(own) if own else f"it follows {steps[first].folder.name}, which is redone"
        lines.append(f"{step.label}: {reason}; redoing it")
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
    changing = [step.spec.name for step in recipe.steps if not step.spec.needs_final_weights]
    if kv_quantized(model) and changing:
        raise CompressError(f"{recipe.model} runs a quantized KV cache whose scales were calibrated on its weights, "
                            f"which {', '.join(changing)} would change; start from the folder before its kv_cache "
                            f"step and put a kv_cache step last")
    for step in recipe.steps:  # enough data for each (cached: the step itself gets the same tensors)
        _data_inputs(step.config, tokenizer, recipe)
    pruned_to = None
    for position, step in enumerate(recipe.steps):
        config, spec = step.config, step.spec
        if pruned_to is None:  # until a step changes the widths, the base model is what each step will see
            try:
                spec.check_model(model, config)
            except StepConfigError as error:  # where in the recipe: the run names the file and line
                raise error.within(("steps", position, spec.kind)) from None
        if spec.prunes:
            pruned_to = config
        elif isinstance(config, WeightOnlyConfig) and config.group_size != -1:
            check_group_size(model, config.group_size)  # the hidden size and unpruned layers keep these widths
            if pruned_to is not None and pruned_to.multiple % config.group_size:
                raise CompressError(f"the prune step rounds widths to multiples of {pruned_to.multiple}, which "
                                    f"quantize group_size {config.group_size} does not divide; set prune "
                                    f"multiple: {config.group_size} (or a multiple of it)")


def _timed_running(step: _Step, record: dict, run: _Run) -> dict:
    """The step folder loaded with the packed runtime and timed (`eval.speed`); the result goes into its step.json."""
    from compress.bench import bench_folder

    speed_config = run.recipe.eval.speed
    with run.console.status(f"{step.label}: timing the saved model (packed runtime)"):
        speed = bench_folder(step.folder, speed_config, run.recipe.dtype, run.device)
    for note in speed["notes"]:
        run.console.print(f"{step.label}: note: {note}")
    run.console.print(f"{step.label}: {speed['weight_bytes'] / 2**20:,.1f} MiB of weights in memory, "
                      f"{speed['decode_tokens_per_s']} tokens/s decoding at batch {speed_config.batches[0]}")
    record = {**record, "speed": speed}
    write_json(step.folder / STEP_FILE, record)
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


@dataclass
class _Run:
    """What every step of one run shares: the recipe, where it writes, and its evaluations' settings."""

    recipe: Recipe
    out: Path
    device: str
    console: Console
    show_progress: bool
    eval_at: set[int]
    eval_datasets: dict[str, str]  # name -> sha256 of every dataset the evaluations read
    eval_fingerprint: str

    def evaluate(self, model, tokenizer, index: int) -> dict:
        if index not in self.eval_at:
            return {}
        settings = self.recipe.eval
        return evaluate(model, tokenizer, settings.tasks, wikitext2=settings.wikitext2, choice=settings.choice,
                        data_dir=self.recipe.data.dir, show_progress=self.show_progress, seed=self.recipe.seed)

    def timed(self, step: _Step, record: dict) -> dict:
        """The record with the saved model's speed, where the recipe asks for it (`eval.speed`) at this step."""
        if self.recipe.eval.speed is None or step.index not in self.eval_at:
            return record
        return distributed.on_main(lambda: _timed_running(step, record, self), f"timing {step.folder}")


def _resume(step: _Step, run: _Run) -> tuple[dict | None, str]:
    """A complete step's record (re-evaluated where its evaluations are stale), or None and why the step must run."""
    # rank 0 reads the folder and every rank follows its verdict: all agree on the first step to run
    record, why = distributed.on_main(lambda: read_step(step.folder, step.key, step.made_of), f"checking {step.folder}")
    if record is None:
        return None, why
    if step.index in run.eval_at and record.get("eval_fingerprint") != run.eval_fingerprint:
        run.console.print(f"{step.label}: complete; {_eval_change(record, run.eval_datasets)}, re-evaluating")
        step_model, step_tokenizer = load_model(str(step.folder), run.recipe.dtype, run.device)
        record.update(metrics=run.evaluate(step_model, step_tokenizer, step.index),
                      eval_fingerprint=run.eval_fingerprint, eval_datasets=run.eval_datasets)
        del step_model
        distributed.on_main(lambda: write_json(step.folder / STEP_FILE, record), f"writing {step.folder}")
        record = run.timed(step, record)
    else:
        run.console.print(f"{step.label}: complete, skipped (sha256 verified)")
    return record, why


def _redo_from(step: _Step, steps: list[_Step], why: str, run: _Run) -> None:
    """Say why each step folder from `step` on is redone, and remove them."""
    for line in distributed.on_main(lambda: _redo_lines(steps, step.index, why), f"checking {run.out}"):
        run.console.print(line)
    distributed.on_main(lambda: _remove_steps_from(run.out, step.index), f"removing stale step folders in {run.out}")


def _run_step(step: _Step, model, tokenizer, previous: Path | None, run: _Run):
    """Run one step on the model in memory (or the previous step's folder, loaded), evaluate it and write its folder;
    returns the model, its tokenizer and the step's record."""
    recipe, console, spec, config = run.recipe, run.console, step.spec, step.config
    torch.manual_seed(recipe.seed)
    if model is None and not spec.loads:
        console.print(f"{step.label}: loading the model from {previous}")
        model, tokenizer = load_model(str(previous), recipe.dtype, run.device)
    ran_with = config
    with measure() as step_cost:
        if spec.loads:
            console.print(f"{step.label}: loading {resolve_source(config.model).describe()}")
            model, tokenizer = spec.load_verb()(config.model, config.dtype, run.device)
            _preflight(model, tokenizer, recipe)
        else:
            console.print(f"{step.label}: {config.describe()}")
            inputs = _step_inputs(config, tokenizer, recipe, run.out, run.device)
            ran_with = spec.run_config(model, config, inputs)
            model = spec.load_verb()(model, ran_with, **inputs, show_progress=run.show_progress)
            inputs.clear()  # the teacher, if any, is freed before the evals
    with measure() as eval_cost:
        metrics = run.evaluate(model, tokenizer, step.index)
    for task, result in metrics.items():
        console.print(f"{step.label}: {headline(task, result)}")
    record = {
        "step": step.folder.name, "kind": spec.kind, "config": step.made_of["config"], "fingerprint": step.key,
        "inputs": recorded_inputs(step.made_of), "summary": spec.describe(config),
        "eval_fingerprint": run.eval_fingerprint, "params": _param_count(model), "metrics": metrics,
        **({"eval_datasets": run.eval_datasets} if step.index in run.eval_at else {}),
        "quantized": is_quantized(model), "kv_cache": kv_cache_precision(model), **centred_key_layers(model),
        **_sensitivity(model),
        **grids_record(model),
        **_raised_damping(model),
        "save_format": spec.save_format(config),
        **({"training_data": list(config.data)} if spec.trains else {}),
        **({"ran_with": ran_with.model_dump(mode="json")} if ran_with != config else {}),
        "seconds": step_cost["seconds"], "eval_seconds": eval_cost["seconds"], **_peak_memory(step_cost, eval_cost),
        "compress_version": __version__, "torch_version": torch.__version__,
    }
    with console.status(f"{step.label}: saving"):
        # a dense step's model is saved as is; a quantized one in its spec's format (the default when the step
        # itself is dense: a quantized input model passed through)
        save_format = "compressed-tensors" if record["save_format"] == "dense" else record["save_format"]
        record = distributed.on_main(
            lambda: write_step(step.folder, lambda partial: save_model(model, tokenizer, partial, save_format), record),
            f"writing {step.folder}")
    record = run.timed(step, record)
    console.print(f"{step.label}: done in {step_cost['seconds']:.1f} s, {record['params'] / 1e6:,.1f} M parameters, "
                  f"saved {record['size_bytes'] / 2**20:,.1f} MiB")
    return model, tokenizer, record


def _publish(run: _Run, records: list[dict], hub: HubPush | None, dry_run: bool) -> dict:
    """Write the report and, where asked, push a step folder to the Hub (or stage the upload)."""
    recipe, out, console = run.recipe, run.out, run.console
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


def run(recipe: Recipe | str | Path, output_dir: str | Path | None = None, overwrite: bool = False,
        console: Console | None = None, show_progress: bool = True, push_to_hub: str | None = None,
        dry_run: bool = False, data_dir: str | Path | None = None) -> dict:
    """Run (or resume) a recipe (a Recipe or a path to its YAML); returns the report also written to report.json.
    Then, with `push_to_hub` (a repo id) or the recipe's `hub:`, push a step folder with a model card; `dry_run`
    writes the upload (card and files) to RUN/hub-upload without sending it."""
    recipe_file = None if isinstance(recipe, Recipe) else recipe
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

    steps = _steps(recipe, out)
    eval_at = {"every_step": {step.index for step in steps}, "last": {steps[-1].index},
               "none": set()}[recipe.eval.after]
    # rank 0 hashes what every step reads (weights, data files; sha256s of large files are cached) and all follow
    plans, eval_datasets = distributed.on_main(
        lambda: (_plan(recipe, steps), {name: dataset_digest(name, recipe.data.dir)
                                        for name in datasets_of_eval(recipe.eval)} if eval_at else {}),
        "fingerprinting the inputs")
    for step, made_of in zip(steps, plans):
        step.made_of = made_of
    eval_fingerprint = fingerprint({**recipe.eval.model_dump(mode="json"), "datasets": eval_datasets})
    context = _Run(recipe, out, device, console, show_progress, eval_at, eval_datasets, eval_fingerprint)

    processes = f" x {distributed.world_size()} processes" if distributed.active() else ""
    console.print(f"[bold]compress run[/] {recipe.name}: {len(steps)} steps on {device}{processes} -> {out}")
    model = tokenizer = previous = None
    records: list[dict] = []
    redo = False
    for step in steps:
        if not redo:
            record, why = _resume(step, context)
            if record is not None:
                records.append(record)
                previous, model = step.folder, None  # any model in memory is now behind this step
                continue
            redo = True
            _redo_from(step, steps, why, context)
        try:
            model, tokenizer, record = _run_step(step, model, tokenizer, previous, context)
        except StepConfigError as error:
            where = locate(recipe_file, error.field) if recipe_file else ".".join(map(str, error.field))
            raise CompressError(f"{where}: {error.message}") from None
        records.append(record)
        previous = step.folder
    return _publish(context, records, hub, dry_run)

"""`compress` command line: parsing and printing only; the work is in compress.pipeline and friends."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from compress.config.sources import ARCHITECTURES
from compress.errors import CompressError, RecipeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prune, recover, quantize and evaluate causal LMs from one YAML recipe.")
console = Console(stderr=True, highlight=False)


def _error(line: str) -> None:
    console.print(f"[red]error:[/] {escape(line)}", soft_wrap=True)  # escaped: [a-z] in a message is not markup


def _fail(error: CompressError) -> None:
    from compress import distributed

    prefix = f"rank {distributed.rank()}: " if distributed.active() and not distributed.is_main() else ""
    for line in str(error).splitlines():
        _error(prefix + line)
    raise typer.Exit(2)


@app.command()
def validate(recipes: list[Path] = typer.Argument(..., help="recipe YAML files")) -> None:
    """Check recipes against the schema without loading any model."""
    from compress.recipe import load_recipe

    failed = False
    for path in recipes:
        try:
            recipe = load_recipe(path)
        except RecipeError as error:
            failed = True
            for line in error.lines:
                _error(line)
            continue
        console.print(f"[green]ok[/] {path}: {recipe.name}, {len(recipe.steps)} step(s)")
    if failed:
        raise typer.Exit(2)


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="recipe YAML file"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="default: the recipe's output_dir"),
    overwrite: bool = typer.Option(False, "--overwrite", help="discard earlier step folders and start over"),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", metavar="ORG/NAME",
                                              help="then upload a step folder with a model card (recipe: hub:)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="with --push-to-hub: write the card and the files to "
                                                          "RUN/hub-upload, send nothing"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="the data directory (instead of the recipe's "
                                                                     "data.dir, $COMPRESS_DATA_DIR, ../shared/data)"),
) -> None:
    """Run a recipe; a rerun skips the steps that are complete and unchanged."""
    from pydantic import ValidationError

    from compress.distributed import failures_reach_every_rank
    from compress.pipeline import run as run_recipe

    try:
        with failures_reach_every_rank():  # under torchrun the other ranks stop at once, with this rank's error
            run_recipe(recipe, output_dir=output_dir, overwrite=overwrite, console=console, push_to_hub=push_to_hub,
                       dry_run=dry_run, data_dir=data_dir)
    except ValidationError as error:  # --push-to-hub's repo id
        _fail(CompressError(f"--push-to-hub: {error.errors()[0]['msg'].removeprefix('Value error, ')}"))
    except CompressError as error:
        _fail(error)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: completed steps are kept; rerun the same command to continue")
        raise typer.Exit(130)
    except Exception as error:  # under torchrun: a collective that timed out or lost a rank, named as such
        from compress.distributed import describe_failure

        line = describe_failure(error)
        if line is None:
            raise
        _error(line)
        raise typer.Exit(1)


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="a step folder (runs/NAME/03-quantize) or any model source"),
    tasks: str = typer.Option("wikitext2,rte,politeness", "--tasks",
                              help="comma-separated: wikitext2, rte, politeness"),
    num_fewshot: int = typer.Option(0, "--num-fewshot", min=0, help="train-split examples before each question"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="score only the first N rows of rte/politeness"),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="sequences per forward pass"),
    max_tokens: Optional[int] = typer.Option(None, "--wikitext2-max-tokens", min=2,
                                             help="score only the first N WikiText-2 test tokens (default: all)"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bfloat16 on a GPU, float32 on a CPU), float32, "
                              "bfloat16 or float16"),
    device: str = typer.Option("auto", "--device", help="auto = cuda when available"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="default: $COMPRESS_DATA_DIR, ../shared/data"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write every result (per-row correctness "
                                                                 "included) to this file"),
) -> None:
    """Evaluate a model folder: WikiText-2 perplexity and RTE / politeness accuracy (per-label P/R/F1)."""
    from rich.markdown import Markdown

    from compress.checkpoint import write_json
    from compress.evaluate import Perplexity, evaluate_source
    from compress.report import render_results
    from compress.tasks import ChoiceEval

    try:
        results = evaluate_source(model, [t.strip() for t in tasks.split(",") if t.strip()],
                                  wikitext2=Perplexity(max_tokens=max_tokens),
                                  choice=ChoiceEval(num_fewshot=num_fewshot, limit=limit, batch_size=batch_size),
                                  dtype=dtype, device=device, data_dir=data_dir)
    except CompressError as error:
        _fail(error)
    Console().print(Markdown(render_results(model, results)))
    if json_out:
        write_json(json_out, results)


@app.command("bench")
def bench_(
    path: Path = typer.Argument(..., help="a model folder, or a run folder (every complete step folder in it)"),
    batch: Optional[str] = typer.Option(None, "--batch", help="comma-separated batch sizes for decoding "
                                         "[default: 1,16,64 on a GPU, 1,16 on a CPU]"),
    prompt: int = typer.Option(128, "--prompt", min=1, help="prompt tokens before decoding"),
    new: int = typer.Option(128, "--new", min=2, help="tokens decoded greedily"),
    prefill: Optional[str] = typer.Option(None, "--prefill", help="comma-separated lengths of the one-sequence "
                                          "prefills timed [default: 512,2048,8192 on a GPU, 512 on a CPU]"),
    repeats: int = typer.Option(3, "--repeats", min=1, help="timed runs per figure (median), after a warm-up"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="static KV cache and a compiled "
                                           "decode step [default: on a GPU, not on a CPU]"),
    runtime: str = typer.Option("packed", "--runtime", help="packed (low-bit kernels) or dequantized"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bfloat16 on a GPU, float32 on a CPU), float32, "
                              "bfloat16 or float16"),
    device: str = typer.Option("auto", "--device", help="auto = cuda when available"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write every figure to this file"),
) -> None:
    """Speed and memory when the model runs: decode tokens/s, prefill, first token, weight bytes, peak memory."""
    from rich.markdown import Markdown

    from compress.bench import bench
    from compress.checkpoint import write_json
    from compress.report import render_bench

    def positive_integers(option: str, text: Optional[str]) -> tuple[int, ...]:
        try:
            values = tuple(int(b) for b in (text or "").split(",") if b.strip())
            if text is not None and (not values or min(values) < 1):
                raise ValueError
        except ValueError:
            _fail(CompressError(f"{option}: expected comma-separated positive integers, got '{text}'"))
        return values

    batches, prefills = positive_integers("--batch", batch), positive_integers("--prefill", prefill)
    try:
        result = bench(path, batches, prompt, new, prefills, repeats, compile, runtime, dtype, device)
    except CompressError as error:
        _fail(error)
    Console().print(Markdown(render_bench(result)))
    for row in result["steps"]:
        for note in row["notes"]:
            console.print(f"[yellow]note[/] {row['step']}: {note}")
    if json_out:
        write_json(json_out, result)


data_app = typer.Typer(no_args_is_help=True, help="Named datasets: where each comes from, and fetching them ahead.")
app.add_typer(data_app, name="data")


@data_app.command("list")
def data_list(data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="default: $COMPRESS_DATA_DIR, "
                                                                                 "../shared/data")) -> None:
    """Each named dataset, its public source, and where it is read from now (data dir, cache, or not fetched)."""
    from rich.table import Table

    from compress.config.data import DATASETS
    from compress.fetch import source_description, status

    table = Table("dataset", "public source", "read from")
    for name in DATASETS:
        where, path = status(name, data_dir)
        table.add_row(name, source_description(name), f"{where}: {path}" if path else where)
    Console().print(table)


@data_app.command("fetch")
def data_fetch(
    names: Optional[list[str]] = typer.Argument(None, help="named datasets (default: all, or a recipe's)"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="fetch what this recipe reads"),
) -> None:
    """Download named datasets into the cache ($COMPRESS_CACHE/data), so later runs need no network."""
    from compress.config.data import DATASETS
    from compress.fetch import fetch, status

    try:
        wanted = list(names or [])
        if recipe is not None:
            from compress.recipe import load_recipe
            from compress.tasks import datasets_of_recipe

            wanted += datasets_of_recipe(load_recipe(recipe))
        for name in wanted or list(DATASETS):
            where, path = status(name) if name in DATASETS else ("", None)
            if where == "data dir":
                console.print(f"{name}: in the data directory ({path}), nothing to fetch")
                continue
            with console.status(f"fetching {name}"):
                path = fetch(name)
            console.print(f"[green]ok[/] {name}: {path}")
    except CompressError as error:
        _fail(error)


@app.command()
def estimate(
    source: str = typer.Argument(..., help="hub id, registry name, folder, .gguf file, or a named architecture "
                                           "(" + ", ".join(ARCHITECTURES) + ")"),
    context: int = typer.Option(2048, "--context", min=1, help="tokens per sequence at inference"),
    batch: int = typer.Option(1, "--batch", min=1, help="sequences decoded together"),
    dtype: str = typer.Option("bfloat16", "--dtype", help="precision of what is not quantized, and of training"),
    group_size: int = typer.Option(128, "--group-size", min=1, help="int formats: weights per scale"),
    ratios: str = typer.Option("0.25,0.5", "--ratios", help="comma-separated pruning ratios ('' for none)"),
    train_batch: int = typer.Option(8, "--train-batch", min=1),
    train_seq_len: int = typer.Option(256, "--train-seq-len", min=8),
    lora_r: int = typer.Option(8, "--lora-r", min=1),
    kv_cache: str = typer.Option("auto", "--kv-cache", help="KV cache precision counted: fp8, dtype, or auto "
                                 "(fp8 where the model's config has a kv_cache_scheme)"),
    gpu_gib: Optional[float] = typer.Option(None, "--gpu-gib", help="mark what fits in this much memory"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write every figure (bytes) to this file"),
) -> None:
    """Memory and disk per precision and pruning ratio, for inference and training, from the config alone."""
    from pydantic import ValidationError
    from rich.markdown import Markdown

    from compress.checkpoint import write_json
    from compress.estimate import EstimateConfig, render_estimate
    from compress.estimate import estimate as estimate_source

    try:
        config = EstimateConfig(context=context, batch=batch, dtype=dtype, group_size=group_size,
                                ratios=ratios,
                                train_batch=train_batch, train_seq_len=train_seq_len, lora_r=lora_r, kv_cache=kv_cache)
        result = estimate_source(source, config)
    except ValidationError as error:
        _fail(CompressError("; ".join(f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']} (got {e['input']!r})"
                                      for e in error.errors())))
    except CompressError as error:
        _fail(error)
    Console().print(Markdown(render_estimate(result, gpu_gib)))
    if json_out:
        write_json(json_out, result)


if __name__ == "__main__":
    app()

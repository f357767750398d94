"""`compress` command line: parsing and printing only; the work is in compress.pipeline and friends."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from compress.errors import CompressError, RecipeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prune, recover, quantize and evaluate causal LMs from one YAML recipe.")
console = Console(stderr=True, highlight=False)


def _fail(error: CompressError) -> None:
    for line in str(error).splitlines():
        console.print(f"[red]error:[/] {line}", soft_wrap=True)
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
                console.print(f"[red]error:[/] {line}", soft_wrap=True)
            continue
        console.print(f"[green]ok[/] {path}: {recipe.name}, {len(recipe.steps)} step(s)")
    if failed:
        raise typer.Exit(2)


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="recipe YAML file"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="default: the recipe's output_dir"),
    overwrite: bool = typer.Option(False, "--overwrite", help="discard earlier step folders and start over"),
) -> None:
    """Run a recipe; a rerun skips the steps that are complete and unchanged."""
    from compress.pipeline import run as run_recipe

    try:
        run_recipe(recipe, output_dir=output_dir, overwrite=overwrite, console=console)
    except CompressError as error:
        _fail(error)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: completed steps are kept; rerun the same command to continue")
        raise typer.Exit(130)


if __name__ == "__main__":
    app()

"""`push(run_dir, HubPush(repo_id=...))`: upload one step folder of a run to the Hugging Face Hub with a model card
(base model and its license, the recipe, the trade-off table and plot, the eval protocol, how to load it).

The upload is staged first as hard links in `RUN/hub-upload/` (no copy of the weights): that folder is exactly what
the Hub receives, and all that `--dry-run` writes. The token comes from huggingface_hub (HF_TOKEN, else the saved
`hf auth login`) and is only ever handed to huggingface_hub: never printed, never written to the card or the run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from compress.checkpoint import STEP_FILE, folder_files
from compress.config.hub import HubPush
from compress.config.sources import ARCHITECTURES, HUB_ID, REGISTRY, STEP_FOLDER_NAME
from compress.errors import CompressError
from compress.widths import LAYER_WIDTHS_KEY

STAGING = "hub-upload"
PROJECT_URL = "https://pypi.org/project/compress-llm/"

__all__ = ["STAGING", "HubPush", "push"]


def base_model(model: str | dict) -> tuple[str | None, str | None]:
    """(hub id, license) of a recipe's model, where known: a hub id, a registry name, or a named architecture's."""
    if not isinstance(model, str):
        return None, None  # random weights: there is no base model
    licenses = {entry.hub_id: entry.license for entry in ARCHITECTURES.values()}
    hub_id = REGISTRY[model].hub_id if model in REGISTRY else model if HUB_ID.match(model) else None
    return hub_id, licenses.get(hub_id)


def _how_to_load(repo_id: str, config: dict) -> list[str]:
    quantized = "quantization_config" in config
    if LAYER_WIDTHS_KEY in config:  # per-layer widths: stock loaders build every layer at one size
        return ["Its layers were pruned to different widths, which stock transformers and vLLM cannot build; load it "
                "with compress (`pip install compress-llm`):", "", "```python", "import compress",
                f'model, tokenizer = compress.load("{repo_id}")  # a plain transformers model', "```"]
    lines = [f"Stock transformers{' with `compressed-tensors` installed' if quantized else ''}:", "", "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer",
             f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
             f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")', "```", "", "vLLM:", "", "```bash",
             f"vllm serve {repo_id}", "```"]
    return lines


def model_card(run_dir: Path, step: str, repo_id: str) -> str:
    """The README.md of the pushed repo: metadata, what was done, the report's tables, the recipe, how to load."""
    from huggingface_hub import ModelCard, ModelCardData

    from compress.report import render_markdown

    try:
        report = json.loads((run_dir / "report.json").read_text())
    except (OSError, ValueError):
        raise CompressError(f"{run_dir} has no readable report.json: rerun the recipe to finish the run (complete "
                            f"steps are skipped), then push") from None
    row = next((r for r in report["steps"] if r["step"] == step), None)
    if row is None:
        raise CompressError(f"step {step} is not in the run's report.json, which is older than the step folder: rerun "
                            f"the recipe to rewrite the report (complete steps are skipped), then push")
    recipe_text = public_recipe(run_dir)
    recipe = yaml.safe_load(recipe_text)
    hub_id, license_name = base_model(recipe["model"])
    config = json.loads((run_dir / step / "config.json").read_text())
    chain = " → ".join(r.get("summary") or r["kind"] for r in report["steps"][1:int(step[:2]) + 1])
    tags = ["compress", *sorted({r["kind"] for r in report["steps"][1:int(step[:2]) + 1]})]
    if "quantization_config" in config:
        tags.append("compressed-tensors")
    data = ModelCardData(base_model=hub_id, license=license_name or ("other" if hub_id else None),
                         library_name="transformers", pipeline_tag="text-generation", tags=tags)
    origin = f"[{hub_id}](https://huggingface.co/{hub_id})" if hub_id else f"`{report['model']}`"
    body = render_markdown(report, plot="tradeoff.png" if (run_dir / "tradeoff.png").is_file() else None)
    body = body.split("\n", 4)[4]  # drop the report's own title and model lines
    lines = [f"# {repo_id.split('/')[-1]}", "",
             f"{origin}, compressed by [compress]({PROJECT_URL}) with the recipe `{report['recipe']}`: {chain}. "
             f"This repo holds step `{step}`: {row['params'] / 1e6:,.1f} M parameters, "
             f"{row['size_bytes'] / 2**20:,.1f} MiB on disk.", "",
             "## License", "",
             (f"The weights derive from {origin} and carry its license ({license_name}); read and accept it there "
              f"before use." if license_name else f"The weights derive from {origin}; its license applies."
              if hub_id else "Random weights (a dry run): not a usable model."), "",
             "## How to load", "", *_how_to_load(repo_id, config), "", body.strip(), "",
             "## Recipe", "", "The recipe as run, every default filled in (`recipe.yaml` in this repo):", "",
             "```yaml", recipe_text.strip(), "```", ""]
    return str(ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines)))


def public_recipe(run_dir: Path) -> str:
    """The run's recipe.yaml with nothing of this machine: no data directory or output directory (resolved at run
    time), and the model, data files and teachers named by their own names instead of their paths."""
    from compress.report import local_paths, without_local_paths

    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    paths = local_paths(recipe, run_dir)
    if (recipe.get("data") or {}).get("dir"):
        recipe["data"]["dir"] = None
    recipe["output_dir"] = None  # the default, runs/NAME
    return yaml.safe_dump(without_local_paths(recipe, paths), sort_keys=False)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(source, target)


def stage(run_dir: Path, hub: HubPush) -> tuple[str, Path, list[str]]:
    """Write RUN/hub-upload: the step folder's files (hard links), README.md (the card), recipe.yaml, report.md,
    tradeoff.png. Returns the step, the folder and its file list."""
    steps = sorted(p.name for p in run_dir.iterdir() if p.is_dir() and STEP_FOLDER_NAME.match(p.name)
                   and (p / STEP_FILE).is_file())
    step = steps[-1] if hub.step == "last" and steps else hub.step
    if step not in steps:
        raise CompressError(f"hub step '{hub.step}' is not a completed step folder in {run_dir}; completed: "
                            f"{', '.join(steps) or 'none'} (or use step: last)")
    card = model_card(run_dir, step, hub.repo_id)  # first: a run it cannot describe stages nothing
    staging = run_dir / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for path in folder_files(run_dir / step):
        if path.name != STEP_FILE:  # local provenance (absolute paths, sha256s); the card carries the results
            target = staging / path.relative_to(run_dir / step)
            target.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(path, target)
    for name in ("report.md", "tradeoff.png"):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, staging / name)
    (staging / "recipe.yaml").write_text(public_recipe(run_dir))
    (staging / "README.md").write_text(card)
    files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
    return step, staging, files


def push(run_dir: str | Path, hub: HubPush, dry_run: bool = False, endpoint: str | None = None) -> dict:
    """Stage the upload and (unless `dry_run`) send it as one commit; returns {"repo_id", "step", "files",
    "staging", "commit_url" (None on a dry run)}. `endpoint`: another Hub (default: huggingface_hub's, HF_ENDPOINT)."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    run_dir = Path(run_dir)
    step, staging, files = stage(run_dir, hub)
    result = {"repo_id": hub.repo_id, "step": step, "files": files, "staging": str(staging), "commit_url": None}
    if dry_run:
        return result
    if get_token() is None:
        raise CompressError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then rerun the same "
                            f"command (the run is complete; only the upload remains). The upload is staged in "
                            f"{staging}")
    api = HfApi(endpoint=endpoint)
    try:
        api.create_repo(hub.repo_id, private=hub.private, exist_ok=True)
        commit = api.upload_folder(repo_id=hub.repo_id, folder_path=staging,
                                   commit_message=f"compress: {run_dir.name}, step {step}")
    except (HfHubHTTPError, HfHubHTTPError.__bases__[0], OSError) as error:  # [0]: its HTTP library's base error
        raise CompressError(f"upload to {hub.repo_id} failed: {str(error).splitlines()[0]}; the upload is staged in "
                            f"{staging}; rerun to retry")
    result["commit_url"] = commit.commit_url
    return result

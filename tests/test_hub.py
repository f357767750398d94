"""Hub push against a stand-in Hub on 127.0.0.1 (tests/hub_standin.py): the files, the commit, the model card, the
token only in the Authorization header; --dry-run; the errors a user meets (no token, bad repo id, Hub down)."""

from __future__ import annotations

import json

import pytest
import yaml
from huggingface_hub import constants
from typer.testing import CliRunner

import compress
from compress.cli import app
from compress.errors import CompressError
from compress.hub import HubPush, base_model, model_card, push
from hub_standin import StandInHub

TOKEN = "hf_standinTOKENnotforlogs42"


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with StandInHub() as standin:
        monkeypatch.setattr(constants, "ENDPOINT", standin.url)  # HfApi() reads it when built
        yield standin


@pytest.fixture
def run_dir(tiny_recipe, tmp_path):
    compress.run(tiny_recipe(), show_progress=False)
    return tmp_path / "runs" / "tiny"


def _everything_written(folder) -> str:
    return "".join(path.read_bytes().decode(errors="replace") for path in folder.rglob("*") if path.is_file())


def test_push_sends_the_step_folder_and_its_card_in_one_commit(hub, run_dir):
    pushed = push(run_dir, HubPush(repo_id="my-org/tiny-rtn4"))
    repo = hub.repos["my-org/tiny-rtn4"]
    assert repo["private"] is True and len(repo["commits"]) == 1
    commit = repo["commits"][0]
    assert commit["message"] == "compress: tiny, step 01-quantize"
    step_files = {p.name for p in (run_dir / "01-quantize").iterdir()} - {"step.json"}
    assert set(commit["files"]) == step_files | {"README.md", "recipe.yaml", "report.md", "tradeoff.png"}
    assert set(commit["files"]) == set(pushed["files"])
    assert commit["files"]["model.safetensors"] == (run_dir / "01-quantize" / "model.safetensors").read_bytes()
    assert pushed["commit_url"].startswith(hub.url)

    card = commit["files"]["README.md"].decode()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "transformers" and "compressed-tensors" in metadata["tags"]
    assert "| 01-quantize |" in card and "![size against every metric" in card  # trade-off table and plot
    assert "## Evaluation protocol" in card and "perplexity on `wikitext2-test`" in card
    assert 'AutoModelForCausalLM.from_pretrained("my-org/tiny-rtn4")' in card and "vllm serve my-org/tiny-rtn4" in card
    assert "- quantize:" in card or "quantize:" in card.split("## Recipe")[1]

    # the token travels only in the Authorization header: no body, no card, no file of the run holds it
    assert all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in hub.requests
               if r["path"].startswith(("/api/repos", "/api/models")))
    assert not any(TOKEN.encode() in r["body"] or TOKEN in r["path"] for r in hub.requests)
    assert TOKEN not in _everything_written(run_dir)


def test_card_names_the_base_model_and_its_license(run_dir):
    assert base_model("smollm2-135m") == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")
    assert base_model("meta-llama/Llama-2-7b-hf") == ("meta-llama/Llama-2-7b-hf", "llama2")
    assert base_model({"config": "llama2-7b", "init": "random"}) == (None, None)
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "model": "meta-llama/Llama-2-7b-hf"}))
    card = model_card(run_dir, "01-quantize", "me/llama")
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["base_model"] == "meta-llama/Llama-2-7b-hf" and metadata["license"] == "llama2"
    assert "carry its license (llama2)" in card


def test_pruned_model_card_says_to_load_it_with_compress(tiny_recipe, tmp_path):
    compress.run(tiny_recipe("  - prune: {ratio: 0.5, layers: [0, 1], multiple: 16, importance: l1}", name="pr"),
                 show_progress=False)
    card = model_card(tmp_path / "runs" / "pr", "01-prune", "me/pruned")
    assert 'compress.load("me/pruned")' in card and "vllm serve" not in card


def test_cli_dry_run_writes_the_upload_and_sends_nothing(hub, tiny_recipe, tmp_path):
    recipe = tiny_recipe()
    result = CliRunner().invoke(app, ["run", str(recipe), "--push-to-hub", "my-org/tiny", "--dry-run"])
    assert result.exit_code == 0, result.output
    staged = tmp_path / "runs" / "tiny" / "hub-upload"
    assert (staged / "README.md").is_file() and (staged / "model.safetensors").is_file()
    assert "nothing was sent" in result.output and hub.requests == []
    # the run's recipe.yaml names this machine's data directory; the public copy and the card do not
    from compress.config.data import data_dir

    local = str(data_dir().resolve())
    assert local in (tmp_path / "runs" / "tiny" / "recipe.yaml").read_text()
    assert local not in (staged / "recipe.yaml").read_text() and local not in (staged / "README.md").read_text()
    # the real push from the same command line, now that the run is complete (its steps are skipped)
    result = CliRunner().invoke(app, ["run", str(recipe), "--push-to-hub", "my-org/tiny"])
    assert result.exit_code == 0, result.output
    assert "complete, skipped" in result.output and "pushed step 01-quantize to my-org/tiny" in result.output
    assert TOKEN not in result.output


def test_recipe_hub_section_chooses_the_step(hub, tiny_recipe, tmp_path):
    path = tiny_recipe("  - quantize: {method: rtn, bits: 8, group_size: 32}")
    path.write_text(path.read_text() + "hub: {repo_id: my-org/base-only, private: false, step: 00-base}\n")
    compress.run(path, show_progress=False)
    repo = hub.repos["my-org/base-only"]
    assert repo["private"] is False and repo["commits"][0]["message"].endswith("step 00-base")
    config = json.loads(repo["commits"][0]["files"]["config.json"])
    assert "quantization_config" not in config  # the unquantized base, as asked


def test_push_errors_name_the_fix(run_dir, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-login"))  # no saved token either
    with pytest.raises(CompressError, match=r"no Hugging Face token: set HF_TOKEN or run `hf auth login`"):
        push(run_dir, HubPush(repo_id="my-org/x"))
    assert (run_dir / "hub-upload" / "README.md").is_file()  # staged, ready for the retry
    with pytest.raises(CompressError, match="hub step '05-quantize' is not a completed step folder"):
        push(run_dir, HubPush(repo_id="my-org/x", step="05-quantize"), dry_run=True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with StandInHub() as down:
        url = down.url
    with pytest.raises(CompressError, match="upload to my-org/x failed: .*rerun to retry") as error:
        push(run_dir, HubPush(repo_id="my-org/x"), endpoint=url)  # nothing listens there any more
    assert TOKEN not in str(error.value)


def test_a_step_the_report_does_not_list_is_a_clear_error(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    (run_dir / "report.json").write_text(json.dumps({**report, "steps": report["steps"][:1]}))  # an older report
    with pytest.raises(CompressError, match="step 01-quantize is not in the run's report.json.*rerun the recipe"):
        push(run_dir, HubPush(repo_id="my-org/x"), dry_run=True)
    assert not (run_dir / "hub-upload").exists()  # nothing half-staged
    (run_dir / "report.json").unlink()
    with pytest.raises(CompressError, match="has no readable report.json: rerun the recipe"):
        push(run_dir, HubPush(repo_id="my-org/x"), dry_run=True)


def test_bad_repo_id_fails_before_the_run(tiny_recipe, tmp_path):
    result = CliRunner().invoke(app, ["run", str(tiny_recipe()), "--push-to-hub", "not a repo"])
    assert result.exit_code == 2 and "--push-to-hub" in result.output and "ORG/NAME" in result.output
    assert not (tmp_path / "runs" / "tiny").exists()

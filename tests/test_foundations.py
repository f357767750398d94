"""The foundations: rules that live in the recipe and in the step folders (not in process memory), fingerprints of
resolved configs, GPTQ's explicit schedule, uniform pruning that stock transformers accepts, step specs, and a
package without import cycles."""

from __future__ import annotations

import ast
import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch

import compress
from compress.config import FP8, GPTQ, RTN, LoRARecovery, TaylorPrune
from compress.errors import CompressError
from compress.modules import is_quantized, quantized_linears
from compress.pipeline import run
from compress.steps import KINDS, SPECS, spec_of

REPO = Path(__file__).resolve().parent.parent


def quiet_run(recipe, **kwargs):
    from rich.console import Console

    return run(recipe, console=Console(quiet=True), show_progress=False, **kwargs)


def _recipe(tmp_path: Path, model, steps: str, data: str = "", name: str = "r") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nmodel: {model}\n{data}steps:\n{steps}\neval:\n  tasks: [wikitext2]\n"
                    f"  wikitext2: {{seq_len: 64, stride: 64, max_tokens: 512}}\n"
                    f"output_dir: {tmp_path / 'runs' / name}\n")
    return path


def _ids(tokenizer, samples=16, seq_len=64):
    from compress.data import calibration_batches

    return calibration_batches(tokenizer, "wikitext2-valid", samples, seq_len)


# ---------------------------------------------------------------- item 2: a quantized folder stays quantized


@pytest.mark.parametrize("config,save_format", [
    (RTN(bits=4, group_size=32), "compressed-tensors"),
    (RTN(bits=4, group_size=32, sym=False), "compressed-tensors"),
    (RTN(bits=4, group_size=32, format="gptq"), "gptq"),
    (FP8(), "compressed-tensors"),
])
def test_a_quantized_folder_loads_back_quantized_on_its_own_grid(tiny_model_dir, tmp_path, config, save_format):
    model, tokenizer = compress.load(tiny_model_dir)
    compress.quantize(model, config, show_progress=False)
    compress.save_model(model, tokenizer, tmp_path / "a", save_format)
    reloaded, _ = compress.load(tmp_path / "a")
    assert is_quantized(reloaded)
    assert {name for name, _, _ in quantized_linears(reloaded)} == {name for name, _, _ in quantized_linears(model)}
    # the restored grid is the saved one: saving the reloaded model writes the same tensors
    compress.save_model(reloaded, tokenizer, tmp_path / "b", save_format)
    from safetensors.torch import load_file

    first, second = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_no_path_trains_a_quantized_step_folder(tiny_recipe, tmp_path):
    report = quiet_run(tiny_recipe(steps="  - quantize: {method: rtn, bits: 4, group_size: 32}"))
    folder = tmp_path / "runs" / "tiny" / "01-quantize"
    record = json.loads((folder / "step.json").read_text())
    assert record["quantized"] is True and record["save_format"] == "compressed-tensors"
    assert report["steps"][0]["step"] == "00-base"
    model, _ = compress.load(folder)  # the Python API
    for verb, config in ((compress.finetune, LoRARecovery(steps=1, batch_size=1)),
                         (compress.distill, compress.Distill(steps=1, batch_size=1))):
        args = (model, config, torch.zeros(2, 16, dtype=torch.long)) + ((model,) if verb is compress.distill else ())
        with pytest.raises(CompressError, match="on a quantized model"):
            verb(*args)
    with pytest.raises(CompressError, match="prune on a quantized model"):
        compress.prune(model, TaylorPrune(importance="l2", multiple=16))
    with pytest.raises(CompressError, match="quantize on a quantized model"):
        compress.quantize(model, RTN(group_size=32))
    # a recipe that starts from the quantized folder: refused before any step is written
    recipe = _recipe(tmp_path, folder, "  - finetune: {steps: 2, batch_size: 2, seq_len: 32}", name="again")
    with pytest.raises(CompressError, match="is a quantized checkpoint, and finetune .lora. need a float model"):
        quiet_run(recipe)
    assert not (tmp_path / "runs" / "again" / "00-base").exists()


# ---------------------------------------------------------------- item 3: fingerprints of resolved configs


def test_inherited_calibration_is_resolved_recorded_and_fingerprinted(tiny_model_dir, tmp_path):
    steps = "  - quantize: {method: gptq, bits: 4, group_size: 32}"
    quiet_run(_recipe(tmp_path, tiny_model_dir, steps, "data:\n  calibration: {samples: 8, seq_len: 64}\n"))
    folder = tmp_path / "runs" / "r" / "01-quantize"
    written = json.loads((folder / "step.json").read_text())
    assert written["config"]["calibration"] == {"dataset": "wikitext2-valid", "samples": 8, "seq_len": 64}
    assert "calibration: null" not in (tmp_path / "runs" / "r" / "recipe.yaml").read_text()
    mtime = (folder / "step.json").stat().st_mtime_ns
    # the same recipe: skipped; the inherited calibration edited: redone with the new set
    quiet_run(_recipe(tmp_path, tiny_model_dir, steps, "data:\n  calibration: {samples: 8, seq_len: 64}\n"))
    assert (folder / "step.json").stat().st_mtime_ns == mtime
    quiet_run(_recipe(tmp_path, tiny_model_dir, steps, "data:\n  calibration: {samples: 6, seq_len: 64}\n"))
    redone = json.loads((folder / "step.json").read_text())
    assert redone["config"]["calibration"]["samples"] == 6
    assert redone["fingerprint"] != written["fingerprint"]


def test_steps_are_keyed_by_data_content_not_by_the_data_dir(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    from compress.data import data_dir

    steps = "  - quantize: {method: gptq, bits: 4, group_size: 32, calibration: {samples: 4, seq_len: 64}}"
    out = tmp_path / "runs" / "r"
    quiet_run(_recipe(tmp_path, tiny_model_dir, steps))
    first = [json.loads((out / step / "step.json").read_text()) for step in ("00-base", "01-quantize")]
    copy_dir = tmp_path / "data-copy"
    shutil.copytree(data_dir() / "wikitext2", copy_dir / "wikitext2")
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(copy_dir))
    # the same files in another data directory: nothing is redone
    quiet_run(_recipe(tmp_path, tiny_model_dir, steps))
    second = [json.loads((out / step / "step.json").read_text()) for step in ("00-base", "01-quantize")]
    assert [r["fingerprint"] for r in second] == [r["fingerprint"] for r in first]
    assert yaml_data_dir(tmp_path / "runs" / "r" / "recipe.yaml") == str(copy_dir.resolve())
    # one line of the calibration text edited: the step that reads it is redone, the base (which reads no data) kept
    valid = copy_dir / "wikitext2" / "wiki.valid.tokens"
    valid.write_text(valid.read_text().replace(" the ", " a ", 1))
    quiet_run(_recipe(tmp_path, tiny_model_dir, steps))
    third = [json.loads((out / step / "step.json").read_text()) for step in ("00-base", "01-quantize")]
    assert third[0]["fingerprint"] == first[0]["fingerprint"]
    assert third[1]["fingerprint"] != first[1]["fingerprint"]
    assert third[1]["inputs"]["data"]["wikitext2-valid"] == hashlib.sha256(valid.read_bytes()).hexdigest()


def yaml_data_dir(path: Path) -> str:
    import yaml

    return yaml.safe_load(path.read_text())["data"]["dir"]


# ---------------------------------------------------------------- item 4: GPTQ's algorithm does not follow memory


def test_gptq_sequential_result_does_not_depend_on_how_calibration_is_chunked(tiny_model_dir):
    base, tokenizer = compress.load(tiny_model_dir)
    ids = _ids(tokenizer)
    whole = compress.quantize(copy.deepcopy(base), GPTQ(bits=3, group_size=16), ids, show_progress=False)
    chunked = compress.quantize(copy.deepcopy(base), GPTQ(bits=3, group_size=16, batch_tokens=128), ids,
                                show_progress=False)  # 8 forwards per layer instead of one
    two_pass = compress.quantize(copy.deepcopy(base), GPTQ(bits=3, group_size=16, schedule="two_pass"), ids,
                                 show_progress=False)
    weights = lambda model: torch.cat([m.weight.flatten() for _, m, _ in quantized_linears(model)])  # noqa: E731
    same_grid_point = (weights(whole) == weights(chunked)).float().mean()
    assert same_grid_point > 0.995  # only the summation order of the Hessians differs
    assert (weights(whole) == weights(two_pass)).float().mean() < same_grid_point  # the schedule is the algorithm


def test_gptq_schedule_is_recorded_in_the_step(tiny_recipe, tmp_path):
    steps = "  - quantize: {method: gptq, group_size: 32, schedule: two_pass, calibration: {samples: 4, seq_len: 64}}"
    report = quiet_run(tiny_recipe(steps=steps))
    assert report["steps"][1]["config"]["schedule"] == "two_pass"
    assert "two-pass" in report["steps"][1]["summary"]
    record = json.loads((tmp_path / "runs" / "tiny" / "01-quantize" / "step.json").read_text())
    assert record["config"]["batch_tokens"] is None  # fingerprinted as asked
    assert record["ran_with"]["batch_tokens"] == 4 * 64  # recorded as it ran: the whole set fits in one forward


# ---------------------------------------------------------------- item 10: uniform pruning that transformers loads


def _mha_model(folder: Path, heads: int = 8, hidden: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def test_uniform_pruning_that_llama_config_refuses_fails_before_any_work_at_llama2_7b_shape():
    from transformers import AutoModelForCausalLM

    from compress.models import architecture_config
    from compress.prune import check_prunable

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(architecture_config("llama2-7b"))
    with pytest.raises(CompressError) as info:  # 24 of 32 heads: 4096 % 24 != 0
        check_prunable(model, TaylorPrune(ratio=0.25, uniform=True, multiple=128))
    message = str(info.value)
    assert "keeps 24 of 32 attention heads" in message and "LlamaConfig refuses" in message
    assert "ratio 0.49 to 0.51 (16 heads)" in message
    check_prunable(model, TaylorPrune(ratio=0.5, uniform=True, multiple=128))  # accepted
    check_prunable(model, TaylorPrune(ratio=0.25, uniform=True, multiple=128, targets=("mlp",)))


def test_tiny_mha_model_pruned_to_six_heads_saves_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _mha_model(tmp_path)
    ids = torch.randint(0, 128, (2, 16))
    with pytest.raises(CompressError, match="keeps 6 of 8 attention heads"):
        compress.prune(copy.deepcopy(model), TaylorPrune(importance="l2", ratio=0.25, uniform=True, multiple=32))
    # every layer at 6 heads without uniform: the per-layer form, which compress.load builds
    six = compress.prune(copy.deepcopy(model), TaylorPrune(importance="l2", ratio=0.25, multiple=32))
    six.save_pretrained(tmp_path / "six")
    config = json.loads((tmp_path / "six" / "config.json").read_text())
    assert [w["num_attention_heads"] for w in config["compress_layer_widths"]] == [6, 6]
    from compress.quantized_load import load_state  # what compress.load does for a folder (this one has no tokenizer)

    reloaded = load_state(tmp_path / "six", config, torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, six(input_ids=ids).logits)
    # uniform at a count that divides the hidden size: a stock config, loaded without compress
    four = compress.prune(copy.deepcopy(model), TaylorPrune(importance="l2", ratio=0.5, uniform=True, multiple=32))
    four.save_pretrained(tmp_path / "four")
    config = json.loads((tmp_path / "four" / "config.json").read_text())
    assert config["num_attention_heads"] == 4 and "compress_layer_widths" not in config
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "four").eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, four(input_ids=ids).logits)


# ---------------------------------------------------------------- step specs and the package's shape


def test_every_spec_matches_its_config_and_verb():
    import inspect

    from compress.recipe import Step

    assert set(KINDS) == set(Step.model_fields)
    for spec in SPECS:
        verb = spec.load_verb()
        params = inspect.signature(verb).parameters
        assert list(params)[:2] == ["model", "config"], spec.name
        assert "show_progress" in params and params["show_progress"].kind is inspect.Parameter.KEYWORD_ONLY
        assert ("calibration" in params) == spec.calibrates, spec.name
        assert ("train_data" in params) == spec.trains == ("seed" in params), spec.name
        assert ("teacher" in params) == (spec.teacher != "never"), spec.name
        if spec.teacher != "never":
            assert "kd" in spec.config.model_fields, spec.name
        assert spec_of(spec.config.model_construct()) is spec


def test_lora_block_reaches_peft_unchanged():
    import dataclasses

    from peft import LoraConfig

    from compress.config import LoRA

    lora = LoRA(r=4, alpha=8, use_dora=True, use_rslora=True, init_lora_weights="gaussian",
                rank_pattern={"q_proj": 2}, layers_to_transform=(0,), target_modules=("q_proj", "v_proj"))
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    kwargs = lora.peft_kwargs()
    assert set(kwargs) <= fields
    built = LoraConfig(**kwargs)
    assert (built.r, built.lora_alpha, built.use_dora, built.use_rslora, built.init_lora_weights) == \
        (4, 8, True, True, "gaussian")
    assert built.rank_pattern == {"q_proj": 2} and built.layers_to_transform == [0]


def _module_imports(path: Path, package_root: Path) -> set[str]:
    """compress modules imported by the file at `path`, anywhere in it (a function's deferred import is an edge of
    the graph too); `from compress import distributed` names the submodule."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("compress"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("compress"))
    return found


def test_the_package_has_no_import_cycles():
    root = REPO / "compress"
    modules = {}
    for path in root.rglob("*.py"):
        name = ".".join(("compress",) + path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {name: {resolve(m) for m in _module_imports(path, root)} - {None, name} for name, path in modules.items()}
    visiting, done, cycles = set(), set(), []

    def visit(node, trail):
        if node in done:
            return
        if node in visiting:
            cycles.append(trail[trail.index(node):] + [node])
            return
        visiting.add(node)
        for nxt in sorted(graph[node]):
            visit(nxt, trail + [nxt])
        visiting.discard(node)
        done.add(node)

    for node in sorted(graph):
        visit(node, [node])
    assert not cycles, cycles
    # the config layer and the recipe import nothing of the algorithms
    light = [n for n in modules if n.startswith("compress.config") or n in ("compress.recipe", "compress.steps")]
    for name in light:
        heavy = {m for m in graph[name] if not m.startswith("compress.config") and m not in (
            "compress.errors", "compress.steps", "compress")}
        assert not heavy, (name, heavy)


LOADER = ("compress.models", "compress.sources", "compress.load_errors", "compress.hub_download", "compress.gguf_cache",
          "compress.identity", "compress.quantized_load")
ALGORITHMS = ("compress.prune", "compress.bench", "compress.quantize.rtn", "compress.quantize.gptq",
              "compress.quantize.awq", "compress.quantize.fp8", "compress.quantize.qat", "compress.quantize.grid",
              "compress.quantize.layerwise", "compress.quantize.dequantize", "compress.quantize.kernels")


def test_the_loader_imports_no_algorithm():
    """Loading a model needs checkpoint formats and runtimes, never pruning, a quantization method or the benchmark
    (imports inside functions counted); nor do the report and the Hub upload. `compress.quantize` itself is the
    quantize verb: only its format and runtime modules may be named."""
    root = REPO / "compress"
    for name in LOADER + ("compress.report", "compress.hub"):
        path = root / (name.removeprefix("compress.").replace(".", "/") + ".py")
        imported = _module_imports(path, root)
        forbidden = sorted(m for m in imported if m == "compress.quantize"
                           or any(m == a or m.startswith(a + ".") for a in ALGORITHMS))
        assert not forbidden, (name, forbidden)

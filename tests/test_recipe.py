"""Recipe validation: every malformed recipe gives one line per problem naming file:line and the field, through
the real CLI, with no traceback; the shipped recipes validate. Malformed command lines (flags, paths, dtypes, folders
that are not models, half-written step folders, damaged checkpoints) give one error line each, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress.cli import app
from compress.errors import RecipeError
from compress.recipe import load_recipe, resolved_yaml
from cpu_time import run_counting_cpu

REPO = Path(__file__).resolve().parent.parent
GOOD = """\
name: good
model: smollm2-135m
steps:
  - quantize: {method: rtn, bits: 4, group_size: 64}
"""

# (recipe text, expected line, expected field, a fragment of the expected message)
MALFORMED = [
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: rtn, bits: 5}\n", 4, "steps[0].quantize.bits", "allowed: 2, 3, 4 or 8"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: gptqq}\n", 4, "steps[0].quantize.method", "unknown method 'gptqq'; allowed: rtn, gptq"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {bits: 4}\n", 4, "steps[0].quantize", "'method' is missing; allowed: rtn, gptq"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: gptq, bits: 3, format: gptq}\n", 4, "steps[0].quantize", "for 3 bits use format compressed-tensors"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: gptq, calibration: {seq_len: 4}}\n", 4, "steps[0].quantize.calibration.seq_len", "got 4; allowed: 8 to 1048576"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize:\n      method: rtn\n      bitz: 3\n", 6, "steps[0].quantize.bitz", "unknown field 'bitz'; allowed: method, bits, group_size, sym"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - shrink: {ratio: 0.5}\n", 4, "steps[0]", "unknown step 'shrink'; allowed: prune, finetune, distill, quantize"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: rtn, bits: 4}\n    prune: {}\n", 4, "steps[0]", "one key"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize\n", 4, "steps[0]", "a step is a mapping"),
    ("name: x\nmodel: smollm2-135m\nsteps: []\n", 3, "steps", "allowed: 1 to 99 items"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - prune: {ratio: 1.5}\n", 4, "steps[0].prune.ratio", "got 1.5; allowed: more than 0 and less than 1"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - prune: {importance: hessian}\n", 4, "steps[0].prune.importance", "allowed: 'element1', 'element2', 'vector', 'mix', 'l1', 'l2' or 'random'"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - prune: {layers: [28, 4]}\n", 4, "steps[0].prune", "0 <= start < end"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - prune: {uniform: true, scope: global}\n", 4, "steps[0].prune", "choose one"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - prune: {targets: [heads]}\n", 4, "steps[0].prune.targets[0]", "allowed: 'attention' or 'mlp'"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - prune: {method: magnitude}\n", 4, "steps[0].prune.method", "allowed: 'taylor'"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - finetune: {merge: false}\n", 4, "steps[0].finetune.merge", "unknown field 'merge'"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - finetune: {data: imagenet}\n", 4, "steps[0].finetune.data[0]", "unknown dataset 'imagenet'"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - finetune: {method: lora, rank: 8}\n", 4, "steps[0].finetune.rank", "unknown field 'rank'; allowed: method, steps"),
    ("name: x\nmodel: smollm2-135m\n", 1, "steps", "required field is missing"),
    ("model: smollm2-135m\nsteps:\n  - quantize: {method: rtn}\n", 1, "name", "required field is missing"),
    ("name: x\nmodel: no-such-model\nsteps:\n  - quantize: {method: rtn}\n", 2, "model", "unknown model 'no-such-model'"),
    ("name: x\nmodel: ./missing/folder\nsteps:\n  - quantize: {method: rtn}\n", 2, "model", "does not exist"),
    ("name: x\nmodel: {config: llama2-7b, init: random, tokenizr: x}\nsteps:\n  - quantize: {method: rtn}\n", 2, "model.tokenizr", "unknown field 'tokenizr'; allowed: config, init, tokenizer, seed"),
    ("name: x\nmodel: {config: llama2-8b, init: random}\nsteps:\n  - quantize: {method: rtn}\n", 2, "model.config", "unknown architecture 'llama2-8b'; allowed: llama2-7b"),
    ("name: x\nmodel: {config: llama2-7b, init: zeros}\nsteps:\n  - quantize: {method: rtn}\n", 2, "model.init", "allowed: 'random'"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: rtn}\nhub: {repo_id: notarepo}\n", 5, "hub.repo_id", "'notarepo' is not a repo id; use ORG/NAME"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: rtn}\nhub: {repo_id: a/b, step: final}\n", 5, "hub.step", "use one like 03-quantize, or last"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: rtn, group_size: [64]}\n", 4, "steps[0].quantize.group_size", "valid integer (got [64])"),
    ("name: x\nmodel: /nowhere/model.gguf\nsteps:\n  - quantize: {method: rtn}\n", 2, "model", "does not exist"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: rtn, group_size: 0}\n", 4, "steps[0].quantize.group_size", "or -1 for per-channel"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: rtn, group_size: sixty-four}\n", 4, "steps[0].quantize.group_size", "valid integer"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: rtn, sym: maybe}\n", 4, "steps[0].quantize.sym", "valid boolean"),
    ("name: x\nmodel: smollm2-135m\ndtype: int4\nsteps:\n  - quantize: {method: rtn}\n", 3, "dtype", "allowed: 'float32', 'bfloat16' or 'float16'"),
    ("name: x\nmodel: smollm2-135m\ndevice: gpu\nsteps:\n  - quantize: {method: rtn}\n", 3, "device", "should match pattern"),
    ("name: x\nmodel: smollm2-135m\nseed: zero\nsteps:\n  - quantize: {method: rtn}\n", 3, "seed", "valid integer"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: rtn}\neval:\n  tasks: [wikitext2, mmlu]\n", 6, "eval.tasks[1]", "allowed: 'wikitext2'"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: rtn}\neval:\n  after: sometimes\n", 6, "eval.after", "'every_step', 'last' or 'none'"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: rtn}\neval:\n  wikitext2: {seq_len: 128, stride: 256}\n", 6, "eval.wikitext2", "stride 256 is larger than seq_len 128"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: rtn}\neval:\n  wikitext2: {seq_len: 1}\n", 6, "eval.wikitext2.seq_len", "got 1; allowed: 2 to 1048576"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: rtn}\ndata:\n  calibration: {dataset: imagenet}\n", 6, "data.calibration.dataset", "unknown dataset 'imagenet'"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: rtn}\ndata:\n  calibration: {samples: -3}\n", 6, "data.calibration.samples", "got -3; allowed: 1 to 1000000"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: rtn}\noutput: runs/x\n", 5, "output", "unknown field 'output'; allowed: name, model, dtype, device, seed, data, steps, eval, output_dir"),
    ("name: bad name!\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: rtn}\n", 1, "name", "should match pattern"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: rtn, bits: 4\n", 5, "", "malformed YAML"),
    ("name: x\n  model: smollm2-135m\n", 2, "", "malformed YAML"),
    ("- just\n- a list\n", 1, "recipe", "expected a mapping"),
    ("", 1, "recipe", "got an empty file"),
    # strict YAML: a key given twice is an error naming both lines (PyYAML would keep the later value silently)
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: rtn, bits: 4, bits: 8}\n", 4, "steps[0].quantize.bits", "duplicate key 'bits' (first at line 4)"),
    ("name: x\nname: y\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: rtn}\n", 2, "name", "duplicate key 'name' (first at line 1)"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize:\n      method: gptq\n      calibration: {samples: 8}\n      calibration: {samples: 9}\n", 7, "steps[0].quantize.calibration", "first at line 6"),
    # numbers that cannot be meant, with the allowed range
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - finetune: {steps: 99999999999999999999999}\n", 4, "steps[0].finetune.steps", "allowed: 1 to 10000000"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - finetune: {lr: 30}\n", 4, "steps[0].finetune.lr", "allowed: more than 0 and 1"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - finetune: {batch_size: 0}\n", 4, "steps[0].finetune.batch_size", "allowed: 1 to 65536"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - finetune: {lora: {r: 100000}}\n", 4, "steps[0].finetune.lora.r", "allowed: 1 to 65536"),
    ("name: x\nmodel: smollm2-135m\nseed: -1\nsteps:\n  - quantize: {method: rtn}\n", 3, "seed", "allowed: 0 to 4294967295"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: rtn, group_size: 1000000}\n", 4, "steps[0].quantize.group_size", "allowed: 1 to 65536 columns"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: gptq, calibration: {samples: 10000000000}}\n", 4, "steps[0].quantize.calibration.samples", "allowed: 1 to 1000000"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - prune: {layers: [0, 100000]}\n", 4, "steps[0].prune", "end <= 4096"),
    # step order, from the step specs: nothing that needs a float model after a quantize step
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: rtn}\n  - finetune: {}\n", 5, "steps[1].finetune", "cannot follow steps[0] (quantize (rtn))"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: gptq}\n  - prune: {}\n", 5, "steps[1].prune", "put it before the quantize step"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: fp8}\n  - distill: {}\n", 5, "steps[1].distill", "cannot follow steps[0] (quantize (fp8))"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: rtn, bits: 8}\n  - quantize: {method: gptq}\n", 5, "steps[1].quantize", "quantize (gptq) cannot follow"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: qat, steps: 5}\n  - finetune: {}\n", 5, "steps[1].finetune", "cannot follow steps[0] (quantize (qat))"),
    # one LoRA block and one KD block, nested the same way everywhere
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - finetune: {r: 8}\n", 4, "steps[0].finetune.r", "it belongs in the lora block"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - distill: {teacher: base}\n", 4, "steps[0].distill.teacher", "it belongs in the kd block"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: qat, distill_from: base}\n", 4, "steps[0].quantize.distill_from", "unknown field 'distill_from'"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - finetune: {lora: {init_lora_weights: zeros}}\n", 4, "steps[0].finetune.lora.init_lora_weights", "allowed: true, false, gaussian"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - distill: {kd: {teacher: 03-prune}}\n  - prune: {}\n", 4, "steps[0].distill.kd.teacher", "is not an earlier step: this step writes 01-distill"),
    ("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: gptq, schedule: auto}\n", 4, "steps[0].quantize.schedule", "allowed: 'sequential' or 'two_pass'"),
]


@pytest.mark.parametrize("text,line,field,fragment", MALFORMED, ids=[f"case{i}" for i in range(len(MALFORMED))])
def test_malformed_recipe_gives_one_line_error(tmp_path, text, line, field, fragment):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines, result.output
    first = lines[0]
    assert first.startswith(f"error: {path}:{line}: "), first
    if field:
        assert f":{line}: {field}: " in first, first
    assert fragment in result.output, result.output
    assert "Traceback" not in result.output


def test_several_problems_are_all_reported(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: rtn, bits: 5, sym: maybe}\nfoo: 1\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    fields = [line.split(": ")[1] for line in info.value.lines]
    assert fields == ["steps[0].quantize.bits", "steps[0].quantize.sym", "foo"]


def test_missing_recipe_file(tmp_path):
    result = CliRunner().invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "recipe file not found" in result.output


def test_defaults_are_filled_and_inherited_ones_resolved(tmp_path, monkeypatch):
    path = tmp_path / "r.yaml"
    path.write_text("name: good\nmodel: smollm2-135m\ndata:\n  calibration: {samples: 16, seq_len: 64}\nsteps:\n"
                    "  - quantize: {method: gptq, group_size: 64}\n")
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tmp_path))
    recipe = load_recipe(path)
    assert recipe.steps[0].kind == "quantize"
    assert recipe.steps[0].config.sym is True and recipe.steps[0].config.schedule == "sequential"  # class defaults
    assert recipe.steps[0].config.calibration is None  # inherited: not known until resolved
    assert recipe.eval.after == "every_step"
    assert str(recipe.resolved_output_dir) == "runs/good"
    resolved = recipe.resolved()
    assert resolved.steps[0].config.calibration.model_dump() == {"dataset": "wikitext2-valid", "samples": 16,
                                                                 "seq_len": 64}
    assert resolved.data.dir == str(tmp_path.resolve())
    assert "calibration: null" not in resolved_yaml(resolved)


def test_validate_loads_no_torch_and_answers_in_under_a_second():
    recipes = sorted(str(p) for p in (REPO / "recipes").glob("*.yaml"))
    probe = ("import sys, time; start = time.perf_counter(); from compress.cli import app; from typer.testing import "
             "CliRunner; result = CliRunner().invoke(app, ['validate', *sys.argv[1:]]); "
             "assert result.exit_code == 0, result.output; "
             "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'compressed_tensors', "
             "'peft', 'lm_eval', 'datasets'}); print(heavy, time.perf_counter() - start)")
    proc, elapsed = run_counting_cpu([sys.executable, "-c", probe, *recipes], capture_output=True, text=True,
                                     timeout=60)  # CPU seconds of the whole process, interpreter start included
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("[] "), proc.stdout  # no heavy library imported
    assert elapsed < 1.0, elapsed


def test_python_api_applies_the_same_order_rules():
    from pydantic import ValidationError

    from compress.recipe import Recipe

    with pytest.raises(ValidationError, match="cannot follow steps.0. .quantize .rtn.."):
        Recipe(name="x", model="smollm2-135m", steps=[{"quantize": {"method": "rtn"}}, {"finetune": {}}])


def test_shipped_recipes_validate():
    recipes = sorted(str(p) for p in (REPO / "recipes").glob("*.yaml"))
    assert recipes
    result = CliRunner().invoke(app, ["validate", *recipes])
    assert result.exit_code == 0, result.output
    assert result.output.count("ok ") == len(recipes)


def test_cli_error_has_no_traceback_in_a_real_process(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nmodel: smollm2-135m\nsteps:\n  - quantize: {method: rtn, bits: 7}\n")
    proc = subprocess.run([sys.executable, "-m", "compress.cli", "validate", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {path}:4: steps[0].quantize.bits: got 7; allowed: 2, 3, 4 or 8"]


@pytest.fixture(scope="module")
def malformed_inputs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """Folders that are not models, half-written step folders, damaged quantized checkpoints, and bad recipe files."""
    import json
    import shutil

    import compress

    base = tmp_path_factory.mktemp("malformed")
    paths = {"tiny": tiny_model_dir, "missing": base / "nope", "empty": base / "empty", "file": base / "a-file"}
    paths["empty"].mkdir()
    paths["file"].write_text("x")
    paths["config-only"] = base / "config-only"
    paths["config-only"].mkdir()
    shutil.copy(tiny_model_dir / "config.json", paths["config-only"])
    paths["bad-json"] = base / "bad-json"
    shutil.copytree(tiny_model_dir, paths["bad-json"])
    (paths["bad-json"] / "config.json").write_text("{ not json")
    paths["truncated"] = base / "truncated"  # a save cut short: half the safetensors bytes
    shutil.copytree(tiny_model_dir, paths["truncated"])
    weights = (paths["truncated"] / "model.safetensors").read_bytes()
    (paths["truncated"] / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    model, tokenizer = compress.load(tiny_model_dir)
    paths["quantized"] = base / "01-quantize"
    compress.save_model(compress.quantize(model, compress.RTN(bits=4, group_size=16), show_progress=False), tokenizer,
                        paths["quantized"])
    for name, damage in (("untargeted",
                          lambda q: [g.update(targets=["Embedding"]) for g in q["config_groups"].values()]),
                         ("invalid-quant", lambda q: q.update(config_groups="nope"))):
        paths[name] = base / name
        shutil.copytree(paths["quantized"], paths[name])
        config = json.loads((paths[name] / "config.json").read_text())
        damage(config["quantization_config"])
        (paths[name] / "config.json").write_text(json.dumps(config))
    paths["partial"] = base / "runs" / "r" / "01-quantize.partial"  # killed before its weights were written
    paths["partial"].mkdir(parents=True)
    shutil.copy(paths["quantized"] / "config.json", paths["partial"])
    paths["no-weights"] = base / "runs" / "r" / "02-prune"  # a step folder whose weights were deleted
    shutil.copytree(tiny_model_dir, paths["no-weights"])
    (paths["no-weights"] / "model.safetensors").unlink()
    paths["not-gguf"] = base / "model.gguf"
    paths["not-gguf"].write_bytes(b"not a gguf file at all")
    for name, text in (("empty.yaml", ""), ("list.yaml", "- a\n- b\n")):
        (base / name).write_text(text)
        paths[name] = base / name
    paths["binary.yaml"] = base / "binary.yaml"
    paths["binary.yaml"].write_bytes(bytes(range(256)))
    paths["recipe"] = base / "r.yaml"
    paths["recipe"].write_text(f"name: r\nmodel: {tiny_model_dir}\nsteps:\n  - quantize: {{method: rtn, bits: 4, "
                               f"group_size: 16}}\neval: {{tasks: [wikitext2], after: none}}\n"
                               f"output_dir: {base / 'out'}\n")
    for name in ("empty", "partial", "no-weights", "not-gguf", "truncated"):  # a recipe whose model is this folder
        paths[f"recipe:{name}"] = base / f"recipe-{name}.yaml"
        paths[f"recipe:{name}"].write_text(paths["recipe"].read_text().replace(f"model: {tiny_model_dir}",
                                                                               f"model: {paths[name]}"))
    return paths


# command lines with {name} standing for a path of malformed_inputs; each must end in ONE line "error: ..."
MALFORMED_COMMANDS = [
    "run {missing}", "run {empty}", "run {empty.yaml}", "run {binary.yaml}", "run {list.yaml}",
    "run {recipe} --output-dir {file}", "run {recipe} --output-dir {tiny}", "run {recipe} --push-to-hub not/a/repo!!",
    "run {recipe} --dry-run", "run {recipe:empty}", "run {recipe:partial}", "run {recipe:no-weights}",
    "run {recipe:not-gguf}", "run {recipe:truncated}",
    "validate {empty.yaml}", "validate {empty}",
    "eval {missing}", "eval {empty}", "eval {config-only}", "eval {bad-json}", "eval {truncated}", "eval {partial}",
    "eval {no-weights}", "eval {untargeted}", "eval {invalid-quant}", "eval {not-gguf}",
    "eval {tiny} --tasks nosuchtask", "eval {tiny} --tasks ,", "eval {tiny} --dtype int3", "eval {tiny} --device tpu",
    "eval {tiny} --device cuda:7",
    "bench {tiny} --batch 0", "bench {tiny} --batch a,b", "bench {tiny} --prefill ,", "bench {tiny} --runtime turbo",
    "bench {tiny} --dtype float8", "bench {missing}", "bench {empty}", "bench {untargeted}",
    "estimate {tiny} --dtype int3", "estimate {tiny} --ratios 2.0", "estimate {tiny} --ratios abc",
    "estimate {missing}", "estimate {empty}", "estimate {bad-json}",
    "data fetch nosuchdataset", "data fetch --recipe {missing}", "data fetch --recipe {binary.yaml}",
]
# what the command-line parser itself refuses: its usage and one error, in a box (typer's format), no traceback
MALFORMED_FLAGS = ["run", "eval {tiny} --batch-size 0", "eval {tiny} --limit 0", "estimate {tiny} --context abc",
                   "bench {tiny} --repeats 0", "nosuchcommand"]


def _invoke(command: str, paths: dict[str, Path]):
    import re

    args = [re.sub(r"\{([^}]+)\}", lambda match: str(paths[match.group(1)]), word) for word in command.split()]
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("command", MALFORMED_COMMANDS)
def test_malformed_command_line_gives_one_line_error(malformed_inputs, command):
    result = _invoke(command, malformed_inputs)
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, (result.exception, result.output)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert not list((malformed_inputs["recipe"].parent / "out").glob("0*"))  # no run wrote a step folder


@pytest.mark.parametrize("command", MALFORMED_FLAGS)
def test_malformed_flag_gives_a_usage_error(malformed_inputs, command):
    result = _invoke(command, malformed_inputs)
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, (result.exception, result.output)
    assert "Traceback" not in result.output
    assert result.output.startswith("Usage: ") and "Error" in result.output, result.output

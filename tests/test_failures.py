"""Failures that must stop a step with one error naming the step and the layer or module, before anything is written:
NaN/inf in a GPTQ Hessian, in Taylor importance gradients, in a training loss (LoRA, distillation, QAT); a damp that
GPTQ had to raise is warned about and recorded. And training in bfloat16 keeps float32 master weights, so that a
small learning rate still moves the weights as it does in float32."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import compress
from compress.cli import app
from compress.config import KD, Distill
from compress.data import calibration_batches, training_windows
from compress.errors import CompressError
from compress.quantize import gptq
from compress.quantize.grid import quantizable_linears
from compress.quantize.qat import QAT, quantize_qat


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tokenizer = compress.load(tiny_model_dir)
    return model, tokenizer, training_windows(tokenizer, "wikitext2-valid", 32)[:16]


def _with_nan(model: torch.nn.Module, name: str = "model.layers.1.input_layernorm.weight") -> torch.nn.Module:
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.get_parameter(name)[0] = float("nan")
    return broken


def test_nan_hessian_stops_the_gptq_step_before_it_is_written(tmp_path, tiny_model_dir):
    folder = tmp_path / "nan-model"
    shutil.copytree(tiny_model_dir, folder)
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.1.input_layernorm.weight"][3] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "runs" / "nan"
    recipe = tmp_path / "nan.yaml"
    recipe.write_text(f"name: nan\nmodel: {folder}\nsteps:\n  - quantize: {{method: gptq, bits: 4, group_size: 16, "
                      f"calibration: {{samples: 4, seq_len: 32}}}}\neval: {{tasks: [], after: none}}\n"
                      f"output_dir: {out}\n")
    result = CliRunner().invoke(app, ["run", str(recipe)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert errors[0].startswith("error: quantize (GPTQ), layer 1 (self_attn.q_proj, self_attn.k_proj, "
                                "self_attn.v_proj): the Hessian of the calibration inputs has"), errors[0]
    assert "NaN or inf" in errors[0]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["00-base"]  # nothing of the quantize step


def test_raised_damping_is_warned_about_and_recorded(tiny, monkeypatch):
    model, tokenizer, _ = tiny
    real_add_gram = gptq.add_gram

    def indefinite(total, x):
        # the last input column decoupled from the others, with a negative curvature of 0.3 % of the diagonal's mean
        # in the summed Hessian: damp 0.001 cannot make it positive definite, damp 0.01 (tenfold) can
        real_add_gram(total, x)
        total[-1, :] = 0
        total[:, -1] = 0
        total[-1, -1] = -0.003 * total.diagonal()[:-1].mean()

    monkeypatch.setattr(gptq, "add_gram", indefinite)
    ids = calibration_batches(tokenizer, "wikitext2-valid", 4, 32)
    with pytest.warns(UserWarning, match=r"GPTQ layer 0 \(self_attn.q_proj, self_attn.k_proj, self_attn.v_proj\): "
                                         r"the Hessian is not positive definite with damp 0.001; it was quantized "
                                         r"with damp 0.01"):
        quantized = compress.quantize(copy.deepcopy(model), compress.GPTQ(bits=4, group_size=16, damp=0.001), ids,
                                      show_progress=False)
    linears = [name for name, _ in quantizable_linears(quantized.get_decoder())]
    assert gptq.raised_damping(quantized) == {f"model.{name}": pytest.approx(0.01) for name in linears}
    monkeypatch.setattr(gptq, "add_gram", real_add_gram)
    plain = compress.quantize(copy.deepcopy(model), compress.GPTQ(bits=4, group_size=16, damp=0.001), ids,
                              show_progress=False)
    assert gptq.raised_damping(plain) == {}


def test_nan_taylor_gradients_name_the_weight(tiny):
    model, tokenizer, _ = tiny
    ids = calibration_batches(tokenizer, "wikitext2-valid", 2, 32)
    broken = _with_nan(model, "model.layers.1.mlp.down_proj.weight")
    with pytest.raises(CompressError, match=r"^prune \(Taylor importance\): the gradients of model\.layers\.0\."
                                            r"self_attn\.q_proj\.weight have \d+ NaN or inf entries"):
        compress.prune(broken, compress.TaylorPrune(ratio=0.5, importance="element1", multiple=16, uniform=True),
                       ids, show_progress=False)


BUDGET = dict(steps=3, batch_size=4, seq_len=32, warmup_ratio=0.0)


@pytest.mark.parametrize("step", ["finetune", "distill", "qat"])
def test_a_nan_training_loss_stops_with_the_step_and_the_weight_named(tiny, step):
    model, _, windows = tiny
    broken = _with_nan(model)
    if step == "finetune":
        run = lambda: compress.finetune(broken, compress.LoRARecovery(lr=1e-3, **BUDGET), windows, show_progress=False)  # noqa: E731
        expected = r"finetune \(LoRA\): .* the weight base_model\.model\.model\.layers\.1\.input_layernorm\.weight"
    elif step == "distill":
        run = lambda: compress.distill(broken, Distill(lr=1e-3, kd=KD(teacher="base"), **BUDGET), windows,  # noqa: E731
                                       model, show_progress=False)
        expected = r"distill: .* the weight model\.layers\.1\.input_layernorm\.weight"
    else:
        run = lambda: quantize_qat(broken, QAT(bits=4, group_size=16, train="weights", lr=1e-3, **BUDGET), windows,  # noqa: E731
                                   show_progress=False)
        expected = r"quantize \(QAT, train: weights\): .* the weight model\.layers\.1\.input_layernorm\.weight"
    with pytest.raises(CompressError, match=r"the training loss is not finite \(this process: nan\) at training "
                                            r"step 1 of 3") as info:
        run()
    assert __import__("re").match(expected, str(info.value)), str(info.value)


def _kl_to(teacher, student, windows) -> float:
    with torch.no_grad():
        t = F.log_softmax(teacher.float()(input_ids=windows).logits, -1)
        s = F.log_softmax(copy.deepcopy(student).float()(input_ids=windows).logits, -1)
    return F.kl_div(s.flatten(0, 1), t.flatten(0, 1), log_target=True, reduction="batchmean").item()


def _lm_loss(model, windows) -> float:
    with torch.no_grad():
        return copy.deepcopy(model).float()(input_ids=windows, labels=windows).loss.item()


SMALL_LR = dict(steps=20, batch_size=4, seq_len=32, lr=2e-5, warmup_ratio=0.0)


def test_bfloat16_distillation_with_a_small_lr_moves_the_weights_as_float32_does(tiny):
    model, _, windows = tiny
    torch.manual_seed(1)
    student = copy.deepcopy(model)
    with torch.no_grad():  # a student a little off its teacher
        for param in student.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        start = copy.deepcopy(student).to(dtype)
        before = {name: p.detach().float().clone() for name, p in start.named_parameters()}
        kl_before = _kl_to(model, start, windows)
        trained = compress.distill(start, Distill(kd=KD(teacher="base"), **SMALL_LR), windows,
                                   copy.deepcopy(model).to(dtype), show_progress=False)
        assert trained.dtype == dtype  # trained with float32 masters, returned in its own dtype
        delta = torch.cat([(p.detach().float() - before[name]).flatten() for name, p in trained.named_parameters()])
        runs[dtype] = delta, kl_before - _kl_to(model, trained, windows)
    (delta32, fall32), (delta16, fall16) = runs[torch.float32], runs[torch.bfloat16]
    assert fall32 > 0
    # updates of 2e-5 are below half the bfloat16 spacing of most weights: applied to bfloat16 weights directly, about
    # a quarter of them move at all and the KL falls a fifth as far as in float32
    assert (delta16 != 0).float().mean() > 0.6
    assert fall16 > 0.7 * fall32, (fall16, fall32)
    assert (delta16 - delta32).norm() < 0.5 * delta32.norm()


def test_bfloat16_qat_on_weights_with_a_small_lr_learns_as_float32_does(tiny):
    model, _, windows = tiny
    falls = {}
    for dtype in (torch.float32, torch.bfloat16):
        start = copy.deepcopy(model).to(dtype)
        rtn = compress.quantize(copy.deepcopy(start), compress.RTN(bits=4, group_size=16), show_progress=False)
        trained = quantize_qat(start, QAT(bits=4, group_size=16, train="weights", **SMALL_LR), windows,
                               show_progress=False)
        assert trained.dtype == dtype
        rounded = dict(quantizable_linears(rtn))
        changed = [(linear.weight != rounded[name].weight).float().mean()
                   for name, linear in quantizable_linears(trained)]
        falls[dtype] = _lm_loss(rtn, windows) - _lm_loss(trained, windows), torch.stack(changed).mean()
    (fall32, _), (fall16, changed16) = falls[torch.float32], falls[torch.bfloat16]
    assert fall32 > 0
    # on bfloat16 weights themselves, 0.5 % of the quantized weights moved off round-to-nearest's and the loss fell
    # a fifth as far as in float32
    assert changed16 > 0.1
    assert fall16 > 0.7 * fall32, (fall16, fall32)


def test_raised_damping_reaches_the_step_record(tiny_recipe, monkeypatch):
    import json
    import os

    from rich.console import Console

    real_add_gram = gptq.add_gram

    def indefinite(total, x):  # as above: damp 0.001 cannot make the summed Hessian positive definite, 0.01 can
        real_add_gram(total, x)
        total[-1, :] = 0
        total[:, -1] = 0
        total[-1, -1] = -0.003 * total.diagonal()[:-1].mean()

    monkeypatch.setattr(gptq, "add_gram", indefinite)
    recipe = tiny_recipe("  - quantize: {method: gptq, bits: 4, group_size: 16, damp: 0.001}", max_tokens=512)
    with pytest.warns(UserWarning, match="not positive definite with damp 0.001"):
        compress.run(recipe, console=Console(file=open(os.devnull, "w")), show_progress=False)
    record = json.loads((recipe.parent / "runs" / "tiny" / "01-quantize" / "step.json").read_text())
    assert record["gptq_raised_damp"]
    assert all(damp == pytest.approx(0.01) for damp in record["gptq_raised_damp"].values())

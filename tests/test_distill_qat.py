"""Distillation and quantization-aware training: the loss terms, the Trainer subclass and the callback inside real
transformers Trainers, the checkpoint QAT writes, and the recipe steps (teachers, bad input, crash and resume).
Tiny random models: only mechanics matter here (quality is tested on SmolLM2 in test_smollm2)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import compress
from compress.config import KD, Distill
from compress.data import training_windows
from compress.distill import DistillationTrainer, distillation_loss, hidden_state_loss, paired_layers
from compress.errors import CompressError
from compress.quantize.grid import (
    fake_quantize,
    minmax_qparams,
    quantizable_linears,
    quantization_args,
    quantized_linears,
)
from compress.quantize.qat import QAT, QATCallback, prepare_qat
from test_pipeline import failing_after, quiet_run


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tokenizer = compress.load(tiny_model_dir)
    return model, tokenizer, training_windows(tokenizer, "wikitext2-valid", 64)


def args(tmp_path, steps=20, lr=1e-3):
    return TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=lr, save_strategy="no", report_to="none", use_cpu=True,
                             disable_tqdm=True, remove_unused_columns=False, logging_strategy="no")


def examples(windows):
    return [{"input_ids": row, "labels": row} for row in windows]


def test_distillation_loss_terms():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 10), torch.randn(6, 10)
    targets = torch.randint(0, 10, (6,))
    t = 2.0
    kl = (F.softmax(teacher / t, -1) * (F.log_softmax(teacher / t, -1) - F.log_softmax(student / t, -1))).sum(-1).mean()
    pure = distillation_loss(student, teacher, targets, KD(temperature=t, alpha=1.0))
    torch.testing.assert_close(pure, kl * t * t)
    mixed = distillation_loss(student, teacher, targets, KD(temperature=t, alpha=0.25))
    torch.testing.assert_close(mixed, 0.25 * kl * t * t + 0.75 * F.cross_entropy(student, targets))
    assert distillation_loss(teacher, teacher, targets, KD(alpha=1.0)).abs() < 1e-6


def test_hidden_states_of_models_with_different_depths_pair_by_depth():
    torch.manual_seed(0)
    teacher = tuple(torch.randn(2, 3, 4) for _ in range(5))  # embeddings + 4 layers
    assert paired_layers(2, 4) == [(1, 2), (2, 4)]
    assert paired_layers(3, 3) == [(1, 1), (2, 2), (3, 3)]
    student = (teacher[0], teacher[2], teacher[4])  # 2 layers that equal the teacher's 2nd and 4th
    assert hidden_state_loss(student, teacher) == 0
    shifted = (teacher[0], teacher[2] + 1, teacher[4])
    expected = (1 / teacher[2].square().mean() + 0) / 2  # relative MSE of each pair, averaged over the pairs
    torch.testing.assert_close(hidden_state_loss(shifted, teacher), expected)


def test_hidden_state_loss_pairs_equal_widths_only():
    states = tuple(torch.randn(2, 3, 8) for _ in range(3))
    assert hidden_state_loss(states, states) == 0
    shifted = (states[0], states[1] + 1, torch.randn(2, 3, 4))  # the last layer is narrower: skipped
    torch.testing.assert_close(hidden_state_loss(shifted, states), 1 / states[1].square().mean())
    with pytest.raises(CompressError, match="set hidden_mse: 0"):
        hidden_state_loss((states[0], torch.randn(2, 3, 4)), states[:2])


def kl_to(teacher, student, windows):
    with torch.no_grad():
        t = F.log_softmax(teacher(input_ids=windows).logits, -1)
        s = F.log_softmax(student(input_ids=windows).logits, -1)
    return F.kl_div(s.flatten(0, 1), t.flatten(0, 1), log_target=True, reduction="batchmean").item()


def test_distillation_trainer_in_a_users_trainer_moves_the_student_to_the_teacher(tiny, tmp_path):
    teacher, _, windows = tiny
    student = compress.prune(copy.deepcopy(teacher), compress.TaylorPrune(importance="l2", ratio=0.5, multiple=16))
    held_out = windows[-8:]
    before = kl_to(teacher, student, held_out)
    grad_enabled_in_teacher = []
    handle = teacher.get_decoder().register_forward_pre_hook(
        lambda *_: grad_enabled_in_teacher.append(torch.is_grad_enabled()))
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args(tmp_path, steps=30),
                                  train_dataset=examples(windows[:-8]), kd=KD(temperature=2.0, alpha=1.0))
    trainer.train()
    handle.remove()
    assert kl_to(teacher, student.eval(), held_out) < 0.8 * before
    # the teacher ran without autograd (nothing of it kept for backward) and was never trained
    assert grad_enabled_in_teacher and not any(grad_enabled_in_teacher)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_distill_with_lora_merges_back_into_plain_weights(tiny):
    teacher, _, windows = tiny
    student = compress.prune(copy.deepcopy(teacher), compress.TaylorPrune(importance="l2", ratio=0.5, multiple=16))
    before = kl_to(teacher, student, windows[-8:])
    config = Distill(steps=20, batch_size=4, seq_len=64, lr=3e-3, kd=KD(alpha=1.0), lora={"r": 8})
    student = compress.distill(student, config, windows[:-8], teacher, show_progress=False)
    assert not any("lora" in name for name, _ in student.named_modules())
    assert kl_to(teacher, student, windows[-8:]) < before


def test_teacher_with_another_vocabulary_is_a_clear_error(tiny):
    from transformers import LlamaConfig, LlamaForCausalLM

    student, _, windows = tiny
    other = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(CompressError, match="different vocabularies .1,000 vs 512"):
        compress.distill(copy.deepcopy(student), Distill(steps=1, batch_size=1), windows, other)


def test_fake_quantization_forward_is_on_the_grid_and_gradients_pass_straight_through():
    linear = torch.nn.Linear(32, 4)
    prepare_qat(torch.nn.Sequential(linear), QAT(bits=3, group_size=16))
    raw = linear.parametrizations.weight.original
    args = quantization_args(QAT(bits=3, group_size=16))
    torch.testing.assert_close(linear.weight, fake_quantize(raw, *minmax_qparams(raw, args), args))
    linear(torch.ones(2, 32)).sum().backward()
    torch.testing.assert_close(raw.grad, torch.ones(4, 32) * 2)  # d/dW of sum(W x) with x = 1, batch 2: identity STE


def test_qat_callback_in_a_users_trainer_writes_a_checkpoint_like_ptq(tiny, tmp_path):
    base, tokenizer, windows = tiny
    model = copy.deepcopy(base).train().requires_grad_(True)
    config = QAT(bits=4, group_size=16)
    untrained = compress.quantize(copy.deepcopy(base), compress.RTN(bits=4, group_size=16))
    Trainer(model=model, args=args(tmp_path, steps=10, lr=1e-3), train_dataset=examples(windows),
            callbacks=[QATCallback(config)]).train()
    # the Trainer's optimizer (built before the callback ran) trained the weights behind the fake quantization
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, untrained.model.layers[0].mlp.down_proj.weight)
    quantized = list(quantized_linears(model))
    assert len(quantized) == len(list(quantizable_linears(model))) > 0
    for _, linear, quant in quantized:  # on the grid: rounding again changes nothing
        torch.testing.assert_close(linear.weight, fake_quantize(linear.weight, quant.scale, quant.zero_point,
                                                                quant.args))
    compress.save_model(model, tokenizer, tmp_path / "qat")
    ids = windows[:2]
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        ours = compress.load(tmp_path / "qat")[0](input_ids=ids).logits
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / "qat", dtype=torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(stock, expected, atol=1e-4, rtol=0)
    assert not any("parametrizations" in name for name, _ in model.named_parameters())


DISTILL_QAT_STEPS = """\
  - prune: {importance: l2, ratio: 0.5, multiple: 16}
  - distill: {kd: {teacher: 00-base, temperature: 2.0, alpha: 0.7, hidden_mse: 0.1},
              steps: 20, batch_size: 4, seq_len: 64, lr: 1.0e-3}
  - quantize: {method: qat, bits: 4, group_size: 16, steps: 10, batch_size: 4, seq_len: 64, lr: 1.0e-4,
               kd: {teacher: base}}"""


def test_distill_and_qat_recipe_steps(tiny_recipe, tmp_path):
    report = quiet_run(tiny_recipe(steps=DISTILL_QAT_STEPS))
    rows = {row["kind"]: row for row in report["steps"]}
    assert rows["distill"]["wikitext2_perplexity"] < rows["prune"]["wikitext2_perplexity"]
    assert math.isfinite(rows["quantize"]["wikitext2_perplexity"])
    assert rows["quantize"]["size_bytes"] < rows["distill"]["size_bytes"]
    model, _ = compress.load(tmp_path / "runs" / "tiny" / "03-quantize")  # a compressed-tensors folder, as PTQ's
    assert model.model.layers[0].mlp.gate_proj.out_features == 64


def test_crash_during_distillation_keeps_earlier_steps_and_resumes(tiny_recipe, tmp_path, monkeypatch):
    original = DistillationTrainer.compute_loss
    monkeypatch.setattr(DistillationTrainer, "compute_loss", failing_after(5, original))  # dies at step 6
    recipe = tiny_recipe(steps=DISTILL_QAT_STEPS)
    with pytest.raises(RuntimeError, match="simulated crash"):
        quiet_run(recipe)
    out = tmp_path / "runs" / "tiny"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["00-base", "01-prune"]
    monkeypatch.setattr(DistillationTrainer, "compute_loss", original)
    report = quiet_run(recipe)
    assert [row["step"] for row in report["steps"]] == ["00-base", "01-prune", "02-distill", "03-quantize"]


@pytest.mark.parametrize("steps,fragment", [
    ("  - distill: {kd: {teacher: 02-finetune}}\n  - finetune: {}",
     "teacher '02-finetune' is not an earlier step"),
    ("  - distill: {kd: {temperature: 0}}", "got 0; allowed: more than 0 and 100"),
    ("  - distill: {kd: {alpha: 1.5}}", "got 1.5; allowed: 0 to 1"),
    ("  - distill: {kd: {teacher: no-such-model}}", "a teacher may also be `base`"),
    ("  - quantize: {method: qat, kd: {teacher: ./missing}}", "does not exist"),
])
def test_bad_distillation_settings_are_recipe_errors(tiny_recipe, steps, fragment):
    with pytest.raises(compress.errors.RecipeError, match=fragment.replace("(", r"\(")):
        compress.load_recipe(tiny_recipe(steps=steps))


def test_empty_training_data_fails_before_any_step(tiny_recipe, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(CompressError, match="is empty"):
        quiet_run(tiny_recipe(steps=f"  - distill: {{data: {empty}}}"))
    assert not (tmp_path / "runs" / "tiny" / "00-base").exists()


# ---------------------------------------------------------------- quantization-aware recovery from a PTQ result


def _gptq(base, windows):
    model = copy.deepcopy(base)
    return compress.quantize(model, compress.GPTQ(bits=4, group_size=16), windows[:8], show_progress=False)


def _codes(linear, quant):
    columns = quant.scale.repeat_interleave(linear.in_features // quant.scale.shape[1], dim=1)
    return torch.round(linear.weight.detach() / columns)


def test_learned_scales_start_at_the_ptq_result_and_train_only_scales(tiny):
    base, _, windows = tiny
    ptq = _gptq(base, windows)
    student = copy.deepcopy(ptq)
    prepare_qat(student, QAT(bits=4, group_size=16, train="scales"))
    with torch.no_grad():  # the forward at step 0 is exactly the PTQ model's
        torch.testing.assert_close(student(input_ids=windows[:2]).logits, ptq(input_ids=windows[:2]).logits,
                                   atol=1e-5, rtol=0)
    trainable = {name for name, p in student.named_parameters() if p.requires_grad and "parametrizations" in name}
    assert trainable and all(name.endswith("parametrizations.weight.0.scale") for name in trainable)
    assert len(trainable) == len(list(quantizable_linears(student)))


def test_scale_gradient_of_fixed_codes_is_the_group_sum(tiny):
    """weight = (q − z)·s with q fixed: ∂L/∂s of a group = Σ over its columns of ∂L/∂w · (q − z), by hand."""
    linear = torch.nn.Linear(32, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(2, 32))
    config = QAT(bits=4, group_size=16, train="scales")
    prepare_qat(torch.nn.Sequential(linear), config)
    learned = linear.parametrizations.weight[0]
    codes = linear.parametrizations.weight.original.detach()
    x = torch.randn(5, 32)
    linear(x).pow(2).sum().backward()
    grad_w = 2 * (x @ linear.weight.detach().T).T @ x  # ∂/∂W of Σ (W x)²
    expected = (grad_w * codes).reshape(2, 2, 16).sum(-1)  # symmetric: z = 0
    torch.testing.assert_close(learned.scale.grad, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("train", ["scales", "weights_and_scales"])
def test_qat_recovery_after_gptq_keeps_the_grid_and_moves_toward_the_teacher(tiny, tmp_path, train):
    base, tokenizer, windows = tiny
    ptq = _gptq(base, windows)
    before = {name: (_codes(linear, quant), quant.scale.clone()) for name, linear, quant in quantized_linears(ptq)}
    student = copy.deepcopy(ptq)
    config = QAT(bits=4, group_size=16, train=train, steps=10, batch_size=4, seq_len=64, lr=1e-5, kd=KD(alpha=1.0))
    compress.quantize(student, config, train_data=windows, teacher=base, show_progress=False)
    after = {name: (linear, quant) for name, linear, quant in quantized_linears(student)}
    assert set(after) == set(before)
    for name, (linear, quant) in after.items():  # on the grid it records
        torch.testing.assert_close(linear.weight, fake_quantize(linear.weight, quant.scale, quant.zero_point,
                                                                quant.args))
    name = "model.layers.0.mlp.down_proj"
    linear, quant = after[name]
    assert not torch.equal(quant.scale, before[name][1])  # the scales trained
    if train == "scales":  # the integer codes did not move
        assert torch.equal(_codes(linear, quant), before[name][0])
    assert kl_to(base, student, windows[:64]) < kl_to(base, ptq, windows[:64])
    compress.save_model(student, tokenizer, tmp_path / "recovered")
    with torch.no_grad():
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / "recovered", dtype=torch.float32)
        torch.testing.assert_close(stock(input_ids=windows[:2]).logits, student(input_ids=windows[:2]).logits,
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("scale_space", ["linear", "log"])
def test_adams_first_step_moves_linear_scales_by_lr_and_log_scales_by_a_factor(tiny, scale_space):
    """Adam's first step moves every trained parameter by lr·|g|/(|g| + eps), lr where the gradient g is far above
    eps: a scale trained as itself moves by lr whatever its size; trained as its logarithm (scale_space: log), by
    the factor e^±lr. After GPTQ, one step. (In log space a gradient is s times smaller, so more groups meet eps.)"""
    base, _, windows = tiny
    ptq = _gptq(base, windows)
    before = {name: quant.scale.clone() for name, _, quant in quantized_linears(ptq)}
    lr = 1e-4 if scale_space == "linear" else 1e-2
    student = copy.deepcopy(ptq)
    config = QAT(bits=4, group_size=16, train="scales", steps=1, warmup_ratio=0, batch_size=4, seq_len=64, lr=lr,
                 scale_space=scale_space)
    compress.quantize(student, config, train_data=windows, show_progress=False)
    after = {name: quant.scale for name, _, quant in quantized_linears(student)}
    moved = torch.cat([(after[name] - before[name]).flatten() for name in before])
    ratio = torch.cat([(after[name] / before[name]).log().flatten() for name in before])
    steps = moved.abs() if scale_space == "linear" else ratio.abs()
    steps = steps[steps > 0]  # a group whose gradient is zero does not move
    assert steps.numel() > 0.9 * moved.numel()
    assert (steps <= lr * 1.002).all() and abs(steps.median().item() / lr - 1) < 0.01, (steps.max(), steps.median())
    if scale_space == "linear":  # the same amount is a different fraction of each scale
        assert ratio.abs().max() > 3 * ratio.abs()[ratio != 0].min()


def test_log_space_needs_learned_scales():
    with pytest.raises(ValueError, match="train: weights learns no scales"):
        QAT(bits=4, group_size=16, scale_space="log")


def test_qat_recovery_bad_input(tiny):
    base, _, windows = tiny
    ptq = _gptq(base, windows)
    with pytest.raises(CompressError, match="not on this step's grid"):
        compress.quantize(copy.deepcopy(ptq), QAT(bits=4, group_size=32, train="scales", steps=1, batch_size=4,
                                                  seq_len=64), train_data=windows)
    with pytest.raises(CompressError, match="cannot start from a quantized model's scales"):
        compress.quantize(copy.deepcopy(ptq), QAT(bits=4, group_size=16, steps=1, batch_size=4, seq_len=64),
                          train_data=windows)
    with pytest.raises(CompressError, match="teacher is quantized"):
        compress.quantize(copy.deepcopy(ptq), QAT(bits=4, group_size=16, train="scales", steps=1, batch_size=4,
                                                  seq_len=64, kd=KD()), train_data=windows, teacher=ptq)


def test_qat_holds_learned_scales_above_a_floor_and_names_them(tiny):
    """Adam moves a scale by about lr per step whatever its size: a learning rate far above the scales drives many
    toward zero; each is held at 1/1000 of its start (positive, the grid stays usable) and the layers are named."""
    from compress.quantize.qat import SCALE_FLOOR

    base, _, windows = tiny
    ptq = _gptq(base, windows)
    start = {name: quant.scale.clone() for name, _, quant in quantized_linears(ptq)}
    student = copy.deepcopy(ptq)
    with pytest.warns(UserWarning, match=r"QAT: \d+ learned scale\(s\) were held at 0.001 of their starting value"
                                         r".*model\.layers\.\d+\.\S+ \(\d+\)"):
        compress.quantize(student, QAT(bits=4, group_size=16, train="scales", steps=3, batch_size=4, seq_len=64,
                                       lr=1.0, warmup_ratio=0.0), train_data=windows)
    held = 0
    for name, linear, quant in quantized_linears(student):
        floor = start[name] * SCALE_FLOOR
        assert (quant.scale >= floor * (1 - 1e-6)).all()  # none below its floor: all positive
        held += int(torch.isclose(quant.scale, floor, rtol=1e-5).sum())
        assert torch.isfinite(linear.weight).all()
    assert held > 0  # the floor did act (without it these scales went negative)


QAT_RECOVERY_STEPS = """\
  - finetune: {steps: 2, batch_size: 4, seq_len: 64}
  - quantize: {method: gptq, bits: 4, group_size: 16, calibration: {samples: 4, seq_len: 64}}
  - quantize: {method: qat, bits: 4, group_size: 16, train: scales, steps: 2, batch_size: 4, seq_len: 64, kd: {}}"""


def test_recipe_qat_after_gptq_distils_from_the_model_before_quantization(tiny_recipe, tmp_path):
    recipe = compress.load_recipe(tiny_recipe(steps=QAT_RECOVERY_STEPS))
    assert recipe.steps[2].config.kd.teacher is None
    assert recipe.resolved().steps[2].config.kd.teacher == "01-finetune"  # not 02-quantize: that one is quantized
    with pytest.raises(compress.errors.RecipeError, match="teacher '02-quantize' is quantized"):
        compress.load_recipe(tiny_recipe(steps=QAT_RECOVERY_STEPS.replace("kd: {}", "kd: {teacher: 02-quantize}")))
    report = quiet_run(tiny_recipe(steps=QAT_RECOVERY_STEPS))
    assert [row["step"] for row in report["steps"]][-1] == "03-quantize"
    out = tmp_path / "runs" / "tiny"
    sensitivity = json.loads((out / "02-quantize" / "step.json").read_text())["sensitivity"]
    assert len(sensitivity) == 14 and all(0 < error < 1 for error in sensitivity.values())  # GPTQ measured each
    assert "sensitivity" not in json.loads((out / "01-finetune" / "step.json").read_text())
    worst = max(sensitivity, key=sensitivity.get)
    assert list(report["steps"][2]["most_sensitive"])[0] == worst
    assert f"`{worst}` {sensitivity[worst]:.4f}" in (out / "report.md").read_text()


@pytest.mark.parametrize("verb", ["finetune", "distill"])
def test_training_leaves_the_kv_cache_on_in_what_it_saves(tiny_model_dir, tmp_path, verb):
    # the Trainer turns config.use_cache off; a saved step would then decode without a KV cache (2.6x slower
    # generation of the SmolLM2 demo's pruned step on CPU, found by compress bench)
    import json

    from compress.checkpoint import save_model
    from compress.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir))
    windows = torch.randint(0, model.config.vocab_size, (8, 16))
    if verb == "finetune":
        trained = compress.finetune(model, compress.LoRARecovery(steps=1, batch_size=4, seq_len=16), windows,
                                    show_progress=False)
    else:
        teacher, _ = load_model(str(tiny_model_dir))
        trained = compress.distill(model, compress.Distill(steps=1, batch_size=4, seq_len=16), windows, teacher,
                                   show_progress=False)
    save_model(trained, tokenizer, tmp_path / "trained")
    assert json.loads((tmp_path / "trained" / "config.json").read_text())["use_cache"] is True

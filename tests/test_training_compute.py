"""How the training steps compute, not what they learn: QAT's learned-scale weight is built per group without
expanding the scales (bit-identical to the expanded formula), and `autocast: bfloat16` runs the forward passes of
LoRA, distillation and QAT in bfloat16 while the weights and their updates stay in the model's dtype."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

import compress
from compress.config import KD, QAT, Distill, LoRARecovery
from compress.data import training_windows
from compress.quantize.qat import _LearnedScales


def _expanded(weight, scale, zero, codes, qmin=-8, qmax=7):
    """The formula with every group's scale and zero point repeated over its columns (rounding straight-through)."""
    width = weight.shape[1] // scale.shape[1]
    s, z = scale.repeat_interleave(width, 1), zero.repeat_interleave(width, 1)
    x = weight / s
    q = weight if codes else torch.clamp(x + (torch.round(x) - x).detach() + z, qmin, qmax)
    return (q - z) * s


@pytest.mark.parametrize("codes", [True, False])
@pytest.mark.parametrize("asymmetric", [False, True])
def test_learned_scales_weight_equals_the_expanded_formula(codes, asymmetric):
    torch.manual_seed(0)
    rows, cols, group = 6, 128, 32
    scale = torch.rand(rows, cols // group) * 0.01 + 1e-3
    zero = torch.randint(-2, 3, scale.shape).float() if asymmetric else torch.zeros_like(scale)
    weight = torch.randint(-8, 8, (rows, cols)).float() if codes else torch.randn(rows, cols) * 0.02
    learned = _LearnedScales(SimpleNamespace(num_bits=4), scale, zero if asymmetric else None, codes=codes)
    built = learned(weight)
    assert torch.equal(built, _expanded(weight, scale, zero, codes))
    # the scale's gradient is the group sum of ∂L/∂w · (q − z), as with the expanded scales
    upstream = torch.randn(rows, cols)
    (built * upstream).sum().backward()
    expanded_scale = scale.clone().requires_grad_(True)
    (_expanded(weight, expanded_scale, zero, codes) * upstream).sum().backward()
    torch.testing.assert_close(learned.scale.grad, expanded_scale.grad, rtol=1e-4, atol=1e-5)  # summation order


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tokenizer = compress.load(tiny_model_dir)
    return model, tokenizer, training_windows(tokenizer, "wikitext2-valid", 32)


def _matmul_dtypes(model):
    """Record the input dtype of every Linear's forward."""
    seen = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, args, out: seen.add(out.dtype))
    return seen


BUDGET = dict(steps=2, batch_size=4, seq_len=32, warmup_ratio=0.0, lr=1e-3)


@pytest.mark.parametrize("autocast", ["off", "bfloat16"])
def test_lora_autocast_computes_in_bfloat16_and_keeps_float32_weights(tiny, autocast):
    base, _, windows = tiny
    model = copy.deepcopy(base)
    seen = _matmul_dtypes(model)
    trained = compress.finetune(model, LoRARecovery(**BUDGET, autocast=autocast), windows[:8], show_progress=False)
    assert seen == ({torch.bfloat16} if autocast == "bfloat16" else {torch.float32})
    assert all(p.dtype == torch.float32 for p in trained.parameters())
    changed = any(not torch.equal(a, b) for a, b in zip(trained.parameters(), base.parameters()))
    assert changed and all(torch.isfinite(p).all() for p in trained.parameters())


def test_distillation_and_qat_autocast_run_teacher_and_student_in_bfloat16(tiny):
    base, _, windows = tiny
    teacher = copy.deepcopy(base)
    teacher_seen = _matmul_dtypes(teacher)
    student = copy.deepcopy(base)
    student_seen = _matmul_dtypes(student)
    compress.distill(student, Distill(**BUDGET, autocast="bfloat16", kd=KD()), windows[:8], teacher,
                     show_progress=False)
    assert teacher_seen == {torch.bfloat16} and student_seen == {torch.bfloat16}
    from compress.quantize.qat import quantize_qat

    qat_student = copy.deepcopy(base)
    quantized = quantize_qat(qat_student, QAT(bits=4, group_size=16, **BUDGET, autocast="bfloat16", kd=KD()),
                             windows[:8], teacher=teacher, show_progress=False)
    assert all(p.dtype == torch.float32 for p in quantized.parameters())
    assert all(torch.isfinite(p).all() for p in quantized.parameters())

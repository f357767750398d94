"""Quantization-aware training: train with every decoder Linear's weight fake-quantized onto the integer grid the
checkpoint will hold, so the network learns to live with the rounding; then round for real.

1. prepare: a parametrization replaces each weight W by  W + stopgrad(Q(W) − W), where Q rounds onto the grid
   (round-to-nearest, group scales from min/max: exactly RTN's and the saved checkpoint's grid). The forward sees
   Q(W); the gradient passes straight through to W (straight-through estimator, Bengio et al. 2013).
2. train: transformers' Trainer on text windows — optionally distilling from a teacher (quantization-aware
   distillation), through DistillationTrainer.
3. convert: drop the parametrizations and round W onto the grid (RTN), recording the grid for saving. The result is
   the same kind of model PTQ returns: it saves to the same compressed-tensors (or GPTQ) checkpoint and loads the
   same way.

`QATCallback` runs steps 1 and 3 around a user's own Trainer."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch.nn.utils import parametrize
from transformers import TrainerCallback

from compress.quantize.grid import WeightOnlyConfig, check_group_size, fake_quantize, minmax_qparams, quantizable_linears
from compress.quantize.rtn import RTN, quantize_rtn
from compress.training import TrainingBudget, train


class QAT(WeightOnlyConfig, TrainingBudget):
    """Recipe: `quantize: {method: qat, bits: 3, group_size: 64, steps: 300, distill_from: base}`."""

    method: Literal["qat"] = "qat"
    lr: float = Field(2e-5, gt=0, description="full-weight training: far below LoRA's rates")
    distill_from: str | None = Field(None, description="a teacher to distill from while training (base, an earlier "
                                                       "step's folder, or any model source); None: plain LM loss")
    temperature: float = Field(2.0, gt=0, description="distillation temperature (with distill_from)")
    alpha: float = Field(1.0, ge=0, le=1, description="distillation weight; 1 - alpha weights the CE (with distill_from)")

    @field_validator("distill_from")
    @classmethod
    def _teacher(cls, value: str | None) -> str | None:
        from compress.models import check_teacher_name

        return None if value is None else check_teacher_name(value)

    def describe(self) -> str:
        teacher = f", distilling from {self.distill_from} (T={self.temperature:g}, alpha={self.alpha:g})" \
            if self.distill_from else ""
        return f"QAT {self.grid()}, {self.budget()}{teacher}"


class _FakeQuantized(torch.nn.Module):
    """Parametrization: the weight as the forward sees it, on the grid, with a straight-through gradient."""

    def __init__(self, config: WeightOnlyConfig):
        super().__init__()
        self.args = config.quantization_args()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            scale, zero_point = minmax_qparams(weight, self.args)
            rounding = fake_quantize(weight, scale, zero_point, self.args) - weight
        return weight + rounding


def prepare_qat(model: torch.nn.Module, config: WeightOnlyConfig) -> torch.nn.Module:
    """Fake-quantize every decoder Linear's weight (in place). The weight Parameter objects stay the same, so an
    optimizer created before this call still trains them."""
    check_group_size(model, config.group_size)
    for _, linear in quantizable_linears(model):
        if not parametrize.is_parametrized(linear, "weight"):
            parametrize.register_parametrization(linear, "weight", _FakeQuantized(config))
    return model


def convert_qat(model: torch.nn.Module, config: WeightOnlyConfig) -> torch.nn.Module:
    """Remove the fake quantization and round the trained weights onto the same grid for real."""
    for _, linear in quantizable_linears(model):
        if parametrize.is_parametrized(linear, "weight"):
            parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)
    grid = RTN(bits=config.bits, group_size=config.group_size, sym=config.sym, format=config.format)
    return quantize_rtn(model, grid, show_progress=False)


class QATCallback(TrainerCallback):
    """Quantization-aware training inside any transformers Trainer:
    `Trainer(..., callbacks=[compress.QATCallback(compress.QAT(bits=4, group_size=128))])`. Fake quantization goes
    in when training begins; when it ends the weights are rounded onto the grid and `compress.save_model` writes
    the quantized checkpoint. Any weight-only config gives the grid (QAT, RTN or GPTQ settings)."""

    def __init__(self, config: WeightOnlyConfig | None = None):
        self.config = config or QAT()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        prepare_qat(model, self.config)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        convert_qat(model, self.config)


def quantize_qat(model: torch.nn.Module, config: QAT, train_data: torch.Tensor | list[dict],
                 teacher: torch.nn.Module | None = None, seed: int = 0, show_progress: bool = True) -> torch.nn.Module:
    """QAT on `train_data` (token windows [windows, seq_len] or `compress.training.training_examples`), distilling from `teacher` when given; returns the model
    with weights on the grid, ready for `save_model`."""
    prepare_qat(model, config)
    model.train().requires_grad_(True)  # every weight trains (e.g. a copy of a frozen teacher)
    if teacher is None:
        train(model, config, train_data, seed=seed, show_progress=show_progress)
    else:
        from compress.distill import Distill, DistillationTrainer

        loss = Distill(temperature=config.temperature, alpha=config.alpha)
        train(model, config, train_data, seed=seed, show_progress=show_progress, trainer_class=DistillationTrainer,
              teacher=teacher, distill=loss)
    return convert_qat(model, config).eval()

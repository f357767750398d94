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

import torch
from torch.nn.utils import parametrize
from transformers import TrainerCallback

from compress.config.quantize import QAT, RTN, WeightOnlyConfig
from compress.errors import CompressError
from compress.modules import require_float
from compress.quantize.grid import check_group_size, fake_quantize, minmax_qparams, quantizable_linears, quantization_args
from compress.quantize.rtn import quantize_rtn
from compress.training import train


class _FakeQuantized(torch.nn.Module):
    """Parametrization: the weight as the forward sees it, on the grid, with a straight-through gradient."""

    def __init__(self, config: WeightOnlyConfig):
        super().__init__()
        self.args = quantization_args(config)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            scale, zero_point = minmax_qparams(weight, self.args)
            rounding = fake_quantize(weight, scale, zero_point, self.args) - weight
        return weight + rounding


def prepare_qat(model: torch.nn.Module, config: WeightOnlyConfig) -> torch.nn.Module:
    """Fake-quantize every decoder Linear's weight (in place). The weight Parameter objects stay the same, so an
    optimizer created before this call still trains them."""
    require_float(model, "QAT", "it starts from float weights and rounds them itself")
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
                 teacher: torch.nn.Module | None = None, seed: int = 0, *, show_progress: bool = True
                 ) -> torch.nn.Module:
    """QAT on `train_data` (token windows [windows, seq_len] or `compress.training.training_examples`), distilling
    from `teacher` when the config has a `kd` block; returns the model with weights on the grid, ready for
    `save_model`."""
    if config.kd is not None and teacher is None:
        raise CompressError(f"QAT with kd needs the teacher model ({config.kd.teacher}); pass teacher=")
    prepare_qat(model, config)
    model.train().requires_grad_(True)  # every weight trains (e.g. a copy of a frozen teacher)
    if config.kd is None:
        train(model, config, train_data, seed=seed, show_progress=show_progress)
    else:
        from compress.distill import DistillationTrainer

        train(model, config, train_data, seed=seed, show_progress=show_progress, trainer_class=DistillationTrainer,
              teacher=teacher, kd=config.kd)
    return convert_qat(model, config).eval()

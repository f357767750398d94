"""Quantization-aware training: train with every decoder Linear's weight on the integer grid the checkpoint will hold,
so the network learns to live with the rounding; then round for real.

1. prepare: a parametrization replaces each weight by its value on the grid, with a straight-through gradient for
   the rounding (Bengio et al. 2013). What trains (`train`):
   - weights: the float weights W; the forward sees Q(W), each group's scale from its min and max at every step
     (round-to-nearest's grid, recomputed);
   - weights_and_scales: W and each group's scale s; the forward sees (clamp(⌊W/s⌉ + z) − z)·s, whose gradient in s
     is LSQ's (Esser et al. 2020);
   - scales: only s; the integer codes q are fixed and the forward sees (q − z)·s (EfficientQAT's end-to-end
     training of the quantization parameters, Chen et al. 2024: one trained number per group, the memory-lean
     choice for large models).
   Started on a quantized model (after GPTQ, AWQ or RTN on the same grid), the codes, scales and zero points are
   that step's, so training starts exactly at the PTQ result; on a float model, at round-to-nearest's.
2. train: transformers' Trainer, optionally distilling from a teacher (quantization-aware distillation, through
   DistillationTrainer). After every optimizer step each learned scale is held at or above a thousandth of its
   starting value (a projected step): Adam moves every parameter by about the learning rate whatever its size, so a
   group of near-zero weights, whose scale is smaller than one step, would otherwise cross zero. The scales held are
   counted and named in one warning; a NaN scale stops training with the layer named.
3. convert: drop the parametrizations and write the weights on the grid (the trained codes and scales), recording
   the grid for saving: the same compressed-tensors (or GPTQ) checkpoint PTQ writes.

`QATCallback` runs steps 1 and 3 around a user's own Trainer."""

from __future__ import annotations

import warnings

import torch
from torch.nn.utils import parametrize
from transformers import TrainerCallback

from compress.config.quantize import QAT, RTN, WeightOnlyConfig
from compress.errors import CompressError
from compress.modules import QUANT_ATTR, WeightQuant, is_quantized
from compress.moe import unfuse_experts
from compress.quantize.grid import (
    check_group_size,
    fake_quantize,
    minmax_qparams,
    quantizable_linears,
    quantization_args,
)
from compress.quantize.rtn import quantize_rtn


class _MinMaxFakeQuantized(torch.nn.Module):
    """train: weights. The weight as the forward sees it, on the min/max grid, with a straight-through gradient."""

    def __init__(self, args):
        super().__init__()
        self.args = args

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            scale, zero_point = minmax_qparams(weight, self.args)
            rounding = fake_quantize(weight, scale, zero_point, self.args) - weight
        return weight + rounding


def _round_straight_through(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


SCALE_FLOOR = 1e-3  # of each group's starting scale: the lowest a learned scale may go (see the module's step 2)


class _LearnedScales(torch.nn.Module):
    """train: scales or weights_and_scales. Each group's scale (or, log_space, its logarithm) is a Parameter; the
    zero point stays fixed. With `codes`, the parametrized tensor holds the integer codes q and the forward is
    (q − z)·s; otherwise it holds float weights W and the forward is (clamp(⌊W/s⌉ + z, qmin, qmax) − z)·s."""

    def __init__(self, args, scale: torch.Tensor, zero_point: torch.Tensor | None, codes: bool,
                 log_space: bool = False):
        super().__init__()
        self.args, self.codes, self.log_space = args, codes, log_space
        scale = scale.detach().float().clone()
        floor = (scale.abs() * SCALE_FLOOR).clamp(min=torch.finfo(torch.float32).tiny)
        # the Parameter: `scale` itself, or (log_space) `log_scale`, held at or above the floor (or its logarithm)
        if log_space:  # a zero scale (an all-zero group) starts at the floor: log 0 would be −inf
            self.log_scale = torch.nn.Parameter(torch.maximum(scale, floor).log())
        else:
            self.scale = torch.nn.Parameter(scale)
        self.register_buffer("floor", floor.log() if log_space else floor, persistent=False)
        self.register_buffer("held", torch.zeros_like(scale, dtype=torch.bool), persistent=False)  # so far
        self.register_buffer("zero_point", torch.zeros_like(scale) if zero_point is None
                             else zero_point.detach().float().clone())
        self.qmin, self.qmax = -(2 ** (args.num_bits - 1)), 2 ** (args.num_bits - 1) - 1
        self.zero_is_nonzero = bool(self.zero_point.any())  # the zero point never trains

    @torch.no_grad()
    def hold_above_floor(self) -> None:
        """The projected step: scales below their floor go back up to it (a NaN stays NaN, to be reported); no
        synchronisation with the GPU."""
        self.held |= self.trained < self.floor
        self.trained.copy_(torch.maximum(self.trained, self.floor))

    @property
    def trained(self) -> torch.nn.Parameter:
        return self.log_scale if self.log_space else self.scale

    def scales(self) -> torch.Tensor:
        """Each group's scale [rows, groups] (float32), differentiable in the trained Parameter."""
        return self.log_scale.exp() if self.log_space else self.scale

    @torch.no_grad()
    def set_scale(self, scale: torch.Tensor) -> None:
        self.trained.copy_(scale.log() if self.log_space else scale)

    def columns(self, values: torch.Tensor, width: int) -> torch.Tensor:
        return values.repeat_interleave(width // values.shape[1], dim=1)

    def grouped(self, weight: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`weight` [rows, cols] viewed as [rows, groups, group size] and `values` [rows, groups] as [rows, groups,
        1], to broadcast: a group's scale or zero point is never expanded to the weight's size (repeat_interleave
        wrote two full-size copies in every forward and summed them back in every backward)."""
        rows, groups = values.shape
        return weight.view(rows, groups, weight.shape[1] // groups), values.unsqueeze(2)

    def round_to_codes(self, weight: torch.Tensor) -> torch.Tensor:
        """clamp(⌊W/s⌉ + z): float weights onto the grid's integers, with a straight-through gradient."""
        grouped, scale = self.grouped(weight.float(), self.scales())
        codes = _round_straight_through(grouped / scale)
        if self.zero_is_nonzero:
            codes = codes + self.zero_point.unsqueeze(2)
        return torch.clamp(codes, self.qmin, self.qmax).view(weight.shape)

    def integer_codes(self, weight: torch.Tensor) -> torch.Tensor:
        """The grid's integers for the parametrized tensor (the codes themselves, when they are what is stored)."""
        return weight.float() if self.codes else self.round_to_codes(weight)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        codes, scale = self.grouped(self.integer_codes(weight), self.scales())
        if self.zero_is_nonzero:  # symmetric grids have z = 0: q − 0 is q exactly, so the subtraction is skipped
            codes = codes - self.zero_point.unsqueeze(2)
        return (codes * scale).view(weight.shape).to(weight.dtype)


def _starting_grid(linear: torch.nn.Linear, args, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scale and zero point training starts from: the quantized input's own (checked to be this config's grid),
    else round-to-nearest's."""
    quant = getattr(linear, QUANT_ATTR, None)
    if quant is None:
        return minmax_qparams(linear.weight, args)
    same = (quant.args.num_bits, quant.args.group_size, quant.args.symmetric, quant.args.type) == (
        args.num_bits, args.group_size, args.symmetric, args.type)
    if not same:
        group = "per-channel" if quant.args.group_size is None else f"g{quant.args.group_size}"
        raise CompressError(f"QAT on {name}: the input is quantized as {quant.args.type} W{quant.args.num_bits} "
                            f"{group} {'sym' if quant.args.symmetric else 'asym'}, not on this step's grid; give "
                            f"the QAT step the same bits, group_size and sym as the quantize step before it")
    return quant.scale.to(linear.weight.device), (None if quant.zero_point is None
                                                  else quant.zero_point.to(linear.weight.device))


def prepare_qat(model: torch.nn.Module, config: WeightOnlyConfig, train: str | None = None) -> torch.nn.Module:
    """Put every decoder Linear's weight on the grid for training (in place); `train` defaults to the config's
    (QAT) or "weights" (any other weight-only config). With train "weights", the weight Parameters stay the same
    objects, so an optimizer created before this call still trains them."""
    train = train or getattr(config, "train", "weights")
    check_group_size(model, config.group_size)
    args = quantization_args(config)
    for name, linear in quantizable_linears(model, keep_float=config.ignore):
        if parametrize.is_parametrized(linear, "weight"):
            continue
        if train == "weights":
            parametrize.register_parametrization(linear, "weight", _MinMaxFakeQuantized(args))
            continue
        scale, zero_point = _starting_grid(linear, args, name)
        learned = _LearnedScales(args, scale, zero_point, codes=train == "scales",
                                 log_space=getattr(config, "scale_space", "linear") == "log")
        if train == "scales":
            with torch.no_grad():  # store the integer codes; the forward rebuilds the weight from them
                linear.weight.copy_(learned.round_to_codes(linear.weight).to(linear.weight.dtype))
        parametrize.register_parametrization(linear, "weight", learned)
        linear.parametrizations.weight.original.requires_grad_(train != "scales")
        if hasattr(linear, QUANT_ATTR):
            delattr(linear, QUANT_ATTR)  # the grid now lives in the parametrization, and is written back at the end
    _freeze_grids_not_trained(model)
    return model


def _learned_scales(model: torch.nn.Module):
    for name, linear in quantizable_linears(model):
        if parametrize.is_parametrized(linear, "weight") and isinstance(linear.parametrizations.weight[0],
                                                                         _LearnedScales):
            yield name, linear.parametrizations.weight[0]


def hold_and_check_scales(model: torch.nn.Module) -> None:
    """After an optimizer step: every learned scale back above its floor, and a stop with the layer named if one
    is NaN."""
    for name, learned in _learned_scales(model):
        learned.hold_above_floor()
        bad = torch.isnan(learned.trained)
        if bad.any():
            raise CompressError(f"QAT: {int(bad.sum())} scales of {name} became NaN; lower lr (now too large for the "
                                f"scales), or train: weights")


def _warn_scales_held(model: torch.nn.Module) -> None:
    held = {name: int(learned.held.sum()) for name, learned in _learned_scales(model) if learned.held.any()}
    if held:
        total = sum(held.values())
        named = ", ".join(f"{name} ({count})" for name, count in list(held.items())[:3])
        more = ", ..." if len(held) > 3 else ""
        warnings.warn(f"QAT: {total} learned scale(s) were held at {SCALE_FLOOR:g} of their starting value, where "
                      f"a step would have taken them lower (to zero or below, at worst): {named}{more}; "
                      f"groups of near-zero weights do this at any lr, many of them mean lr is too large for the "
                      f"scales", stacklevel=2)


@torch.no_grad()
def convert_qat(model: torch.nn.Module, config: WeightOnlyConfig) -> torch.nn.Module:
    """Remove the training parametrizations and write each weight onto its grid for real, recording the grid."""
    args = quantization_args(config)
    hold_and_check_scales(model)
    _warn_scales_held(model)
    minmax = []
    for name, linear in quantizable_linears(model):
        if not parametrize.is_parametrized(linear, "weight"):
            continue
        learned = linear.parametrizations.weight[0]
        if not isinstance(learned, _LearnedScales):
            parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)
            minmax.append(linear)
            continue
        stored = linear.parametrizations.weight.original
        scale = learned.scales()
        if args.scale_dtype is not None:
            scale = scale.to(args.scale_dtype).float()
        learned.set_scale(scale)  # the scales as the checkpoint stores them
        codes = learned.integer_codes(stored)
        width = stored.shape[1]
        weight = (codes - learned.columns(learned.zero_point, width)) * learned.columns(scale, width)
        zero_point = learned.zero_point.to(args.zp_dtype or torch.int8)
        parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)
        # through compressed-tensors' own rounding, so memory holds exactly what a loader decompresses
        linear.weight.copy_(fake_quantize(weight.to(linear.weight.dtype), scale, zero_point, args))
        setattr(linear, QUANT_ATTR, WeightQuant(args, scale.detach().clone(), zero_point))
    if minmax:
        grid = RTN(bits=config.bits, group_size=config.group_size, sym=config.sym, format=config.format,
                   ignore=config.ignore)
        quantize_rtn(model, grid, show_progress=False)
    return model


class QATCallback(TrainerCallback):
    """Quantization-aware training inside any transformers Trainer:
    `Trainer(..., callbacks=[compress.QATCallback(compress.QAT(bits=4, group_size=128))])`. The weights go onto the
    grid when training begins (create the Trainer after the callback's `prepare` when `train` learns scales, so
    the optimizer sees them: `callback.prepare(model)`); when it ends they are rounded for real and
    `compress.save_model` writes the quantized checkpoint. Any weight-only config gives the grid."""

    def __init__(self, config: WeightOnlyConfig | None = None):
        self.config = config or QAT()
        self.train = getattr(self.config, "train", "weights")

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return prepare_qat(model, self.config, self.train)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.prepare(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.train != "weights":
            hold_and_check_scales(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        convert_qat(model, self.config)


def quantize_qat(model: torch.nn.Module, config: QAT, train_data: torch.Tensor | list[dict],
                 teacher: torch.nn.Module | None = None, seed: int = 0, *, show_progress: bool = True
                 ) -> torch.nn.Module:
    """QAT on `train_data` (token windows [windows, seq_len] or `compress.training.training_examples`), distilling
    from `teacher` when the config has a `kd` block; returns the model with weights on the grid, ready for
    `save_model`. On a quantized model (a PTQ result on the same grid) training starts from its codes and scales."""
    from compress.training import train

    if config.kd is not None and teacher is None:
        teacher_name = config.kd.teacher or "the model before quantization"
        raise CompressError(f"QAT with kd needs the teacher model ({teacher_name}); pass teacher=")
    if teacher is not None and is_quantized(teacher):
        raise CompressError("the QAT teacher is quantized: it would teach its own rounding errors; distil from the "
                            "model before quantization")
    if is_quantized(model) and config.train == "weights":
        raise CompressError("QAT train: weights recomputes each group's scale from min/max, so it cannot start from "
                            "a quantized model's scales; use train: scales or weights_and_scales after a PTQ step")
    if config.sharding != "replicate":
        raise CompressError(f"QAT with sharding: {config.sharding} is not built: the grid conversion when training "
                            f"ends needs whole weights on each process; use sharding: replicate")
    unfuse_experts(model)  # MoE: one Linear per expert projection (compress.moe)
    callback = QATCallback(config)
    model.requires_grad_(True)  # every weight may train (e.g. a copy of a frozen teacher); prepare freezes codes
    callback.prepare(model)
    model.train()
    kwargs = {} if config.kd is None else dict(trainer_class=_distillation_trainer(), teacher=teacher, kd=config.kd)
    train(model, config, train_data, seed=seed, show_progress=show_progress, callbacks=[callback],
          step=f"quantize (QAT, train: {config.train})", **kwargs)
    return model.eval()  # the callback rounded the weights onto the grid when training ended


def _freeze_grids_not_trained(model: torch.nn.Module) -> None:
    """Modules an earlier step put on a grid that QAT does not train (a quantized head or embedding) keep their
    weights: trained freely they would leave the grid their recorded scales describe."""
    for module in model.modules():
        if getattr(module, QUANT_ATTR, None) is not None and not parametrize.is_parametrized(module, "weight"):
            module.weight.requires_grad_(False)


def _distillation_trainer():
    from compress.distill import DistillationTrainer

    return DistillationTrainer

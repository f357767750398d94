"""SmoothQuant: Xiao, Lin, Seznec, Wu, Demouth, Han, "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models" (ICML 2023).

A few input channels of an LLM's Linears carry activations 10-100x larger than the rest, so rounding each token's
activations to int8 with one scale loses the small channels. Dividing channel j of the input by s_j and multiplying
weight column j by s_j computes the same function and moves part of the range into the weights, which are rounded
per output channel and tolerate it. Per decoder layer, for each group of Linears that read one input:
  1. statistics: max|X_j|, each input channel's largest magnitude over the calibration set, from the float model;
  2. scales (paper eq. 4): s_j = max|X_j|^α / max|W_j|^(1−α), with max|W_j| over the group's columns j; α is the
     migration strength, fixed or (`alpha: search`) chosen per group from 0, 0.1, ..., 1 by the output error of the
     group's W8A8 Linears on a sample of the calibration tokens;
  3. fold: the op before the group (its norm, or the previous Linear's rows) is divided by s, the group's columns
     multiplied by s — AWQ's fold and AWQ's groups (compress.quantize.awq, from the families table), so the float
     model computes exactly what it did;
  4. round: the weights to int8, one scale per output channel, symmetric: round-to-nearest, or GPTQ over the whole
     smoothed model (`gptq:`); every quantized Linear then quantizes its input to int8 per token at run time
     (compress.quantize.int8_runtime).
Saved as compressed-tensors `int-quantized` with dynamic per-token int8 input activations: the W8A8 int8 scheme vLLM
serves with its int8 GEMMs. Decoder layers are visited in order on the float outputs of the layers before them; under
several processes the maxima are reduced over the ranks and rank 0's layer is kept.
"""

from __future__ import annotations

import warnings

import torch
from rich.progress import Progress

from compress import distributed
from compress.architectures import family
from compress.config.quantize import GPTQ, SmoothQuant
from compress.errors import CompressError
from compress.modules import decoder_layers, kept_float, require_float
from compress.quantize.awq import ScaledGroup, _same_on_every_rank, fold_scales, layer_groups
from compress.quantize.gptq import calibration_share, quantize_gptq, resolve_run
from compress.quantize.grid import QUANT_ATTR, WeightQuant, fake_quantize, minmax_qparams, quantizable_linears
from compress.quantize.int8_runtime import (
    ACTIVATION_ARGS,
    CUDA_WIDTH_MULTIPLE,
    WEIGHT_ARGS,
    enable_int8_activations,
    quantize_activation,
)
from compress.quantize.layerwise import LayerwiseCalibration

ALPHAS = tuple(step / 10 for step in range(11))  # `alpha: search` tries these
SEARCH_TOKENS = 2048  # calibration tokens per group that judge the alphas (evenly spaced over the set)
MIN_SCALE = 1e-5  # the reference's clamp: a channel is never scaled to nothing


def check_smoothquant(model: torch.nn.Module, config: SmoothQuant) -> None:
    """What can be refused before any work: a family whose layers cannot take the scales (unknown, MoE, norms that
    compute x̂·(1 + weight)); and a warning for Linears whose widths CUDA's int8 GEMM cannot tile."""
    known = family(model)
    if known.moe:
        raise CompressError(f"SmoothQuant folds its scales into the norm before each group of Linears, and an MoE "
                            f"block's norm feeds the router and every expert; SmoothQuant for {known.name} is not "
                            f"built: use method fp8 (W8A8 without smoothing) or gptq/rtn (weight-only)")
    for index, layer in enumerate(decoder_layers(model)):
        layer_groups(layer, index, known, method="SmoothQuant")
    untiled = [name for name, linear in quantizable_linears(model, keep_float=config.ignore)
               if linear.in_features % CUDA_WIDTH_MULTIPLE or linear.out_features % CUDA_WIDTH_MULTIPLE]
    if untiled:
        warnings.warn(f"{len(untiled)} Linear(s) (e.g. {untiled[0]}) have widths that are not multiples of "
                      f"{CUDA_WIDTH_MULTIPLE}, which CUDA's int8 GEMM (torch._int_mm, vLLM's kernels) cannot tile: on "
                      f"GPUs they run the same arithmetic as a float matmul; list them in `ignore` to keep them "
                      f"float instead", stacklevel=2)


# ---------------------------------------------------------------- statistics


class ChannelMaxima:
    """One pass of the calibration set through a decoder layer: for the first Linear of each group (its input is the
    group's), max|x| per input channel and, for the alpha search, every `stride`-th token of its input."""

    def __init__(self, calibration: LayerwiseCalibration, layer: torch.nn.Module, index: int,
                 groups: list[ScaledGroup], stride: int | None):
        self.maxima: dict[str, torch.Tensor] = {}
        self.samples: dict[str, list[torch.Tensor]] = {group.linears[0]: [] for group in groups}
        self.stride = stride
        handles = [layer.get_submodule(group.linears[0]).register_forward_pre_hook(self._record(group.linears[0]))
                   for group in groups]
        try:
            calibration.propagate(layer, index)  # the float layer's outputs: the next layer's inputs
        finally:
            for handle in handles:
                handle.remove()
        for name, maxima in self.maxima.items():
            if distributed.active():
                torch.distributed.all_reduce(maxima, op=torch.distributed.ReduceOp.MAX)

    def _record(self, name: str):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            peak = x.abs().amax(0).float()
            self.maxima[name] = peak if name not in self.maxima else torch.maximum(self.maxima[name], peak)
            if self.stride is not None:
                self.samples[name].append(x[::self.stride].float())

        return hook

    def sample(self, name: str) -> torch.Tensor:
        return torch.cat(self.samples[name])


# ---------------------------------------------------------------- scales


def smoothing_scales(x_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^α / max|W_j|^(1−α) (paper eq. 4); channels the calibration set never reached keep s = 1."""
    w_max = torch.cat(weights).float().abs().amax(0).clamp(min=MIN_SCALE)
    scales = (x_max.float().pow(alpha) / w_max.pow(1 - alpha)).clamp(min=MIN_SCALE)
    return torch.where(x_max > 0, scales, torch.ones_like(scales))


def _rounded_weight(weight: torch.Tensor) -> torch.Tensor:
    return fake_quantize(weight, *minmax_qparams(weight, WEIGHT_ARGS), WEIGHT_ARGS)


def w8a8_error(x: torch.Tensor, weights: list[torch.Tensor], scales: torch.Tensor) -> float:
    """Squared error of the Linears' W8A8 outputs, inputs x / s and weights W · s both rounded to int8, against
    their float outputs x Wᵀ."""
    x_int8, x_scale = quantize_activation(x / scales)
    rounded_input = x_int8.float() * x_scale
    error = 0.0
    for weight in weights:
        weight = weight.float()
        error += ((rounded_input @ _rounded_weight(weight * scales).T) - x @ weight.T).pow(2).sum().item()
    return error


def searched_alpha(x: torch.Tensor, x_max: torch.Tensor, weights: list[torch.Tensor]) -> float:
    """The alpha of ALPHAS with the smallest W8A8 output error on the sampled tokens (the first on a tie)."""
    # under several processes each rank judged its own tokens: the errors are summed
    errors = [distributed.all_sum(w8a8_error(x, weights, smoothing_scales(x_max, weights, alpha))) for alpha in ALPHAS]
    return ALPHAS[min(range(len(ALPHAS)), key=errors.__getitem__)]


# ---------------------------------------------------------------- the verb


def _round_int8(linear: torch.nn.Linear) -> None:
    scale, zero = minmax_qparams(linear.weight, WEIGHT_ARGS)
    linear.weight.copy_(fake_quantize(linear.weight, scale, zero, WEIGHT_ARGS))
    setattr(linear, QUANT_ATTR, WeightQuant(WEIGHT_ARGS, scale, zero, ACTIVATION_ARGS))


@torch.no_grad()
def quantize_smoothquant(model: torch.nn.Module, config: SmoothQuant, calibration: torch.Tensor, *,
                         show_progress: bool = True) -> torch.nn.Module:
    """Smooth every decoder layer's Linears on `calibration` token ids [samples, seq_len], round their weights to int8
    per channel (RTN, or GPTQ when `config.gptq` is set) and quantize their inputs to int8 per token at run time."""
    require_float(model, "quantize", "its weights already lie on a quantization grid")
    check_smoothquant(model, config)
    known = family(model)
    device = next(model.parameters()).device
    share = calibration_share(calibration)
    stride = max(1, share.numel() // SEARCH_TOKENS) if config.alpha == "search" else None
    layerwise = LayerwiseCalibration(model, share, device, batch_tokens=share.numel())
    layers = layerwise.layers
    plan = [layer_groups(layer, index, known, method="SmoothQuant") for index, layer in enumerate(layers)]
    kept = kept_float(model, config.ignore)  # smoothed with their group (exact), never rounded
    with Progress(disable=not show_progress, transient=True) as progress:
        task = progress.add_task("SmoothQuant", total=len(layers))
        for index, (layer, groups) in enumerate(zip(layers, plan)):
            progress.update(task, description=f"SmoothQuant layer {index + 1}/{len(layers)}")
            statistics = ChannelMaxima(layerwise, layer, index, groups, stride)
            for group in groups:
                first = group.linears[0]
                weights = [layer.get_submodule(name).weight for name in group.linears]
                alpha = config.alpha
                if alpha == "search":
                    alpha = searched_alpha(statistics.sample(first), statistics.maxima[first], weights)
                fold_scales(layer, group, smoothing_scales(statistics.maxima[first], weights, alpha))
            if config.gptq is None:
                for _, linear in quantizable_linears(layer):
                    if id(linear) not in kept:
                        _round_int8(linear)
            _same_on_every_rank(layer)
            del statistics
            progress.advance(task)
    del layerwise
    if config.gptq is not None:
        gptq = GPTQ(bits=8, group_size=-1, sym=True, ignore=config.ignore, calibration=config.calibration,
                    **config.gptq.model_dump())
        quantize_gptq(model, resolve_run(model, gptq, calibration), calibration, show_progress=show_progress)
    for _, linear in quantizable_linears(model):
        quant = getattr(linear, QUANT_ATTR, None)
        if quant is not None:
            if quant.input_args is None:  # GPTQ's grid: the same int8 weights, now with int8 inputs
                setattr(linear, QUANT_ATTR, WeightQuant(quant.args, quant.scale, quant.zero_point, ACTIVATION_ARGS,
                                                        quant.output_error))
            enable_int8_activations(linear)
    return model

"""AWQ: Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ: Activation-aware Weight Quantization for
On-Device LLM Compression and Acceleration" (MLSys 2024).

Weights that meet large activations matter most, and scaling a weight column up by s (its input down by s) before
rounding shrinks that column's rounding error relative to its value. Per decoder layer, for each group of Linears
that read one input:
  1. statistics: the mean magnitude x̄ of each input channel on the calibration set, and (duo scaling) the mean
     magnitude w̄ of each weight column relative to its quantization group's maximum;
  2. search (paper §3.2): s = x̄^α / w̄^(1−α) for α on a grid in [0, 1), normalised to a geometric mean of 1; keep
     the s whose rounded weights Q(W·s)/s give the smallest output error of the block that reads the group (the
     attention block for q/k/v, the MLP for gate/up, the Linear itself otherwise), or with `loss: linear` of the
     Linears themselves. A Linear's own output error is computed from XᵀX, Σ‖(Q − W)x‖² = tr(D XᵀX Dᵀ), without
     running it; the attention and the MLP run, for every candidate, on the first `search_tokens` calibration tokens
     only (16384 by default, a quarter of AutoAWQ's whole default calibration set), so the search's cost stays
     bounded as the calibration set grows while the statistics and the clipping read every token. s = 1 (no
     scaling) is always a candidate, so the search never makes a group worse than plain rounding;
  3. fold: the op before the group (its norm, or the previous Linear's output rows) is divided by s and the group's
     columns multiplied by s: the float model computes exactly what it did;
  4. clip (paper's weight clipping): each quantization group's range is shrunk by the ratio, down to half, that
     minimises the Linear's output error on the calibration inputs (q and k are left unclipped, as in the reference
     code: their outputs meet in a product);
  5. round: round-to-nearest per layer, or GPTQ over the whole scaled model (`gptq:`).
Decoder layers are visited in order; each is searched on the float outputs of the layers before it (as the
reference implementation does), or with `propagate: quantized` on the outputs of the rounded layers before it (as
GPTQ is). Groups, statistics and the search follow AutoAWQ (`awq/quantize/quantizer.py`).
Under several processes each rank runs its share of the calibration samples; the statistics and the block output
errors are summed over the ranks, and rank 0's result of each layer is broadcast.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from rich.progress import Progress

from compress import distributed
from compress.architectures import Family, family
from compress.config.quantize import AWQ, GPTQ
from compress.errors import CompressError
from compress.modules import kept_float, require_float
from compress.quantize.gptq import (
    add_gram,
    calibration_share,
    quantize_gptq,
    resolve_run,
)
from compress.quantize.grid import (
    QUANT_ATTR,
    WeightQuant,
    check_group_size,
    fake_quantize,
    minmax_qparams,
    quantizable_linears,
    quantization_args,
    relative_output_error,
)
from compress.quantize.layerwise import LayerwiseCalibration

CLIP_STEPS = 20  # shrink ratios 1, 0.975, ..., 0.525: the reference's grid (n_grid 20, max_shrink 0.5)
CLIP_MAX_SHRINK = 0.5


# ---------------------------------------------------------------- which groups a decoder layer has


@dataclass
class ScaledGroup:
    """Linears that read one input, the op before them that the scales fold into, and the block whose output error
    judges the scales."""

    prev: str  # a norm or a Linear, relative to the decoder layer
    linears: tuple[str, ...]
    inspect: str  # the module whose output is compared (attention, MLP, or the one Linear)


# Llama-family decoder layers (Llama, Mistral, Qwen2, SmolLM): the reference implementation's four groups. v → o is
# foldable only when v's outputs are o's inputs one for one, i.e. without grouped-query attention.
LLAMA_GROUPS = (
    ScaledGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScaledGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    ScaledGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaledGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)
UNCLIPPED = ("q_proj", "k_proj")


def layer_groups(layer: torch.nn.Module, index: int, known: Family, method: str = "AWQ") -> list[ScaledGroup]:
    """The groups AWQ (or SmoothQuant, `method`) scales in one decoder layer of family `known`; a clear error when the
    layer is not of a form it can fold into (the family's norms, per the families table, or a layer that lacks a
    group's modules)."""
    groups = []
    for group in LLAMA_GROUPS:
        try:
            prev = layer.get_submodule(group.prev)
            linears = [layer.get_submodule(name) for name in group.linears]
            layer.get_submodule(group.inspect)
        except AttributeError as error:
            raise CompressError(f"{method} cannot scale decoder layer {index} ({type(layer).__name__}): {error}; it "
                                f"folds scales into Llama-family layers (input_layernorm → q/k/v_proj, "
                                f"post_attention_layernorm → gate/up_proj, up_proj → down_proj); use method gptq or "
                                f"rtn for this model") from None
        if isinstance(prev, torch.nn.Linear):
            if prev.out_features != linears[0].in_features:
                continue  # grouped-query attention: v's outputs are shared by several heads of o
        elif not known.norms_fold:
            raise CompressError(f"{method} cannot fold scales into layers.{index}.{group.prev} "
                                f"({type(prev).__name__}): {known.name}'s norms compute x̂·(1 + weight), and only "
                                f"norms computing x̂·weight (RMSNorm, LayerNorm) can absorb them; use method gptq or "
                                f"rtn for this model")
        groups.append(group)
    return groups


# ---------------------------------------------------------------- one decoder layer's calibration inputs


def runs_block(group: ScaledGroup) -> bool:
    """Whether the block loss of `group` needs its block run: the attention or the MLP; a lone Linear's output
    error is exact from XᵀX."""
    return group.inspect not in group.linears


class LayerInputs:
    """One pass of the calibration set through a decoder layer records, chunk by chunk, the input of every group's
    block that the search runs (with the attention's keyword arguments) and that block's float output, for the first
    `search_samples` samples only (all when None); and for every Linear the sum of |x| per input channel and XᵀX of
    its input over every sample (Linears reading one tensor share them)."""

    def __init__(self, calibration: LayerwiseCalibration, layer: torch.nn.Module, index: int,
                 groups: list[ScaledGroup], linears: dict[str, torch.nn.Linear], record_blocks: bool = True,
                 search_samples: int | None = None, first_token_weight: float = 1.0):
        self.first_token_weight = first_token_weight
        inspected = {g.inspect for g in groups if runs_block(g)} if record_blocks else set()
        self._left = search_samples  # samples still to record in this chunk and the later ones
        self._take = None  # how many samples of the current chunk are recorded
        self.inputs: dict[str, list[torch.Tensor]] = {name: [] for name in inspected}
        self.kwargs: dict[str, list[dict]] = {name: [] for name in inspected}
        self.outputs: dict[str, list[torch.Tensor]] = {name: [] for name in inspected}
        self.magnitude: dict[str, torch.Tensor] = {}  # Σ|x| per channel
        self.grams: dict[str, torch.Tensor] = {}  # XᵀX, float32
        self.tokens = 0
        # inputs already summed in this chunk, by data_ptr -> (the tensor, kept alive so its address is not reused
        # by a later input of the same forward; the Linear it was summed for)
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}
        handles = []
        for name in inspected:
            module = layer.get_submodule(name)
            handles.append(module.register_forward_pre_hook(self._record_input(name), with_kwargs=True))
            handles.append(module.register_forward_hook(self._record_output(name)))
        handles += [linear.register_forward_pre_hook(self._record_statistics(name)) for name, linear in linears.items()]
        handles.append(layer.register_forward_pre_hook(self._new_chunk, with_kwargs=True))
        self._share: dict[str, str] = {}
        try:
            calibration.propagate(layer, index)  # the float layer's outputs: the next layer's inputs
            self._seen.clear()
        finally:
            for handle in handles:
                handle.remove()
        for name in self.grams:  # sums over every process's share of the calibration set
            distributed.all_sum_(self.magnitude[name])
            distributed.all_sum_(self.grams[name])
        self.tokens = distributed.all_sum(self.tokens)
        for name, owner in self._share.items():
            self.magnitude[name], self.grams[name] = self.magnitude[owner], self.grams[owner]

    def _new_chunk(self, module, args, kwargs):
        self._seen.clear()
        hidden = args[0] if args else kwargs["hidden_states"]
        self.tokens += hidden.shape[:-1].numel()
        batch = hidden.shape[0]
        self._take = batch if self._left is None else min(batch, self._left)
        if self._left is not None:
            self._left -= self._take

    def _first(self, value, batch: int):
        """`value` cut to the chunk's recorded samples: tensors of two or more dimensions (also inside tuples, e.g.
        the rotary cos/sin) whose first dimension is the chunk's batch; anything else (a broadcast mask, the 1-D cache
        positions, None) as it is."""
        if self._take == batch:
            return value
        if isinstance(value, tuple):
            return tuple(self._first(v, batch) for v in value)
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == batch:
            return value[:self._take]
        return value

    def _record_input(self, name: str):
        def hook(module, args, kwargs):
            if not self._take:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            batch = hidden.shape[0]
            self.inputs[name].append(self._first(hidden, batch))
            self.kwargs[name].append({k: self._first(v, batch) for k, v in kwargs.items()
                                      if k not in ("hidden_states", "past_key_values", "past_key_value")})

        return hook

    def _record_output(self, name: str):
        def hook(module, args, output):
            if not self._take:
                return
            output = output[0] if isinstance(output, tuple) else output
            self.outputs[name].append(self._first(output, output.shape[0]))

        return hook

    def _record_statistics(self, name: str):
        def hook(module, args):
            x = args[0]
            _, owner = self._seen.setdefault(x.data_ptr(), (x, name))
            if owner != name:  # q/k/v, gate/up: one input, summed once
                self._share[name] = owner
                return
            first = x[:, 0] if x.dim() == 3 else None
            x = x.reshape(-1, x.shape[-1])
            if name not in self.grams:
                self.magnitude[name] = torch.zeros(x.shape[1], device=x.device)
                self.grams[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            self.magnitude[name] += x.abs().sum(0, dtype=torch.float32)
            add_gram(self.grams[name], x)  # GPTQ's: tensor cores for half inputs on CUDA, symmetric blocks on CPU
            if self.first_token_weight != 1 and first is not None:
                self.grams[name].addmm_(first.float().T, first.float(), alpha=self.first_token_weight - 1)

        return hook

    def mean_magnitude(self, linear: str) -> torch.Tensor:
        """x̄: the mean |x| of each input channel of `linear` over every calibration token."""
        return self.magnitude[linear] / self.tokens

    def output_error(self, block: torch.nn.Module, name: str) -> float:
        """Mean squared difference between `block`'s output now and its recorded float output."""
        total, count = 0.0, 0
        for x, kwargs, reference in zip(self.inputs[name], self.kwargs[name], self.outputs[name]):
            output = block(x, **kwargs)
            output = output[0] if isinstance(output, tuple) else output
            squared = (output.float() - reference.float()).pow(2)
            total += squared.sum().item()
            count += reference.numel()
            if self.first_token_weight != 1:
                total += (self.first_token_weight - 1) * squared[:, 0].sum().item()
                count += (self.first_token_weight - 1) * reference[:, 0].numel()
        return distributed.all_sum(total) / distributed.all_sum(count)


# ---------------------------------------------------------------- the scale search


def _rounded(weight: torch.Tensor, args) -> torch.Tensor:
    return fake_quantize(weight, *minmax_qparams(weight, args), args)


def _column_magnitude(weights: list[torch.Tensor], group_size: int | None) -> torch.Tensor:
    """w̄: each input column's mean |w| relative to its quantization group's largest |w|, over all output rows."""
    weight = torch.cat(weights).float().abs()
    rows, cols = weight.shape
    group = cols if group_size is None else group_size
    grouped = weight.reshape(rows, cols // group, group)
    relative = grouped / grouped.amax(-1, keepdim=True).clamp(min=1e-12)
    return relative.reshape(rows, cols).mean(0)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, grid_points: int):
    """s = 1, then x̄^α / w̄^(1−α) (or x̄^α) for α = 0, 1/n, ..., (n−1)/n, each with geometric mean 1 over its extremes
    (the reference's normalisation)."""
    yield torch.ones_like(x_mean)
    for step in range(grid_points):
        alpha = step / grid_points
        scales = x_mean.pow(alpha)
        if w_mean is not None:
            scales = scales / (w_mean.pow(1 - alpha) + 1e-4)
        scales = scales.clamp(min=1e-4)
        yield scales / (scales.max() * scales.min()).sqrt()


@contextlib.contextmanager
def _search_precision(device: torch.device):
    """float32 matmuls on TF32 tensor cores while candidates are compared on a GPU (restored after). The search only
    ranks candidates by their output error; the weights it chooses are computed and rounded in float32 as before.
    Without TF32 the GPU's float32 units do these products: a float32 model's block forwards, and in every dtype the
    XᵀX products of the lone Linears and the clipping (float32 sums). On an H100 at Qwen2.5-1.5B's shapes AWQ took
    3.03x GPTQ's time in float32 and 2.12x in bfloat16 without it, 1.57x and 1.82x with it
    (eval/results/profile_awq_qwen2-1.5b-shape_h100.json). Emulated on the CPU on SmolLM2, TF32 comparisons chose
    the same scales in all 90 groups and put 99.99 % of the weights on the same grid point, in float32 and bfloat16
    (eval/results/awq_tf32_check_smollm2_cpu.json)."""
    if device.type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


@torch.no_grad()
def search_scales(layer: torch.nn.Module, group: ScaledGroup, inputs: LayerInputs, args, config: AWQ,
                  where: str) -> torch.Tensor:
    """The scales whose rounded weights give the block the smallest output error (paper §3.2, grid search)."""
    linears = [layer.get_submodule(name) for name in group.linears]
    block = layer.get_submodule(group.inspect)
    originals = [linear.weight.detach().clone() for linear in linears]
    x_mean = inputs.mean_magnitude(group.linears[0])
    w_mean = _column_magnitude(originals, args.group_size) if config.duo_scaling else None
    gram = inputs.grams[group.linears[0]] if config.loss == "linear" or not runs_block(group) else None
    best, best_error = None, float("inf")
    try:
        with _search_precision(x_mean.device):
            for scales in candidate_scales(x_mean, w_mean, config.grid_points):
                error = 0.0
                for linear, weight in zip(linears, originals):
                    scaled = weight.float() * scales
                    rounded = _rounded(scaled, args) / scales
                    if gram is None:
                        linear.weight.copy_(rounded.to(weight.dtype))
                    else:  # ||(Q − W) X||² = tr(D XᵀX Dᵀ): the Linears' output error without running them
                        difference = rounded - weight.float()
                        error += ((difference @ gram) * difference).sum().item()
                if gram is None:
                    error = inputs.output_error(block, group.inspect)
                if error < best_error:
                    best, best_error = scales, error
    finally:
        for linear, weight in zip(linears, originals):
            linear.weight.copy_(weight)
    if best is None or not torch.isfinite(best).all():
        raise CompressError(f"AWQ {where}: the block's output is NaN/inf for every scale tried; the weights or the "
                            f"dtype overflow (with float16, try dtype bfloat16 or float32)")
    return best


@torch.no_grad()
def fold_scales(layer: torch.nn.Module, group: ScaledGroup, scales: torch.Tensor) -> None:
    """Divide the op before the group by s and multiply the group's input columns by s: the same function."""
    prev = layer.get_submodule(group.prev)
    if isinstance(prev, torch.nn.Linear):
        prev.weight.div_(scales.to(prev.weight.dtype)[:, None])
    else:
        prev.weight.div_(scales.to(prev.weight.dtype))
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(scales.to(prev.bias.dtype))
    for name in group.linears:
        linear = layer.get_submodule(name)
        linear.weight.mul_(scales.to(linear.weight.dtype))


# ---------------------------------------------------------------- clipping


@torch.no_grad()
def search_clip(weight: torch.Tensor, gram: torch.Tensor, args) -> torch.Tensor:
    """The weight with each quantization group clipped to ±(ratio · its largest |w|), the ratio chosen per group to
    minimise that group's share of the output error, dᵀ (X_gᵀ X_g) d with d the rounding error."""
    rows, cols = weight.shape
    group = cols if args.group_size is None else args.group_size
    groups = cols // group
    w = weight.float()
    # the diagonal blocks of XᵀX: each quantization group's own inputs
    blocks = torch.stack([gram[g * group:(g + 1) * group, g * group:(g + 1) * group] for g in range(groups)])
    peak = w.reshape(rows, groups, group).abs().amax(-1, keepdim=True)
    best = w.clone().reshape(rows, groups, group)
    best_error = torch.full((rows, groups), float("inf"), device=w.device)
    with _search_precision(w.device):
        for step in range(int(CLIP_MAX_SHRINK * CLIP_STEPS)):
            bound = peak * (1 - step / CLIP_STEPS)
            clipped = torch.maximum(torch.minimum(w.reshape(rows, groups, group), bound), -bound)
            difference = (_rounded(clipped.reshape(rows, cols), args).float() - w).reshape(rows, groups, group)
            error = torch.einsum("rgi,gij,rgj->rg", difference, blocks, difference)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best = torch.where(better[..., None], clipped, best)
    return best.reshape(rows, cols).to(weight.dtype)


# ---------------------------------------------------------------- the verb


def _scaled_gram(inputs: LayerInputs, name: str, scales: torch.Tensor | None) -> torch.Tensor:
    """XᵀX of a Linear's input as it is after the fold: its input was divided by the scales."""
    gram = inputs.grams[name]
    return gram if scales is None else gram / (scales[:, None] * scales[None, :])


def _clip_and_round(linears: dict[str, torch.nn.Linear], inputs: LayerInputs, scales_of: dict, args, clip: bool,
                    round_now: bool) -> None:
    """Clip each Linear's groups (q and k excepted) and, unless GPTQ rounds later, round onto the grid, recording
    each Linear's relative output error on the calibration inputs."""
    for name, linear in linears.items():
        gram = _scaled_gram(inputs, name, scales_of.get(name))
        float_weight = linear.weight.detach().clone()
        if clip and name.rsplit(".", 1)[-1] not in UNCLIPPED:
            linear.weight.copy_(search_clip(float_weight, gram, args))
        if round_now:
            scale, zero = minmax_qparams(linear.weight, args)
            linear.weight.copy_(fake_quantize(linear.weight, scale, zero, args))
            error = relative_output_error(float_weight, linear.weight, gram)
            setattr(linear, QUANT_ATTR, WeightQuant(args, scale, zero, output_error=error))


def _same_on_every_rank(layer: torch.nn.Module) -> None:
    """Rank 0's scaled, clipped and rounded layer on every process (each computed it from the same sums)."""
    if not distributed.active():
        return
    for tensor in layer.state_dict().values():
        distributed.same_(tensor)
    for _, linear in quantizable_linears(layer):
        quant = getattr(linear, QUANT_ATTR, None)
        if quant is not None:
            distributed.same_(quant.scale)
            if quant.zero_point is not None:
                distributed.same_(quant.zero_point)


@torch.no_grad()
def quantize_awq(model: torch.nn.Module, config: AWQ, calibration: torch.Tensor, *,
                 show_progress: bool = True) -> torch.nn.Module:
    """Scale (and clip) every decoder layer's Linears by AWQ on `calibration` token ids [samples, seq_len], then
    round them: round-to-nearest, or GPTQ on the scaled weights when `config.gptq` is set."""
    require_float(model, "quantize", "its weights already lie on a quantization grid")
    known = family(model)
    if known.moe:
        raise CompressError(f"AWQ folds its scales into the norm before each group of Linears, and an MoE block's "
                            f"norm feeds the router and every expert; AWQ for {known.name} is not built: "
                            f"use method: gptq or rtn")
    check_group_size(model, config.group_size)
    args = quantization_args(config)
    device = next(model.parameters()).device
    share = calibration_share(calibration)
    search_samples = None
    if config.search_tokens is not None:  # each process's part of the budget, in whole sequences
        budget = -(-config.search_tokens // distributed.world_size())
        search_samples = max(1, budget // share.shape[1])
    layerwise = LayerwiseCalibration(model, share, device, batch_tokens=share.numel())
    layers = layerwise.layers
    # every layer checked before any work
    plan = [layer_groups(layer, index, known) for index, layer in enumerate(layers)]
    kept = kept_float(model, config.ignore)  # scaled with their group (exact), never rounded
    with Progress(disable=not show_progress, transient=True) as progress:
        task = progress.add_task("AWQ", total=len(layers))
        for index, (layer, groups) in enumerate(zip(layers, plan)):
            progress.update(task, description=f"AWQ layer {index + 1}/{len(layers)}")
            linears = dict(quantizable_linears(layer))
            # LayerInputs replaces the inputs with the float layer's outputs; kept only where the rounded layer reruns
            layer_inputs = list(layerwise.hidden) if config.propagate == "quantized" else None
            inputs = LayerInputs(layerwise, layer, index, groups, linears, record_blocks=config.loss == "block",
                                 search_samples=search_samples, first_token_weight=config.first_token_weight)
            scales_of: dict[str, torch.Tensor] = {}
            for group in groups:
                where = f"layer {index} ({group.prev} → {', '.join(group.linears)})"
                scales = search_scales(layer, group, inputs, args, config, where)
                fold_scales(layer, group, scales)
                scales_of.update(dict.fromkeys(group.linears, scales))
            rounded = {name: m for name, m in linears.items() if id(m) not in kept}
            _clip_and_round(rounded, inputs, scales_of, args, config.clip, round_now=config.gptq is None)
            _same_on_every_rank(layer)
            del inputs
            if layer_inputs is not None and index + 1 < len(layers):
                layerwise.hidden[:] = layer_inputs
                layerwise.propagate(layer, index)  # the rounded layer's outputs: the next layer's inputs
            del layer_inputs
            progress.advance(task)
    del layerwise
    if config.gptq is not None:
        gptq = GPTQ(bits=config.bits, group_size=config.group_size, sym=config.sym, format=config.format,
                    ignore=config.ignore, **config.gptq.model_dump())
        quantize_gptq(model, resolve_run(model, gptq, calibration), calibration, show_progress=show_progress)
    return model

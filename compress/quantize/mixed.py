"""Mixed precision inside one weight-only quantize step (RTN, GPTQ): every Linear's grid, resolved once, before any
rounding, by `linear_grids`: the step's grid, an override's where one matches (`overrides`), and the budget's higher
grid for the most sensitive Linears (`keep`), ranked by a round-to-nearest probe over the calibration data: by the
model's loss each Linear's rounding costs (`loss_probe`, the default) or by the Linear's own output error.

Linears that read one input (q/k/v, gate/up) share a grid: serving engines (vLLM) fuse them into one Linear that
takes one quantization scheme, so a checkpoint whose q_proj and k_proj differ would not serve. The budget keeps such
a group whole, and an override that splits one is refused. (GPTQ itself would not need this: rows are independent
given the Hessian, so Linears stacked under one Hessian on different grids are solved apart with one factor.)"""

from __future__ import annotations

import time
from fnmatch import fnmatch
from typing import Callable

import torch
from compressed_tensors.quantization import QuantizationArgs

from compress.config.quantize import WeightOnlyConfig, _grid_name
from compress.errors import StepConfigError
from compress.estimate import linear_bytes
from compress.modules import quantizable_linears, quantized_modules
from compress.quantize.fp4 import check_fp4_widths, same_input_groups
from compress.quantize.grid import fake_quantize, minmax_qparams, quantization_args, weight_args
from compress.quantize.head_embed import check_head_and_embeddings, untied_record

MIXED_ATTR = "mixed_grids"  # on the model after the step: what the budget chose, for step.json

Grid = tuple[int, int, bool]  # bits, group_size (-1: per channel), sym


def _step(config) -> str:
    return f"quantize ({config.method})"


def _digits(score: float) -> float:
    return float(f"{score:.6g}")  # significant digits: a small Linear's loss gain can be a millionth of a nat


def _score(config) -> str:
    return "loss gains (nats)" if config.keep.rank == "loss" else "output errors"


def _base(config) -> Grid:
    return config.bits, config.group_size, config.sym


def _cannot_group(linears: dict[str, torch.nn.Linear], names: list[str], group: int) -> list[str]:
    return [n for n in names if group != -1 and linears[n].in_features % group]


def _overridden(model, config, linears: dict[str, torch.nn.Linear]) -> dict[str, Grid]:
    """{Linear: grid} of every Linear an override matches; a bad override is an error naming it."""
    chosen: dict[str, tuple[Grid, int]] = {}
    for index, override in enumerate(config.overrides):
        where = f"{_step(config)} overrides[{index}] (match {override.match!r})"
        matched = [name for name in linears if fnmatch(name, override.match)]
        if not matched:
            example = next(iter(linears), "model.layers.0.mlp.down_proj")
            raise StepConfigError(f"{where}: matches no Linear the step quantizes (full module names such as "
                                  f"{example}; lm_head and the step's `ignore` are not quantized); fix the pattern, "
                                  f"e.g. '*.{example.rsplit('.', 1)[-1]}', or remove the override",
                                  ("overrides", index, "match"))
        grid = override.on(config)
        for name in matched:
            if name in chosen and chosen[name][0] != grid:
                other = config.overrides[chosen[name][1]]
                raise StepConfigError(f"{where}: {name} is also matched by overrides[{chosen[name][1]}] (match "
                                      f"{other.match!r}) with another grid ({_grid_name(*chosen[name][0])} vs "
                                      f"{_grid_name(*grid)}); narrow one pattern so each Linear gets one grid",
                                      ("overrides", index, "match"))
            chosen[name] = (grid, index)
        bad = _cannot_group(linears, matched, grid[1])
        if bad:
            raise StepConfigError(f"{where}: group_size {grid[1]} does not divide the input width "
                                  f"{linears[bad[0]].in_features} of {bad[0]} ({len(bad)} of its {len(matched)} "
                                  f"Linears); use a group_size that divides it, or -1 for one scale per output channel",
                                  ("overrides", index, "group_size" if override.group_size else "match"))
    grids = {name: grid for name, (grid, _) in chosen.items()}
    for unit in same_input_groups(model, list(linears)):
        if len({grids.get(name, _base(config)) for name in unit}) > 1:
            index = next(chosen[name][1] for name in unit if name in chosen)
            raise StepConfigError(f"{_step(config)} overrides[{index}] (match {config.overrides[index].match!r}): "
                                  f"gives {', '.join(n for n in unit if n in chosen)} another grid than "
                                  f"{', '.join(n for n in unit if n not in chosen) or 'its siblings'}, which read the "
                                  f"same input; serving engines fuse them into one Linear with one grid: match them "
                                  f"all (e.g. '*.self_attn.[qkv]_proj', '*.mlp.[gu][ap]*_proj') or none",
                                  ("overrides", index, "match"))
    return grids


def _bytes(linear: torch.nn.Linear, grid: Grid) -> int:
    return linear_bytes(linear.out_features, linear.in_features, *grid, linear.weight.element_size())


class _Budget:
    """The units (groups of Linears that share a grid) the budget may raise, and what raising each costs."""

    def __init__(self, model, config, linears: dict[str, torch.nn.Linear], overridden: dict[str, Grid]):
        keep = config.keep
        self.high = keep.on(config)
        where = f"{_step(config)} keep"

        def refuse(message: str, field: str | None = None):
            raise StepConfigError(f"{where}: {message}", ("keep", field) if field else ("keep",))

        self.units = [unit for unit in same_input_groups(model, list(linears)) if unit[0] not in overridden]
        self.candidates = sum(len(unit) for unit in self.units)
        if not self.units:
            refuse("every Linear is matched by an override, so the budget has nothing to rank; remove keep or narrow "
                   "the overrides")
        bad = _cannot_group(linears, [n for unit in self.units for n in unit], self.high[1])
        if bad:
            refuse(f"group_size {self.high[1]} does not divide the input width {linears[bad[0]].in_features} of "
                   f"{bad[0]}, which the budget may keep; use a group_size that divides every width, or -1 for one "
                   f"scale per output channel", "group_size")
        self.extra = [sum(_bytes(linears[n], self.high) - _bytes(linears[n], overridden.get(n, _base(config)))
                          for n in unit) for unit in self.units]
        everything = sum(_bytes(m, overridden.get(n, _base(config))) for n, m in linears.items())
        high = _grid_name(*self.high)
        self.count = keep.count
        if keep.fraction is not None:
            self.count = round(keep.fraction * len(linears))
            if self.count < 1:
                refuse(f"fraction {keep.fraction:g} of {len(linears)} Linears keeps none; raise it to at least "
                       f"{1 / len(linears):.3g}", "fraction")
        if self.count is not None and self.count >= self.candidates:
            refuse(f"keeping {self.count} of the {self.candidates} Linears it ranks keeps them all at {high}; give the "
                   f"step that grid instead, or a smaller budget", "fraction" if keep.fraction is not None else "count")
        self.bytes = None
        if keep.extra_bytes is not None:
            self.bytes = keep.extra_bytes * everything
            if self.bytes < min(self.extra):
                refuse(f"extra_bytes {keep.extra_bytes:g} ({self.bytes:,.0f} bytes) is less than raising the cheapest "
                       f"Linear to {high} costs ({min(self.extra):,} bytes, {min(self.extra) / everything:.3g} of the "
                       f"step's); raise it", "extra_bytes")
            if self.bytes >= sum(self.extra):
                refuse(f"extra_bytes {keep.extra_bytes:g} holds every Linear it ranks at {high} "
                       f"({sum(self.extra) / everything:.3g} more bytes); give the step that grid instead, or a "
                       f"smaller budget", "extra_bytes")

    def choose(self, config, errors: list[float]) -> list[int]:
        """Indices of the units to raise, most sensitive first: by score, or, filling a byte budget ranked by loss, by
        the loss each saves per extra byte (a large unit must save more to be worth its bytes)."""
        by_byte = self.bytes is not None and config.keep.rank == "loss"
        order = sorted(range(len(self.units)), key=lambda i: -(errors[i] / self.extra[i] if by_byte else errors[i]))
        keep, chosen = config.keep, []
        if keep.above is not None:
            chosen = [i for i in order if errors[i] > keep.above]
            if not chosen or len(chosen) == len(order):
                top, low = errors[order[0]], errors[order[-1]]
                raise StepConfigError(f"{_step(config)} keep: above {keep.above:g} keeps "
                                      f"{'no' if not chosen else 'every'} Linear (the probe's {_score(config)} run "
                                      f"from {low:.4g} to {top:.4g}); choose a threshold between them",
                                      ("keep", "above"))
            return chosen
        left = self.count if self.count is not None else self.bytes
        for i in order:  # fill the budget: a unit that does not fit is passed over for smaller ones after it
            cost = len(self.units[i]) if self.count is not None else self.extra[i]
            if cost <= left:
                chosen.append(i)
                left -= cost
        return chosen


def check_grids(model: torch.nn.Module, config) -> None:
    """The RTN and GPTQ steps' shape check (compress.steps), before any work: the FP4 widths, the head's and the
    embeddings' groups, every override and the budget's bounds against the model's Linears."""
    check_fp4_widths(model, config)
    check_head_and_embeddings(model, config)
    if not getattr(config, "overrides", ()) and getattr(config, "keep", None) is None:
        return
    linears = dict(quantizable_linears(model, keep_float=config.ignore))
    overridden = _overridden(model, config, linears)
    if config.keep is not None:
        _Budget(model, config, linears, overridden)


# The budget's sensitivity probe, which the calibrating quantizer runs on its calibration set: {Linear: (a, b)} for the
# named Linears. rank "output" (compress.quantize.gptq.probe_errors): a = ||(Q − W) X||², b = ||W X||², Q the
# Linear's round-to-nearest on the step's grid; rank "loss" (loss_probe): a and b the model's estimated loss increase
# with the Linear rounded to the step's grid and to the kept grid.
Probe = Callable[[set[str]], dict[str, tuple[float, float]]]

# tokens per forward and backward of the loss probe: its saved activations, not the weights, bound its memory (a
# 1.5B model's at 2048 tokens, ~11 GB in float32, took a 24 GiB machine over; ~2.7 GB at 512)
PROBE_TOKENS = 512


def loss_probe(model: torch.nn.Module, config, calibration: torch.Tensor, names: set[str]
               ) -> dict[str, tuple[float, float]]:
    """{Linear: (ΔL on the step's grid, ΔL on keep's grid)} for the Linears in `names`: the increase of the model's
    next-token loss on `calibration` that rounding that Linear alone to nearest on each grid would cause, estimated
    to second order from one forward and backward of the float model. With e = (Q − W) x the change of the Linear's
    output at a token and g the loss's gradient there, ΔL ≈ ½ Σ g² e² over tokens and output channels (the empirical
    Fisher's diagonal in the Linear's output space, as BRECQ weighs block outputs). Unlike the Linear's own output
    error it counts how much the layers after it amplify or damp the change: a down_proj feeding the residual stream
    early weighs more than one whose change the next norm absorbs."""
    base = quantization_args(config)
    high = weight_args(*config.keep.on(config))
    linears = {name: module for name, module in model.named_modules() if name in names}
    sums = {name: torch.zeros(2, dtype=torch.float64) for name in linears}

    def capture(name: str):
        def hook(module, inputs, output):
            x = inputs[0].detach()  # autograd keeps it for the backward anyway

            def accumulate(grad: torch.Tensor) -> None:
                g2 = grad.float().pow(2)
                weight = module.weight.detach()
                # each Linear's rounding error made where it is used, one at a time: made up front for every Linear
                # on both grids, they held two more copies of the weights (a 1.5B model's 10 GB in float32)
                for k, args in enumerate((base, high)):
                    delta = fake_quantize(weight, *minmax_qparams(weight, args), args) - weight
                    e = x.float() @ delta.float().T
                    sums[name][k] += 0.5 * (g2 * e.pow(2)).sum().double().cpu()
            output.register_hook(accumulate)
        return hook

    # the loss's gradient with respect to activations only: the embedding output is the one leaf that needs it
    hooks = [module.register_forward_hook(capture(name)) for name, module in linears.items()]
    hooks.append(model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_()))
    needed = {p: p.requires_grad for p in model.parameters()}
    device = next(model.parameters()).device
    was_training = model.training
    try:
        for p in needed:
            p.requires_grad_(False)
        model.eval()
        rows = max(1, PROBE_TOKENS // calibration.shape[1])
        with torch.enable_grad():
            for start in range(0, calibration.shape[0], rows):
                ids = calibration[start:start + rows].to(device)
                loss = model(ids, labels=ids).loss * ids.numel()  # summed: each sequence weighs by its tokens
                loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
        for p, flag in needed.items():
            p.requires_grad_(flag)
        model.train(was_training)
    tokens = calibration.numel()
    return {name: (value[0].item() / tokens, value[1].item() / tokens) for name, value in sums.items()}


def linear_grids(model: torch.nn.Module, config: WeightOnlyConfig, probe: Probe | None = None,
                 actorder: str | None = None) -> dict[str, QuantizationArgs]:
    """{full Linear name: its compressed-tensors grid} for every Linear the step quantizes: the one place a Linear's
    grid is decided. With `keep`, ranks Linears by `probe` and records what it kept on the model (MIXED_ATTR)."""
    base = quantization_args(config, actorder)
    linears = dict(quantizable_linears(model, keep_float=config.ignore))
    overrides, keep = getattr(config, "overrides", ()), getattr(config, "keep", None)
    if not overrides and keep is None:
        return dict.fromkeys(linears, base)
    chosen = _overridden(model, config, linears)
    if keep is not None:
        budget = _Budget(model, config, linears, chosen)
        if probe is None:
            raise StepConfigError(f"{_step(config)} keep needs a quantizer that reads calibration data (gptq)",
                                  ("keep",))
        start = time.perf_counter()
        energies = probe({n for unit in budget.units for n in unit})
        seconds = time.perf_counter() - start
        if keep.rank == "loss":  # the loss the unit saves on the kept grid
            errors = [sum(energies[n][0] - energies[n][1] for n in unit) for unit in budget.units]
        else:
            errors = [sum(energies[n][0] for n in unit) / max(sum(energies[n][1] for n in unit), 1e-30)
                      for unit in budget.units]
        kept = budget.choose(config, errors)
        for i in kept:
            chosen.update(dict.fromkeys(budget.units[i], budget.high))
        setattr(model, MIXED_ATTR, {
            "probe": (f"rtn {_grid_name(*_base(config))} vs {_grid_name(*budget.high)}, the model's loss saved "
                      f"(nats, {keep.probe_samples} calibration sequences)" if keep.rank == "loss" else
                      f"rtn {_grid_name(*_base(config))} on the calibration inputs, relative output error"),
            "probe_seconds": round(seconds, 1), "budget": keep.budget(), "grid": _grid_name(*budget.high),
            "kept": {", ".join(budget.units[i]): _digits(errors[i]) for i in kept},
            "highest_not_kept": _digits(max((errors[i] for i in set(range(len(errors))) - set(kept)), default=0.0))})
    return {name: weight_args(*chosen[name], actorder, base.scale_dtype) if name in chosen else base
            for name in linears}


def grid_name(args: QuantizationArgs) -> str:
    if args.type == "float":
        return f"{args.type}{args.num_bits} {args.strategy}" + (f" g{args.group_size}" if args.group_size else "")
    return _grid_name(args.num_bits, -1 if args.group_size is None else args.group_size, args.symmetric)


def grids_record(model: torch.nn.Module) -> dict:
    """For step.json, where a step's Linears (and a quantized head or embedding) lie on several grids: per grid, its
    modules (every name but for the grid most of them share) and their saved bytes; what the budget kept, if it ran;
    and what untying a tied head cost (`untied_head_bytes`), where the step untied it."""
    untied = untied_record(model)
    if len({quant.args.model_dump_json() for _, _, quant in quantized_modules(model)}) < 2:
        model.__dict__.pop(MIXED_ATTR, None)
        return untied
    by_grid: dict[str, list] = {}
    for name, module, quant in quantized_modules(model):  # the head and an embedding too, where a step quantized them
        by_grid.setdefault(grid_name(quant.args), []).append((name, module, quant))
    largest = max(by_grid, key=lambda grid: len(by_grid[grid]))
    grids = {}
    for grid, members in by_grid.items():
        saved = sum(linear_bytes(*module.weight.shape, quant.args.num_bits,
                                 -1 if quant.args.group_size is None else quant.args.group_size,
                                 quant.args.symmetric, module.weight.element_size(),
                                 embedding=isinstance(module, torch.nn.Embedding))
                    for _, module, quant in members) if members[0][2].args.type == "int" else None
        grids[grid] = {"linears": len(members), "bytes": saved,
                       **({"names": [name for name, _, _ in members]} if grid != largest else {})}
    mixed = model.__dict__.pop(MIXED_ATTR, None)  # this step's: a later step's record does not repeat it
    return {"grids": grids, **({"kept_by_budget": mixed} if mixed else {}), **untied}

"""`prune(model, TaylorPrune(...), calibration)`: structured pruning as LLM-Pruner does it (Ma et al. 2023) —
score the coupled groups of each decoder layer (attention heads or KV groups, MLP channels) by a Taylor estimate
of how much the loss rises without them, remove the least important for real (smaller Linear modules: fewer
parameters, smaller files, faster forwards), and record the new widths in the config."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from compress.data import CalibrationData
from compress.errors import CompressError
from compress.prune.importance import (
    IMPORTANCE,
    NEEDS_FISHER,
    NEEDS_GRADIENT,
    channel_scorer,
    gradient_statistics,
    layer_group_scores,
    scored_layers_weights,
)
from compress.prune.structure import (
    LayerWidths,
    check_supported,
    heads_mode,
    kv_group_scores,
    layer_widths,
    planned_widths,
    record_widths,
    select_channels,
    select_heads,
    shrink_attention,
    shrink_mlp,
)
from compress.quantize.formats import is_quantized
from compress.quantize.layerwise import decoder_layers


class TaylorPrune(BaseModel):
    """Recipe: `prune: {method: taylor, importance: element1, ratio: 0.25, layers: [4, 30]}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["taylor"] = "taylor"
    importance: Literal[IMPORTANCE] = Field(  # type: ignore[valid-type]
        "element1", description="element1 | element2 | vector | mix (Taylor, LLM-Pruner); l1 | l2 | random baselines")
    ratio: float = Field(0.25, gt=0, lt=1, description="fraction of each pruned layer's heads and channels removed")
    layers: tuple[int, int] | None = Field(None, description="[start, end) decoder layers to prune; default all")
    targets: tuple[Literal["attention", "mlp"], ...] = Field(("attention", "mlp"), min_length=1)
    heads: Literal["auto", "query", "kv_groups"] = Field(
        "auto", description="query: the same number of query heads removed from every KV group; kv_groups: whole "
                            "KV groups with their query heads; auto: query under GQA, kv_groups otherwise")
    scope: Literal["layer", "global"] = Field(
        "layer", description="layer: every pruned layer loses `ratio`; global: one ranking across the pruned layers")
    multiple: int = Field(64, ge=1, description="kept widths are rounded to multiples of this (quantization groups)")
    uniform: bool = Field(False, description="prune every layer to the same widths: a stock transformers config")
    calibration: CalibrationData = CalibrationData(samples=10, seq_len=128)

    @model_validator(mode="after")
    def _consistent(self):
        if self.layers is not None and not 0 <= self.layers[0] < self.layers[1]:
            raise ValueError(f"layers [{self.layers[0]}, {self.layers[1]}] is not a range [start, end) with "
                             f"0 <= start < end")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets {list(self.targets)} lists a target twice")
        if self.uniform and self.scope == "global":
            raise ValueError("uniform: true gives every layer the same widths, scope: global ranks across layers "
                             "and gives them different widths; choose one")
        return self

    def describe(self) -> str:
        where = f"layers [{self.layers[0]}, {self.layers[1]})" if self.layers else "all layers"
        return (f"prune {'/'.join(self.targets)} {self.ratio:.0%} by {self.importance} importance, {where}, "
                f"{self.scope} ranking, widths multiple of {self.multiple}")


def _layer_range(model: torch.nn.Module, config: TaylorPrune) -> range:
    count = len(decoder_layers(model))
    start, end = config.layers or (0, count)
    if end > count:
        raise CompressError(f"prune layers [{start}, {end}) is outside the model: it has {count} decoder layers "
                            f"(valid: 0 <= start < end <= {count})")
    if config.uniform and (start, end) != (0, count):
        raise CompressError(f"uniform: true prunes every decoder layer to the same widths, but layers is "
                            f"[{start}, {end}) of {count}; remove `layers` or set uniform: false")
    return range(start, end)


def check_prunable(model: torch.nn.Module, config: TaylorPrune) -> None:
    """Every check that needs only the model's shapes: run before any work (the pipeline does, right after load)."""
    check_supported(model)
    layers = decoder_layers(model)
    for index in _layer_range(model, config):
        widths = layer_widths(layers[index])
        planned_widths(widths, config.ratio, config.heads, config.targets, config.multiple,
                       layers[index].self_attn.head_dim, f"decoder layer {index}")


def _global_ratios(scores: list[dict], layers: list[torch.nn.Module], config: TaylorPrune) -> list[dict[str, float]]:
    """With one ranking across layers, each layer's share of the removed units (heads or KV groups, channels)."""
    ratios = [{} for _ in scores]
    units = {}
    if "attention" in config.targets:
        modes = [heads_mode(layer_widths(layer), config.heads) for layer in layers]
        units["attention"] = [s["query"] if mode == "query" else kv_group_scores(s["query"], s["kv"])
                              for s, mode in zip(scores, modes)]
    if "mlp" in config.targets:
        units["mlp"] = [s["mlp"] for s in scores]
    for target, per_layer in units.items():
        ranked = torch.cat(per_layer)
        removed = round(ranked.numel() * config.ratio)
        threshold = ranked.kthvalue(removed).values if removed else -torch.inf
        for ratio, values in zip(ratios, per_layer):
            ratio[target] = (values <= threshold).sum().item() / values.numel()
    return ratios


def prune(model: torch.nn.Module, config: TaylorPrune, calibration: torch.Tensor | None = None,
          show_progress: bool = True) -> torch.nn.Module:
    """Prune `model` in place and return it. Taylor importances need `calibration`, token ids [samples, seq_len]
    (`compress.data.calibration_batches`; LLM-Pruner uses 10 x 128); l1, l2 and random need none."""
    check_prunable(model, config)
    if is_quantized(model):
        raise CompressError("prune after quantize: the quantization grids are per weight column and row and would "
                            "not survive the surgery; put the prune step before quantize")
    layers = [decoder_layers(model)[i] for i in _layer_range(model, config)]

    # 1. importance: gradients of the LM loss on the calibration samples, then one score per group
    gradient, fisher = {}, {}
    if config.importance in NEEDS_GRADIENT:
        if calibration is None:
            raise CompressError(f"{config.importance} importance needs calibration token ids [samples, seq_len]: "
                                f"compress.data.calibration_batches(tokenizer, 'wikitext2-valid', 10, 128)")
        gradient, fisher = gradient_statistics(model, scored_layers_weights(layers, config.targets), calibration,
                                               fisher=config.importance in NEEDS_FISHER, show_progress=show_progress)
    score = channel_scorer(config.importance, gradient, fisher)
    scores = [layer_group_scores(layer, score, config.targets) for layer in layers]
    del gradient, fisher, score

    # 2. how much each layer loses: `ratio` everywhere, or its share of one global ranking
    if config.scope == "global":
        ratios = _global_ratios(scores, layers, config)
    else:
        ratios = [{target: config.ratio for target in config.targets} for _ in layers]

    # 3. surgery: keep the highest-scoring groups, rounded to the width multiple
    with torch.no_grad():
        for layer, layer_scores, layer_ratios in zip(layers, scores, ratios):
            widths = layer_widths(layer)
            dim = layer.self_attn.head_dim
            if "attention" in config.targets:
                target = planned_widths(widths, layer_ratios["attention"], config.heads, ("attention",),
                                        config.multiple, dim, "a decoder layer", keep_one=config.scope == "global")
                query, kv = select_heads(layer_scores["query"], layer_scores["kv"], target,
                                         heads_mode(widths, config.heads))
                shrink_attention(layer.self_attn, query, kv)
            if "mlp" in config.targets:
                target = planned_widths(widths, layer_ratios["mlp"], config.heads, ("mlp",), config.multiple, dim,
                                        "a decoder layer", keep_one=config.scope == "global")
                shrink_mlp(layer.mlp, select_channels(layer_scores["mlp"], target))
    record_widths(model)
    return model


__all__ = ["LayerWidths", "TaylorPrune", "check_prunable", "prune"]

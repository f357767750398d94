"""`prune(model, TaylorPrune(...), calibration)`: structured pruning as LLM-Pruner does it (Ma et al. 2023) —
score the coupled groups of each decoder layer (attention heads or KV groups, MLP channels) by a Taylor estimate
of how much the loss rises without them, remove the least important for real (smaller Linear modules: fewer
parameters, smaller files, faster forwards), and record the new widths in the config."""

from __future__ import annotations

import torch

from compress.architectures import Family, family
from compress.config.prune import NEEDS_FISHER, NEEDS_GRADIENT, TaylorPrune
from compress.errors import CompressError
from compress.modules import decoder_layers, require_float
from compress.prune.experts import expert_saliency, select_experts
from compress.prune.importance import (
    channel_scorer,
    gradient_statistics,
    layer_group_scores,
    scored_layers_weights,
)
from compress.prune.structure import (
    LayerWidths,
    check_stock_config,
    check_supported,
    heads_mode,
    kv_group_scores,
    layer_widths,
    planned_experts,
    planned_widths,
    record_widths,
    select_channels,
    select_heads,
    shrink_attention,
    shrink_experts,
    shrink_mlp,
)


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
    layers, known = decoder_layers(model), family(model)
    moe = known.moe
    if config.experts and not moe:
        raise CompressError(f"experts: {config.experts} prunes the experts of Mixture-of-Experts layers, and this "
                            f"model has none; remove `experts`")
    why_uniform = ("an MoE model's config holds one expert count and width for all layers" if moe else
                   "Phi-3's attention splits its fused qkv_proj by the config's head count, shared by all layers"
                   if known.fused_qkv else None)
    if why_uniform and (not config.uniform or _layer_range(model, config) != range(len(layers))):
        raise CompressError(f"{why_uniform}: prune it with uniform: true and no `layers` range")
    planned = {}
    for index in _layer_range(model, config):
        widths = layer_widths(layers[index], known)
        planned[index] = planned_widths(widths, config.ratio, config.heads, config.targets, config.multiple,
                                        layers[index].self_attn.head_dim, f"decoder layer {index}")
        if moe and config.experts:
            planned[index] = planned_experts(planned[index], config.experts, model.config.num_experts_per_tok,
                                             f"decoder layer {index}")
    if config.uniform:  # every layer gets these widths: they become the stock config's fields
        check_stock_config(model, config, planned[0])


def _global_ratios(scores: list[dict], layers: list[torch.nn.Module], known: Family,
                   config: TaylorPrune) -> list[dict[str, float]]:
    """With one ranking across layers, each layer's share of the removed units (heads or KV groups, channels)."""
    ratios = [{} for _ in scores]
    units = {}
    if "attention" in config.targets:
        modes = [heads_mode(layer_widths(layer, known), config.heads) for layer in layers]
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


def prune(model: torch.nn.Module, config: TaylorPrune, calibration: torch.Tensor | None = None, *,
          show_progress: bool = True) -> torch.nn.Module:
    """Prune `model` in place and return it. Taylor importances need `calibration`, token ids [samples, seq_len]
    (`compress.data.calibration_batches`; LLM-Pruner uses 10 x 128); l1, l2 and random need none."""
    require_float(model, "prune", "the quantization grids are per weight column and row and would not survive "
                                   "the surgery")
    check_prunable(model, config)
    layers = [decoder_layers(model)[i] for i in _layer_range(model, config)]
    known = family(model)

    # 1. importance: gradients of the LM loss on the calibration samples, then one score per group
    gradient, fisher = {}, {}
    if config.importance in NEEDS_GRADIENT:
        if calibration is None:
            raise CompressError(f"{config.importance} importance needs calibration token ids [samples, seq_len]: "
                                f"compress.data.calibration_batches(tokenizer, 'wikitext2-valid', 10, 128)")
        gradient, fisher = gradient_statistics(model, scored_layers_weights(layers, config.targets, known), calibration,
                                               fisher=config.importance in NEEDS_FISHER, show_progress=show_progress)
    score = channel_scorer(config.importance, gradient, fisher)
    scores = [layer_group_scores(layer, score, config.targets, known) for layer in layers]
    del gradient, fisher, score
    if config.experts:  # MoE: whole experts by REAP saliency (a forward pass; uniform and all layers, checked above)
        if calibration is None:
            raise CompressError("experts: pruning ranks experts by REAP on calibration token ids [samples, seq_len]: "
                                "compress.data.calibration_batches(tokenizer, 'wikitext2-valid', 10, 128)")
        saliency = expert_saliency(model, [layer.mlp for layer in layers], calibration, show_progress)
        for layer_scores, layer_saliency in zip(scores, saliency):
            layer_scores["experts"] = layer_saliency

    # 2. how much each layer loses: `ratio` everywhere, or its share of one global ranking
    if config.scope == "global":
        ratios = _global_ratios(scores, layers, known, config)
    else:
        ratios = [{target: config.ratio for target in config.targets} for _ in layers]

    # 3. surgery: keep the highest-scoring groups, rounded to the width multiple
    with torch.no_grad():
        for layer, layer_scores, layer_ratios in zip(layers, scores, ratios):
            widths = layer_widths(layer, known)
            dim = layer.self_attn.head_dim
            if "attention" in config.targets:
                target = planned_widths(widths, layer_ratios["attention"], config.heads, ("attention",),
                                        config.multiple, dim, "a decoder layer", keep_one=config.scope == "global")
                query, kv = select_heads(layer_scores["query"], layer_scores["kv"], target,
                                         heads_mode(widths, config.heads))
                shrink_attention(layer.self_attn, query, kv, fused=known.fused_qkv)
            if widths.num_experts:  # every expert keeps its own best channels, the best experts are kept
                target = planned_widths(widths, layer_ratios.get("mlp", 0.0), config.heads,
                                        ("mlp",) if "mlp" in config.targets else (), config.multiple, dim,
                                        "a decoder layer")
                kept = torch.arange(widths.num_experts)
                if config.experts:
                    count = planned_experts(target, config.experts, model.config.num_experts_per_tok,
                                            "a decoder layer").num_experts
                    kept = select_experts(layer_scores["experts"], count)
                channel_scores = layer_scores.get("mlp", torch.zeros(widths.num_experts, widths.intermediate_size))
                channels = torch.stack([select_channels(channel_scores[e], target) for e in kept.tolist()])
                shrink_experts(layer.mlp, kept, channels)
                if "shared" in layer_scores:  # the shared expert loses the experts' share of its channels
                    shrink_mlp(layer.mlp.shared_expert, select_channels(layer_scores["shared"], target, shared=True),
                               fused=False)
            elif "mlp" in config.targets:
                target = planned_widths(widths, layer_ratios["mlp"], config.heads, ("mlp",), config.multiple, dim,
                                        "a decoder layer", keep_one=config.scope == "global")
                shrink_mlp(layer.mlp, select_channels(layer_scores["mlp"], target), fused=known.fused_gate_up)
    record_widths(model)
    return model


__all__ = ["LayerWidths", "TaylorPrune", "check_prunable", "prune"]

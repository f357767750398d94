"""The coupled groups of a Llama-family decoder layer, which of them to keep, and the surgery that removes the rest.

A group is everything that must go together for the layer to stay a valid (smaller) layer:
- an MLP channel c: row c of gate_proj and up_proj, column c of down_proj;
- a query head h: its head_dim rows of q_proj and columns of o_proj;
- a KV group g: its rows of k_proj and v_proj and every query head that attends through it.

With grouped-query attention the layer stays valid only if every KV group keeps the same number of query heads,
so heads are pruned either as query heads, the same count in every KV group (`heads: query`), or as whole KV
groups (`heads: kv_groups`). Kept widths are rounded to a multiple (default 64) so that the result stays
divisible by quantization group sizes and kernel tiles.

Per-layer widths are recorded on the config: equal widths in every layer give a stock config (transformers loads
it as is); different widths are listed in `compress_layer_widths` and built by `build_layers_at_recorded_widths`
(compress.widths, which also holds the surgery: the loader builds such models with it)."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, replace

import torch

from compress.architectures import family
from compress.errors import CompressError
from compress.modules import decoder_layers
from compress.widths import (  # noqa: F401 -- re-exported: the surgery and the widths are pruning's vocabulary too
    LAYER_WIDTHS_KEY,
    LayerWidths,
    build_layers_at_recorded_widths,
    fused_rows,
    head_dim,
    layer_widths,
    shared_expert,
    shrink_attention,
    shrink_experts,
    shrink_layer_to,
    shrink_mlp,
)


def check_supported(model: torch.nn.Module) -> None:
    """The family must be one pruning handles (compress.architectures), with its layer layout in every layer: the
    Llama layout, or for MoE families Llama attention and an MLP of a router (`gate`) and fused `experts`."""
    known = family(model)
    for index, layer in enumerate(decoder_layers(model)):
        attn = getattr(layer, "self_attn", None)
        names = ("qkv_proj", "o_proj") if known.fused_qkv else ("q_proj", "k_proj", "v_proj", "o_proj")
        if attn is None or not all(isinstance(getattr(attn, n, None), torch.nn.Linear) for n in names):
            raise CompressError(f"decoder layer {index} lacks self_attn.{{{', '.join(names)}}} as Linear modules; "
                                f"pruning needs the {known.name} attention layout")
        if known.moe:
            if not is_moe(layer.mlp):
                raise CompressError(f"decoder layer {index} of this {known.name} model has no mlp.gate (router) and "
                                    f"mlp.experts (gate_up_proj, down_proj): pruning needs transformers 5's MoE layout")
            continue
        mlp = getattr(layer, "mlp", None)
        names = ("gate_up_proj", "down_proj") if known.fused_gate_up else ("gate_proj", "up_proj", "down_proj")
        if mlp is None or not all(isinstance(getattr(mlp, n, None), torch.nn.Linear) for n in names):
            raise CompressError(f"decoder layer {index} lacks mlp.{{{', '.join(names)}}} as Linear modules; "
                                f"pruning needs the Llama layer layout")


def is_moe(mlp: torch.nn.Module) -> bool:
    experts = getattr(mlp, "experts", None)
    return (hasattr(getattr(mlp, "gate", None), "weight") and experts is not None
            and getattr(experts, "gate_up_proj", None) is not None and getattr(experts, "down_proj", None) is not None)


# ---------------------------------------------------------------- how many to keep


def kept_count(total: int, ratio: float, unit_width: int, multiple: int, keep_one: bool = False) -> int:
    """The count closest to total·(1-ratio) whose width (count·unit_width) is a multiple of `multiple`; 0 if zero
    is closest (the caller reports it) unless `keep_one`, which keeps the smallest non-zero count. Ties keep more."""
    step = multiple // math.gcd(multiple, unit_width)
    target = total * (1 - ratio)
    candidates = list(range(step if keep_one else 0, total + 1, step)) + ([total] if total % step else [])
    return min(candidates, key=lambda c: (abs(c - target), -c))


def heads_mode(widths: LayerWidths, requested: str) -> str:
    """`auto`: query heads within KV groups when there are several per group (GQA), else whole KV groups (MHA)."""
    per_group = widths.num_attention_heads // widths.num_key_value_heads
    if requested == "auto":
        return "query" if per_group > 1 else "kv_groups"
    if requested == "query" and per_group == 1:
        raise CompressError(f"heads: query keeps the same number of query heads in every KV group, but this model has "
                            f"one query head per KV head ({widths.num_attention_heads} heads, "
                            f"{widths.num_key_value_heads} KV heads): removing one would remove its KV group; use "
                            f"heads: kv_groups (or auto)")
    return requested


def planned_widths(widths: LayerWidths, ratio: float, heads: str, targets, multiple: int, dim: int,
                   where: str, keep_one: bool = False) -> LayerWidths:
    """The widths a layer is pruned to at `ratio`; raises if a ratio leaves no head or no channel (with `keep_one`,
    as global ranking needs, it keeps the smallest valid width instead)."""
    q, kv, inter = widths.num_attention_heads, widths.num_key_value_heads, widths.intermediate_size
    if "attention" in targets:
        per_group = q // kv
        if heads_mode(widths, heads) == "query":
            keep = kept_count(per_group, ratio, kv * dim, multiple, keep_one)
            if keep == 0:
                raise CompressError(f"ratio {ratio} leaves no query head per KV group in {where} ({per_group} per "
                                    f"group, head_dim {dim}, widths rounded to multiples of {multiple}); lower the "
                                    f"ratio or the multiple")
            q = keep * kv
        else:
            keep = kept_count(kv, ratio, per_group * dim, multiple, keep_one)
            if keep == 0:
                raise CompressError(f"ratio {ratio} leaves no KV group in {where} ({kv} groups of {per_group} query "
                                    f"heads, head_dim {dim}, widths rounded to multiples of {multiple}); lower the "
                                    f"ratio or the multiple")
            q, kv = keep * per_group, keep
    shared = widths.shared_expert_size
    if "mlp" in targets:
        inter = kept_count(inter, ratio, 1, multiple, keep_one)
        shared = kept_count(shared, ratio, 1, multiple, keep_one) if shared else 0
        if inter == 0 or (widths.shared_expert_size and shared == 0):
            sizes = f"{widths.intermediate_size} channels" + (
                f", a shared expert of {widths.shared_expert_size}" if widths.shared_expert_size else "")
            raise CompressError(f"ratio {ratio} leaves no MLP channel in {where} ({sizes} rounded to multiples of "
                                f"{multiple}); lower the ratio or the multiple")
    return LayerWidths(q, kv, inter, widths.num_experts, shared)


def planned_experts(widths: LayerWidths, ratio: float, top_k: int, where: str) -> LayerWidths:
    """The widths after removing `ratio` of an MoE layer's experts; the router must still find top_k of them."""
    keep = widths.num_experts - round(widths.num_experts * ratio)
    if keep < top_k:
        raise CompressError(f"experts: {ratio} keeps {keep} of {widths.num_experts} experts in {where}, fewer than "
                            f"the {top_k} each token is routed to; lower experts to at most "
                            f"{(widths.num_experts - top_k) / widths.num_experts:.2f}")
    return replace(widths, num_experts=keep)


def stock_config_problem(config, widths: LayerWidths, dim: int) -> str | None:
    """Why transformers would refuse `config` with every layer at `widths`, or None. The family's own validation
    decides (transformers ≥ 5.17 validates configs when they are built, saved and loaded; LlamaConfig requires
    hidden_size % num_attention_heads == 0 even with an explicit head_dim; Mistral and Qwen2 check nothing of the
    kind), so the rule is always the installed transformers' rule."""
    candidate = copy.deepcopy(config)
    _write_widths(candidate, widths, dim)
    validate = getattr(candidate, "validate", None)
    if validate is None:  # transformers before config validation: every config is accepted
        return None
    try:
        validate()
    except Exception as error:  # noqa: BLE001 -- transformers wraps its ValueError in its own error class
        return str(error).strip().splitlines()[-1].strip().removeprefix("ValueError: ")
    return None


def check_stock_config(model: torch.nn.Module, prune_config, widths: LayerWidths) -> None:
    """Uniform pruning writes the kept widths into the stock config fields; refuse, before any work, widths that the
    family's config validation rejects, naming the nearest ratios that pass."""
    dim = head_dim(model)
    problem = stock_config_problem(model.config, widths, dim)
    if problem is None:
        return
    original = layer_widths(decoder_layers(model)[0], family(model))
    ranges: dict[int, list[float]] = {}  # kept heads -> the ratios that keep that many and pass validation
    for percent in range(1, 100):
        ratio = percent / 100
        try:
            candidate = planned_widths(original, ratio, prune_config.heads, prune_config.targets,
                                       prune_config.multiple, dim, "decoder layer 0")
        except CompressError:
            continue
        if stock_config_problem(model.config, candidate, dim) is None:
            ranges.setdefault(candidate.num_attention_heads, []).append(ratio)
    nearest = sorted(ranges.items(), key=lambda item: min(abs(r - prune_config.ratio) for r in item[1]))[:2]
    choices = [f"ratio {min(rs):g} to {max(rs):g} ({heads} heads"
               f"{', attention unpruned' if heads == original.num_attention_heads else ''})" for heads, rs in nearest]
    suggestion = f"valid choices: {' or '.join(choices)}; or " if choices else ""
    raise CompressError(
        f"uniform pruning at ratio {prune_config.ratio:g} keeps {widths.num_attention_heads} of "
        f"{original.num_attention_heads} attention heads in every layer, and {type(model.config).__name__} refuses "
        f"that config ({problem}); {suggestion}targets: [mlp] to keep every head, or uniform: false (per-layer "
        f"widths, loaded by compress.load)")


# ---------------------------------------------------------------- which to keep


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    return scores.topk(count).indices.sort().values


def kv_group_scores(query_scores: torch.Tensor, kv_scores: torch.Tensor) -> torch.Tensor:
    """A KV group's score: its k/v rows' plus every query head's that reads it."""
    return query_scores.view(kv_scores.numel(), -1).sum(1) + kv_scores


def select_heads(query_scores: torch.Tensor, kv_scores: torch.Tensor, target: LayerWidths, mode: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the query heads and KV heads to keep. query_scores [heads], kv_scores [kv heads]."""
    kv = kv_scores.numel()
    per_group = query_scores.numel() // kv
    by_group = query_scores.view(kv, per_group)
    if mode == "query":
        keep = target.num_attention_heads // kv
        within = torch.stack([_top(by_group[g], keep) for g in range(kv)])
        query = (within + torch.arange(kv)[:, None] * per_group).flatten()
        return query, torch.arange(kv)
    groups = _top(kv_group_scores(query_scores, kv_scores), target.num_key_value_heads)
    query = (groups[:, None] * per_group + torch.arange(per_group)).flatten()
    return query, groups


def select_channels(channel_scores: torch.Tensor, target: LayerWidths, shared: bool = False) -> torch.Tensor:
    """The channels to keep: of an MLP or one expert, or with `shared` of the MoE block's shared expert."""
    return _top(channel_scores, target.shared_expert_size if shared else target.intermediate_size)


# ---------------------------------------------------------------- surgery


# ---------------------------------------------------------------- config


def record_widths(model: torch.nn.Module) -> None:
    """Write the layers' widths into the config: stock fields when every layer has the same widths and the family's
    config validation accepts them (a stock transformers config), else the per-layer list that compress.load builds
    from, with the stock fields at widths every layer fits in (transformers builds at those, we then shrink)."""
    config = model.config
    known = family(model)
    widths = [layer_widths(layer, known) for layer in decoder_layers(model)]
    dim = head_dim(model)
    if len(set(widths)) == 1 and stock_config_problem(config, widths[0], dim) is None:
        _write_widths(config, widths[0], dim)  # head_dim: no longer hidden_size // num_attention_heads
        if hasattr(config, LAYER_WIDTHS_KEY):
            delattr(config, LAYER_WIDTHS_KEY)
        return
    if widths[0].num_experts:
        raise CompressError("an MoE model's config holds one expert count and width for every layer, and these "
                            "layers differ; prune MoE models with uniform: true")
    widest = LayerWidths(max(w.num_attention_heads for w in widths), max(w.num_key_value_heads for w in widths),
                         max(w.intermediate_size for w in widths))
    if stock_config_problem(config, widest, dim) is None:  # else keep the fields the model was built with
        config.num_attention_heads = widest.num_attention_heads
        config.num_key_value_heads = widest.num_key_value_heads
        config.intermediate_size = widest.intermediate_size
    config.head_dim = dim
    setattr(config, LAYER_WIDTHS_KEY, [asdict(w) for w in widths])


def _write_widths(config, widths: LayerWidths, dim: int) -> None:
    """A config's width fields at `widths` (MoE families name their expert fields in compress.architectures)."""
    config.num_attention_heads = widths.num_attention_heads
    config.num_key_value_heads = widths.num_key_value_heads
    config.head_dim = dim
    if widths.num_experts:
        known = family(config)
        setattr(config, known.experts_field, widths.num_experts)
        setattr(config, known.expert_width_field, widths.intermediate_size)
        if widths.shared_expert_size:
            setattr(config, known.shared_expert_width_field, widths.shared_expert_size)
    else:
        config.intermediate_size = widths.intermediate_size



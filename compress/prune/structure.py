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
it as is); different widths are listed in `compress_layer_widths` and built by `build_layers_at_recorded_widths`."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace

import torch

from compress.architectures import family
from compress.errors import CompressError
from compress.modules import decoder_layers

LAYER_WIDTHS_KEY = "compress_layer_widths"


@dataclass(frozen=True)
class LayerWidths:
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int  # the MLP's channels; in an MoE layer, each expert's
    num_experts: int = 0  # MoE layers only
    shared_expert_size: int = 0  # MoE layers with a shared expert (Qwen2-MoE): its channels


def check_supported(model: torch.nn.Module) -> None:
    """The family must be one pruning handles (compress.architectures), with its layer layout in every layer: the
    Llama layout, or for MoE families Llama attention and an MLP of a router (`gate`) and fused `experts`."""
    known = family(model)
    for index, layer in enumerate(decoder_layers(model)):
        attn = getattr(layer, "self_attn", None)
        names = ("qkv_proj", "o_proj") if known.attention == "qkv/o" else ("q_proj", "k_proj", "v_proj", "o_proj")
        if attn is None or not all(isinstance(getattr(attn, n, None), torch.nn.Linear) for n in names):
            raise CompressError(f"decoder layer {index} lacks self_attn.{{{', '.join(names)}}} as Linear modules; "
                                f"pruning needs the {known.name} attention layout")
        if known.mlp == "experts":
            if not is_moe(layer.mlp):
                raise CompressError(f"decoder layer {index} of this {known.name} model has no mlp.gate (router) and "
                                    f"mlp.experts (gate_up_proj, down_proj): pruning needs transformers 5's MoE layout")
            continue
        mlp = getattr(layer, "mlp", None)
        names = ("gate_up_proj", "down_proj") if known.mlp == "gate_up/down" else ("gate_proj", "up_proj", "down_proj")
        if mlp is None or not all(isinstance(getattr(mlp, n, None), torch.nn.Linear) for n in names):
            raise CompressError(f"decoder layer {index} lacks mlp.{{{', '.join(names)}}} as Linear modules; "
                                f"pruning needs the Llama layer layout")


def is_moe(mlp: torch.nn.Module) -> bool:
    experts = getattr(mlp, "experts", None)
    return (hasattr(getattr(mlp, "gate", None), "weight") and experts is not None
            and getattr(experts, "gate_up_proj", None) is not None and getattr(experts, "down_proj", None) is not None)


def shared_expert(mlp: torch.nn.Module) -> torch.nn.Module | None:
    """An MoE block's shared expert (Qwen2-MoE: a dense gate/up/down MLP beside the routed experts), or None."""
    return getattr(mlp, "shared_expert", None)


def head_dim(model: torch.nn.Module) -> int:
    return decoder_layers(model)[0].self_attn.head_dim


def layer_widths(layer: torch.nn.Module) -> LayerWidths:
    attn = layer.self_attn
    if hasattr(attn, "qkv_proj"):  # Phi-3: [q rows | k rows | v rows] in one Linear
        kv = attn.num_key_value_heads
        heads = attn.qkv_proj.out_features // attn.head_dim - 2 * kv, kv
    else:
        heads = attn.q_proj.out_features // attn.head_dim, attn.k_proj.out_features // attn.head_dim
    if is_moe(layer.mlp):
        experts, shared = layer.mlp.experts, shared_expert(layer.mlp)
        return LayerWidths(*heads, experts.down_proj.shape[-1], experts.down_proj.shape[0],
                           shared.down_proj.in_features if shared is not None else 0)
    return LayerWidths(*heads, layer.mlp.down_proj.in_features)


def fused_rows(attn: torch.nn.Module) -> tuple[slice, slice, slice]:
    """The q, k and v rows of a fused qkv_proj."""
    q = attn.qkv_proj.out_features - 2 * attn.num_key_value_heads * attn.head_dim
    kv = attn.num_key_value_heads * attn.head_dim
    return slice(0, q), slice(q, q + kv), slice(q + kv, q + 2 * kv)


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
    original = layer_widths(decoder_layers(model)[0])
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
    choices = [f"ratio {min(rs):g} to {max(rs):g} ({heads} heads{', attention unpruned' if heads == original.num_attention_heads else ''})"
               for heads, rs in nearest]
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


def _rows(heads: torch.Tensor, dim: int) -> torch.Tensor:
    return (heads[:, None] * dim + torch.arange(dim)).flatten()


def _keep_outputs(linear: torch.nn.Linear, index: torch.Tensor) -> None:
    index = index.to(linear.weight.device)
    linear.weight = torch.nn.Parameter(linear.weight.data.index_select(0, index), linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = torch.nn.Parameter(linear.bias.data.index_select(0, index), linear.bias.requires_grad)
    linear.out_features = index.numel()


def _keep_inputs(linear: torch.nn.Linear, index: torch.Tensor) -> None:
    index = index.to(linear.weight.device)
    linear.weight = torch.nn.Parameter(linear.weight.data.index_select(1, index), linear.weight.requires_grad)
    linear.in_features = index.numel()


def shrink_attention(attn: torch.nn.Module, query: torch.Tensor, kv: torch.Tensor) -> None:
    """Keep only the given query heads and KV heads (weights sliced, module sizes updated)."""
    dim = attn.head_dim
    if hasattr(attn, "qkv_proj"):  # fused: the kept rows of each part, in q | k | v order
        q, k, v = fused_rows(attn)
        _keep_outputs(attn.qkv_proj, torch.cat([q.start + _rows(query, dim), k.start + _rows(kv, dim),
                                                v.start + _rows(kv, dim)]))
        attn.num_key_value_heads = kv.numel()  # Phi-3 splits qkv with it (and the q width with its config's heads)
    else:
        _keep_outputs(attn.q_proj, _rows(query, dim))
        _keep_outputs(attn.k_proj, _rows(kv, dim))
        _keep_outputs(attn.v_proj, _rows(kv, dim))
    _keep_inputs(attn.o_proj, _rows(query, dim))
    attn.num_key_value_groups = query.numel() // kv.numel()  # read by repeat_kv / SDPA's GQA path


def shrink_mlp(mlp: torch.nn.Module, channels: torch.Tensor) -> None:
    if hasattr(mlp, "gate_up_proj"):  # fused: [gate rows | up rows]
        width = mlp.down_proj.in_features
        _keep_outputs(mlp.gate_up_proj, torch.cat([channels, width + channels]))
    else:
        _keep_outputs(mlp.gate_proj, channels)
        _keep_outputs(mlp.up_proj, channels)
    _keep_inputs(mlp.down_proj, channels)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = channels.numel()


def shrink_experts(mlp: torch.nn.Module, experts: torch.Tensor, channels: torch.Tensor) -> None:
    """Keep the given experts of an MoE block (router rows with them) and, in each kept expert, its own channels:
    channels [kept experts, kept channels], indices into that expert's intermediate width."""
    block, router = mlp.experts, mlp.gate
    device = block.gate_up_proj.device
    experts, channels = experts.to(device), channels.to(device)
    width = block.down_proj.shape[-1]
    gate_up = block.gate_up_proj.data[experts]  # [kept, 2I, H]: gate rows then up rows
    rows = torch.cat([channels, channels + width], 1)  # each expert's gate and up rows of its kept channels
    gate_up = gate_up.gather(1, rows[:, :, None].expand(-1, -1, gate_up.shape[-1]))
    down = block.down_proj.data[experts]  # [kept, H, I]
    down = down.gather(2, channels[:, None, :].expand(-1, down.shape[1], -1))
    block.gate_up_proj = torch.nn.Parameter(gate_up.contiguous(), block.gate_up_proj.requires_grad)
    block.down_proj = torch.nn.Parameter(down.contiguous(), block.down_proj.requires_grad)
    router.weight = torch.nn.Parameter(router.weight.data[experts].contiguous(), router.weight.requires_grad)
    if getattr(router, "bias", None) is not None:  # e.g. expert score-correction biases
        router.bias = torch.nn.Parameter(router.bias.data[experts].contiguous(), router.bias.requires_grad)
    for module, name in ((block, "num_experts"), (router, "num_experts")):
        if hasattr(module, name):
            setattr(module, name, experts.numel())
    if hasattr(block, "intermediate_dim"):
        block.intermediate_dim = channels.shape[1]


def shrink_layer_to(layer: torch.nn.Module, widths: LayerWidths) -> None:
    """Resize a layer to `widths` keeping the first heads, channels and experts (shapes only: meta-device models)."""
    shrink_attention(layer.self_attn, torch.arange(widths.num_attention_heads), torch.arange(widths.num_key_value_heads))
    if widths.num_experts:
        shrink_experts(layer.mlp, torch.arange(widths.num_experts),
                       torch.arange(widths.intermediate_size).expand(widths.num_experts, -1))
        if widths.shared_expert_size:
            shrink_mlp(layer.mlp.shared_expert, torch.arange(widths.shared_expert_size))
    else:
        shrink_mlp(layer.mlp, torch.arange(widths.intermediate_size))


# ---------------------------------------------------------------- config


def record_widths(model: torch.nn.Module) -> None:
    """Write the layers' widths into the config: stock fields when every layer has the same widths and the family's
    config validation accepts them (a stock transformers config), else the per-layer list that compress.load builds
    from, with the stock fields at widths every layer fits in (transformers builds at those, we then shrink)."""
    config = model.config
    widths = [layer_widths(layer) for layer in decoder_layers(model)]
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


def build_layers_at_recorded_widths(model: torch.nn.Module) -> None:
    """Resize a freshly built model's layers to the widths listed in its config (no-op for stock configs). Meant for
    a model built on the meta device: only shapes change here, the checkpoint's weights are loaded afterwards."""
    recorded = getattr(model.config, LAYER_WIDTHS_KEY, None)
    if not recorded:
        return
    layers = decoder_layers(model)
    if len(recorded) != len(layers):
        raise CompressError(f"config lists widths for {len(recorded)} layers but the model has {len(layers)}")
    for layer, widths in zip(layers, recorded):
        shrink_layer_to(layer, LayerWidths(**widths))

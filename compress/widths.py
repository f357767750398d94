"""A decoder layer's widths (attention heads, KV heads, MLP channels, experts): read from its modules, cut down to
kept heads and channels, and recorded in a config for layers of different widths.

Pruning chooses what to keep (compress.prune); the surgery here only slices the weights, and the loader uses the same
surgery to build a model at the per-layer widths its config records (`compress_layer_widths`). Where a family fuses
q/k/v or gate/up into one Linear, or keeps experts, is the families table's (compress.architectures)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.architectures import Family, family
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


def shared_expert(mlp: torch.nn.Module) -> torch.nn.Module | None:
    """An MoE block's shared expert (Qwen2-MoE: a dense gate/up/down MLP beside the routed experts), or None."""
    return getattr(mlp, "shared_expert", None)


def head_dim(model: torch.nn.Module) -> int:
    return decoder_layers(model)[0].self_attn.head_dim


def layer_widths(layer: torch.nn.Module, known: Family) -> LayerWidths:
    """The widths of a decoder layer of family `known` (compress.architectures: fused q/k/v, experts)."""
    attn = layer.self_attn
    if known.fused_qkv:  # Phi-3: [q rows | k rows | v rows] in one Linear
        kv = attn.num_key_value_heads
        heads = attn.qkv_proj.out_features // attn.head_dim - 2 * kv, kv
    else:
        heads = attn.q_proj.out_features // attn.head_dim, attn.k_proj.out_features // attn.head_dim
    if known.moe:
        experts, shared = layer.mlp.experts, shared_expert(layer.mlp)
        return LayerWidths(*heads, experts.down_proj.shape[-1], experts.down_proj.shape[0],
                           shared.down_proj.in_features if shared is not None else 0)
    return LayerWidths(*heads, layer.mlp.down_proj.in_features)


def fused_rows(attn: torch.nn.Module) -> tuple[slice, slice, slice]:
    """The q, k and v rows of a fused qkv_proj."""
    q = attn.qkv_proj.out_features - 2 * attn.num_key_value_heads * attn.head_dim
    kv = attn.num_key_value_heads * attn.head_dim
    return slice(0, q), slice(q, q + kv), slice(q + kv, q + 2 * kv)


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


def shrink_attention(attn: torch.nn.Module, query: torch.Tensor, kv: torch.Tensor, *, fused: bool) -> None:
    """Keep only the given query heads and KV heads (weights sliced, module sizes updated); `fused`: the family's
    q/k/v are one qkv_proj (Family.fused_qkv)."""
    dim = attn.head_dim
    if fused:  # the kept rows of each part, in q | k | v order
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


def shrink_mlp(mlp: torch.nn.Module, channels: torch.Tensor, *, fused: bool) -> None:
    """Keep only the given channels of a gate/up/down MLP; `fused`: gate and up are one gate_up_proj
    (Family.fused_gate_up)."""
    if fused:  # [gate rows | up rows]
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


def shrink_layer_to(layer: torch.nn.Module, widths: LayerWidths, known: Family) -> None:
    """Resize a layer to `widths` keeping the first heads, channels and experts (shapes only: meta-device models)."""
    shrink_attention(layer.self_attn, torch.arange(widths.num_attention_heads),
                     torch.arange(widths.num_key_value_heads), fused=known.fused_qkv)
    if widths.num_experts:
        shrink_experts(layer.mlp, torch.arange(widths.num_experts),
                       torch.arange(widths.intermediate_size).expand(widths.num_experts, -1))
        if widths.shared_expert_size:
            shrink_mlp(layer.mlp.shared_expert, torch.arange(widths.shared_expert_size), fused=False)
    else:
        shrink_mlp(layer.mlp, torch.arange(widths.intermediate_size), fused=known.fused_gate_up)

def build_layers_at_recorded_widths(model: torch.nn.Module) -> None:
    """Resize a freshly built model's layers to the widths listed in its config (no-op for stock configs). Meant for
    a model built on the meta device: only shapes change here, the checkpoint's weights are loaded afterwards."""
    recorded = getattr(model.config, LAYER_WIDTHS_KEY, None)
    if not recorded:
        return
    layers, known = decoder_layers(model), family(model)
    if len(recorded) != len(layers):
        raise CompressError(f"config lists widths for {len(recorded)} layers but the model has {len(layers)}")
    for layer, widths in zip(layers, recorded):
        shrink_layer_to(layer, LayerWidths(**widths), known)

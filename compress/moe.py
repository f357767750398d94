"""Mixture-of-Experts experts as Linear modules, for the steps that work on Linears (quantization: RTN, GPTQ, FP8,
QAT, and the packed runtime).

transformers 5 keeps a block's experts fused — `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I] parameters of
one module — which no Linear hook sees and no per-Linear grid describes. `unfuse_experts` replaces that module by
`ExpertLinears`: one small module per expert with its gate, up and down Linears, named as the family's own
checkpoints name them (Mixtral: w1, w3, w2; Qwen-MoE: gate_proj, up_proj, down_proj). Its state dict is then that
per-expert layout — what vLLM reads for a quantized MoE checkpoint and what transformers' loader fuses back for a
float one — and the computation is the fused module's (same routing, same mixing).

Calibration: while `calibrating_all_experts` is on, every expert computes on every token and
its output is mixed with the router's weight for that token (0 where the token was not routed to it), so the block's
output is unchanged while each expert's Hessian sees all calibration tokens — llm-compressor's default for MoE
calibration (`calibrate_all_experts`): an expert that few calibration tokens reach still gets well-conditioned
statistics. Routers (and Qwen2-MoE's shared-expert gate) stay float."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

from compress.architectures import family
from compress.modules import QUANT_ATTR, decoder_layers


class ExpertLinears(torch.nn.ModuleList):
    """The experts of one MoE block as Linears; forward(hidden_states [T, H], top_k_index [T, k], top_k_weights)."""

    def __init__(self, experts: list[torch.nn.Module], names: tuple[str, str, str], act_fn, fused_class=None):
        super().__init__(experts)
        self.names = names  # gate, up, down
        self.__dict__["act_fn"] = act_fn  # not a child module: the list holds exactly the experts
        self.num_experts = len(experts)
        self.calibrate_all = False
        self.fused_class = fused_class  # the family's fused experts module, for fuse_experts

    @classmethod
    def from_fused(cls, fused: torch.nn.Module, names: tuple[str, str, str]) -> "ExpertLinears":
        count, double_width, _ = fused.gate_up_proj.shape
        width = double_width // 2
        experts = []
        for index in range(count):
            expert = torch.nn.Module()
            for name, weight in zip(names, (fused.gate_up_proj[index, :width], fused.gate_up_proj[index, width:],
                                            fused.down_proj[index])):
                linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
                linear.weight = torch.nn.Parameter(weight.detach().clone(), fused.gate_up_proj.requires_grad)
                setattr(expert, name, linear)
            experts.append(expert)
        return cls(experts, names, fused.act_fn, type(fused))

    def _expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self[index], name) for name in self.names)
        return down(self.act_fn(gate(x)) * up(x))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        output = torch.zeros_like(hidden_states)
        for index in range(self.num_experts):
            routed = top_k_index == index  # [T, k]
            if self.calibrate_all:  # every token through the expert, mixed with weight 0 where it was not routed
                weight = (top_k_weights * routed).sum(-1)
                output += self._expert(index, hidden_states) * weight[:, None].to(output.dtype)
                continue
            token, slot = torch.where(routed)
            if token.numel():
                out = self._expert(index, hidden_states[token]) * top_k_weights[token, slot, None]
                output.index_add_(0, token, out.to(output.dtype))
        return output


def moe_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The MoE blocks (router `gate` + `experts`) of a model's decoder layers, fused or not."""
    return [layer.mlp for layer in decoder_layers(model)
            if hasattr(getattr(layer, "mlp", None), "experts") and hasattr(layer.mlp, "gate")]


def unfuse_experts(model: torch.nn.Module) -> int:
    """Replace every fused experts module by ExpertLinears, in place; returns how many were replaced."""
    names = family(model).expert_names
    replaced = 0
    for block in moe_blocks(model):
        if not isinstance(block.experts, ExpertLinears):
            block.experts = ExpertLinears.from_fused(block.experts, names)
            replaced += 1
    return replaced


@torch.no_grad()
def fuse_experts(model: torch.nn.Module) -> int:
    """The inverse of unfuse_experts for float experts (quantized ones stay Linears: their grids are per Linear)."""
    fused_count = 0
    for block in moe_blocks(model):
        experts = block.experts
        if not isinstance(experts, ExpertLinears) or experts.fused_class is None:
            continue
        if any(hasattr(m, QUANT_ATTR) for m in experts.modules()):
            continue
        gate, up, down = ([getattr(expert, name).weight for expert in experts] for name in experts.names)
        with torch.device("meta"):
            config = copy.copy(model.config)
            setattr(config, family(model).experts_field, len(experts))
            setattr(config, family(model).expert_width_field, down[0].shape[1])
            fused = experts.fused_class(config)
        fused.gate_up_proj = torch.nn.Parameter(torch.stack([torch.cat(pair) for pair in zip(gate, up)]))
        fused.down_proj = torch.nn.Parameter(torch.stack(down))
        block.experts = fused
        fused_count += 1
    return fused_count


@contextmanager
def calibrating_all_experts(model: torch.nn.Module):
    """Every expert computes on every token (see the module's note) while the context is open."""
    experts = [block.experts for block in moe_blocks(model) if isinstance(block.experts, ExpertLinears)]
    for module in experts:
        module.calibrate_all = True
    try:
        yield
    finally:
        for module in experts:
            module.calibrate_all = False


def has_unfused_experts(state_keys) -> bool:
    """Whether a checkpoint's keys hold per-expert Linears (`...experts.3.w1.weight`, ...)."""
    import re

    pattern = re.compile(r"\.experts\.\d+\.")
    return any(pattern.search(key) for key in state_keys)

"""Which experts of a Mixture-of-Experts layer matter: REAP (Lasby et al. 2025, "REAP the Experts: Why Pruning
Prevails for One-Shot MoE compression"). An expert's saliency is the mean, over the calibration tokens routed to it,
of its router weight times the norm of its output:

    S_j = (1 / |X_j|) · Σ_{x ∈ X_j} g_j(x) · ‖f_j(x)‖₂

where g_j(x) is the weight the block mixes expert j's output with (after top-k, renormalized where the family
does) — so an expert that is chosen often but contributes little, or contributes much but with a small weight, both
score low. An expert that no calibration token reaches scores 0 and goes first. The kept experts' router rows are
kept with them, so the router still picks top-k among the experts that remain."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from rich.progress import track

from compress import distributed


@torch.no_grad()
def expert_saliency(model: torch.nn.Module, blocks: list[torch.nn.Module], input_ids: torch.Tensor,
                    show_progress: bool = True) -> list[torch.Tensor]:
    """REAP saliency [experts] of each MoE block in `blocks` (modules with a router `gate` and fused `experts`), from
    one forward pass per calibration sample. Under several processes each runs its share and the sums are
    all-reduced."""
    sums = [torch.zeros(block.experts.gate_up_proj.shape[0], dtype=torch.float64) for block in blocks]
    counts = [torch.zeros_like(total) for total in sums]

    def recorder(index: int):
        def record(experts, args, kwargs):
            hidden, top_k_index, top_k_weights = (list(args) + [kwargs.get(k) for k in
                                                                ("hidden_states", "top_k_index", "top_k_weights")
                                                                if k in kwargs])[:3]
            for expert in top_k_index.unique().tolist():
                token, slot = torch.where(top_k_index == expert)
                gate, up = F.linear(hidden[token], experts.gate_up_proj[expert]).chunk(2, dim=-1)
                output = F.linear(experts.act_fn(gate) * up, experts.down_proj[expert])
                weight = top_k_weights[token, slot].float()
                sums[index][expert] += (weight * output.float().norm(dim=-1)).sum().item()
                counts[index][expert] += token.numel()
        return record

    handles = [block.experts.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, block in enumerate(blocks)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for sample in track(distributed.share(input_ids), description="pruning: expert saliency",
                            disable=not show_progress, transient=True):
            model(input_ids=sample[None].to(device), use_cache=False)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    for total in (*sums, *counts):
        distributed.all_sum_(total)
    return [(total / count.clamp(min=1)).float() for total, count in zip(sums, counts)]


def select_experts(saliency: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` most salient experts, in their original order."""
    return saliency.topk(keep).indices.sort().values

"""How much the loss would change if a group of weights were removed (LLM-Pruner, Ma et al. 2023, §3.2).

Removing a weight w (setting it to 0) changes the loss by, to second order,
    ΔL ≈ −g·w + ½·w·H·w,   g = ∂L/∂w on a small calibration set, diag(H) ≈ F = mean over samples of g².
The variants, as LLM-Pruner names them (its `--taylor` options), per element of a Linear weight:
    element1 (param_first):  |w·g|
    element2 (param_second): |½·w²·F|
    mix      (param_mix):    |−w·g + ½·w²·F|
    vector   (vectorize):    w·g, summed over the channel first and then taken in absolute value (the salience of
                             the channel's weight vector as a whole)
and the data-free baselines l1 (|w|), l2 (w²) and random. A channel's score is the sum over its elements; a group's
score (a head, an MLP channel across gate/up/down) is the sum over its members, as LLM-Pruner's group reduction."""

from __future__ import annotations

from typing import Callable

import torch
from rich.progress import track

from compress import distributed
from compress.architectures import Family
from compress.errors import CompressError
from compress.modules import available_memory
from compress.widths import fused_rows, shared_expert

# channel_score(linear or weight, keep): one score per channel, channels along weight dimension(s) `keep` (0: output
# rows, e.g. q_proj heads; 1: input columns, e.g. o_proj heads; (0, 1) of an MoE block's [experts, 2I, H] gate_up_proj:
# per expert and row), every other dimension summed
ChannelScore = Callable[[torch.nn.Module | torch.Tensor, int | tuple[int, ...]], torch.Tensor]


def gradient_statistics(model: torch.nn.Module, weights: list[torch.nn.Parameter], input_ids: torch.Tensor,
                        fisher: bool, show_progress: bool = True) -> tuple[dict, dict]:
    """Mean gradient of the language-model loss over the calibration samples for each of `weights` (float32), and
    with `fisher` the mean squared per-sample gradient. One sample per backward pass: the per-sample squares need
    it, and it bounds activation memory. Gradients are folded into the sums as soon as each is produced (a
    post-accumulate hook), so no full set of .grad tensors is ever held. Under several processes each runs its share
    of the samples and the sums are all-reduced."""
    device = weights[0].device
    check_gradient_memory(weights, fisher)
    mean = {p: torch.zeros_like(p, dtype=torch.float32) for p in weights}
    squares = {p: torch.zeros_like(p, dtype=torch.float32) for p in weights} if fisher else {}
    n = input_ids.shape[0]
    if n < distributed.world_size():
        raise CompressError(f"{n} calibration samples for {distributed.world_size()} processes: each process needs at "
                            f"least one; raise calibration.samples or launch fewer processes")

    def fold(param: torch.nn.Parameter) -> None:
        grad = param.grad.float()
        mean[param].add_(grad, alpha=1 / n)
        if fisher:
            squares[param].addcmul_(grad, grad, value=1 / n)
        param.grad = None

    trainable = {p: p.requires_grad for p in model.parameters()}
    for p in trainable:
        p.requires_grad_(False)
    handles = []
    try:
        for p in weights:
            p.requires_grad_(True)
            handles.append(p.register_post_accumulate_grad_hook(fold))
        was_training = model.training
        model.eval()  # no dropout: the gradient of the deployed function
        for sample in track(distributed.share(input_ids), description="pruning: gradients", disable=not show_progress,
                            transient=True):
            ids = sample[None].to(device)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in trainable.items():
            p.requires_grad_(flag)
            p.grad = None
    for total in (*mean.values(), *squares.values()):
        distributed.all_sum_(total)
    check_finite_gradients(model, mean, squares)
    return mean, squares


def check_finite_gradients(model: torch.nn.Module, mean: dict, squares: dict) -> None:
    """Stop, naming the weight, when a gradient sum is NaN or inf: every score from it would be too, and pruning would
    keep or drop channels at random. Checked on the all-reduced sums, alike on every rank, so all stop together."""
    names = {param: name for name, param in model.named_parameters()}
    for sums, what in ((mean, "gradients"), (squares, "squared gradients")):
        for param, total in sums.items():
            bad = ~torch.isfinite(total)
            if bad.any():
                raise CompressError(f"prune (Taylor importance): the {what} of {names.get(param, 'a scored weight')} "
                                    f"have {int(bad.sum())} NaN or inf entries, so its importance scores are not "
                                    f"finite: the model's loss on the calibration data is not finite (check its "
                                    f"weights for NaN/inf; in float16, try dtype bfloat16 or float32)")


def check_gradient_memory(weights: list[torch.nn.Parameter], fisher: bool) -> None:
    """Refuse, before any backward pass, when the float32 sums (and squares) of the scored weights' gradients do
    not fit beside the model: a clear error now rather than an out-of-memory error after minutes (Mixtral-8x7B's
    element1 sums are 173 GiB)."""
    need = sum(p.numel() for p in weights) * 4 * (2 if fisher else 1)
    device = weights[0].device
    free = available_memory(device)
    # 90 %: the backward pass needs room of its own (activations, one layer's bf16 gradients)
    if distributed.all_true(not free or need <= 0.9 * free):
        return
    what = "sums and squares" if fisher else "sums"
    raise CompressError(f"gradient importance keeps float32 gradient {what} of every scored weight: "
                        f"{need / 2**20:,.1f} MiB, and {device} has {free / 2**20:,.1f} MiB free beside the model; "
                        f"score with importance l1 or l2 (no gradients; MoE experts are still ranked by REAP), or "
                        f"run on a device with more memory")


def channel_scorer(kind: str, gradient: dict, fisher: dict) -> ChannelScore:
    """The per-channel score function for an importance kind, given gradient_statistics' outputs."""

    def score(linear_or_weight, keep) -> torch.Tensor:
        weight = getattr(linear_or_weight, "weight", linear_or_weight)
        keep = (keep,) if isinstance(keep, int) else tuple(keep)
        w = weight.detach().float()
        other = tuple(d for d in range(w.dim()) if d not in keep)
        if kind == "random":
            return torch.rand([w.shape[d] for d in keep], device=w.device)
        if kind == "l1":
            return w.abs().sum(other)
        if kind == "l2":
            return w.square().sum(other)
        g = gradient[weight]
        if kind == "vector":
            return (w * g).sum(other).abs()
        if kind == "element1":
            return (w * g).abs().sum(other)
        second = 0.5 * w.square() * fisher[weight]
        if kind == "element2":
            return second.abs().sum(other)
        return (second - w * g).abs().sum(other)  # mix

    return score


@torch.no_grad()
def layer_group_scores(layer: torch.nn.Module, score: ChannelScore, targets, known: Family) -> dict[str, torch.Tensor]:
    """Scores of one decoder layer's groups, for the targets pruned: `query` [heads], `kv` [KV heads] (their k/v
    rows only; select_heads adds a KV group's query heads to it) and `mlp` [channels]."""
    attn, mlp = layer.self_attn, layer.mlp
    scores = {}
    if "attention" in targets and known.fused_qkv:  #: the q, k and v rows of one Linear
        rows = score(attn.qkv_proj, 0)
        q, k, v = fused_rows(attn)
        scores["query"] = (rows[q] + score(attn.o_proj, 1)).view(-1, attn.head_dim).sum(1).cpu()
        scores["kv"] = (rows[k] + rows[v]).view(-1, attn.head_dim).sum(1).cpu()
    elif "attention" in targets:
        scores["query"] = (score(attn.q_proj, 0) + score(attn.o_proj, 1)).view(-1, attn.head_dim).sum(1).cpu()
        scores["kv"] = (score(attn.k_proj, 0) + score(attn.v_proj, 0)).view(-1, attn.head_dim).sum(1).cpu()
    if "mlp" in targets and known.moe:  # [experts, channels]: each expert's gate and up rows, down columns
        width = mlp.experts.down_proj.shape[-1]
        gate_up = score(mlp.experts.gate_up_proj, (0, 1))
        scores["mlp"] = (gate_up[:, :width] + gate_up[:, width:] + score(mlp.experts.down_proj, (0, 2))).cpu()
        shared = shared_expert(mlp)
        if shared is not None:  # a dense MLP beside the experts (Qwen2-MoE)
            scores["shared"] = (score(shared.gate_proj, 0) + score(shared.up_proj, 0)
                                + score(shared.down_proj, 1)).cpu()
    elif "mlp" in targets and known.fused_gate_up:  # gate rows then up rows
        rows, width = score(mlp.gate_up_proj, 0), mlp.down_proj.in_features
        scores["mlp"] = (rows[:width] + rows[width:] + score(mlp.down_proj, 1)).cpu()
    elif "mlp" in targets:
        scores["mlp"] = (score(mlp.gate_proj, 0) + score(mlp.up_proj, 0) + score(mlp.down_proj, 1)).cpu()
    return scores


def scored_layers_weights(layers: list[torch.nn.Module], targets, known: Family) -> list[torch.nn.Parameter]:
    """The Linear weights whose gradients the scores need (only those of the layers and targets being pruned)."""
    weights = []
    for layer in layers:
        if "attention" in targets:
            weights += [m.weight for n, m in layer.self_attn.named_children() if isinstance(m, torch.nn.Linear)]
        if "mlp" in targets and known.moe:
            weights += [layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj]
            shared = shared_expert(layer.mlp)
            if shared is not None:
                weights += [m.weight for m in (shared.gate_proj, shared.up_proj, shared.down_proj)]
        elif "mlp" in targets:
            weights += [m.weight for n, m in layer.mlp.named_children() if isinstance(m, torch.nn.Linear)]
    return weights


"""Rotations of the residual stream fused into the weights (QuaRot: Ashkboos et al., "QuaRot: Outlier-Free 4-Bit
Inference in Rotated LLMs", NeurIPS 2024; SpinQuant: Liu et al., "SpinQuant: LLM Quantization with Learned
Rotations", ICLR 2025), as a step before low-bit quantization.

A few channels of an LLM's residual stream carry values far larger than the rest, so a 4-bit (or 3-bit) grid that
rounds each group of inputs with one scale loses the small channels around them. An orthogonal Q (QᵀQ = I) applied
to the stream spreads each outlier over many channels and the model can compute the same function:
  1. fold: each RMSNorm's weight g is folded into the Linears that read its output (W ← W·diag(g): q/k/v after
     input_layernorm, gate/up after post_attention_layernorm, the head after the final norm) and set to 1, so the
     norm computes x / rms(x), and rms(x·Q) = rms(x): RMSNorm(x·Q) = RMSNorm(x)·Q;
  2. rotate (R1): the embedding's rows E ← E·Q (the stream enters rotated), every Linear that reads the stream
     W ← W·Q (its input side: q/k/v, gate/up, the head), every Linear that writes into it W ← Qᵀ·W and b ← b·Q (its
     output side: o_proj, down_proj): the stream is x·Q everywhere and the logits are unchanged;
  3. heads (R2, optional): each head's values v ← v·H (v_proj's output side, per head: W ← Hᵀ·W, b ← b·H) and
     o_proj's input columns of each head W ← W·H: attention mixes values linearly, so each head's output is
     rotated by H and o_proj undoes it.
Q is a block-diagonal normalised Hadamard matrix (blocks of the largest power of two that divides the hidden size:
SmolLM2's 576 = 9 x 64, Qwen2.5-1.5B's 1536 = 3 x 512), or a seeded random orthogonal matrix. Every rotation is
fused: the result is a float model of the same family that stock transformers loads and runs. The online rotation
QuaRot puts before down_proj (R4: a Hadamard of the MLP's intermediate activations at run time) is not built.

A head tied to the embedding is untied (its own copy of the weight, config.tie_word_embeddings = False): the final
norm's weight folds into the head, not into the embedding, which the stream reads unnormalised.
"""

from __future__ import annotations

import math
import warnings

import torch

from compress import distributed
from compress.architectures import Family, family
from compress.config.rotate import Rotate
from compress.errors import CompressError, StepConfigError
from compress.modules import decoder_layers, require_float
from compress.quantize.head_embed import UNTIED_ATTR

NORMS = ("input_layernorm", "post_attention_layernorm")  # the two pre-norms of each decoder layer, as named in
# every family of compress.architectures whose norms fold (each family's modeling file names them so)


def _reads(known: Family) -> dict[str, tuple[str, ...]]:
    """Each pre-norm of a decoder layer -> the Linears that read its output, from the family's layout."""
    attention = ("self_attn.qkv_proj",) if known.fused_qkv else ("self_attn.q_proj", "self_attn.k_proj",
                                                                   "self_attn.v_proj")
    mlp = ("mlp.gate_up_proj",) if known.fused_gate_up else ("mlp.gate_proj", "mlp.up_proj")
    return {"input_layernorm": attention, "post_attention_layernorm": mlp}


WRITES = ("self_attn.o_proj", "mlp.down_proj")  # the Linears whose outputs are added to the stream


def _step(config: Rotate) -> str:
    return f"rotate ({config.kind})"


def _dimensions(model: torch.nn.Module) -> tuple[int, int, int, int]:
    """(hidden size, head_dim, query heads, KV heads) from the model's config."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.hidden_size, head_dim, heads, getattr(config, "num_key_value_heads", None) or heads


def block_size(model: torch.nn.Module, config: Rotate) -> int:
    """The channels of each diagonal block of Q: the config's, else hadamard's largest power of two dividing the hidden
    size, random's whole hidden size."""
    hidden = model.config.hidden_size
    if config.block:
        return config.block
    return hidden & -hidden if config.kind == "hadamard" else hidden


def check_rotatable(model: torch.nn.Module, config: Rotate) -> None:
    """What can be refused before any work: a family the rotation cannot keep exact (unknown, MoE, norms that are
    not a plain x̂·weight RMSNorm), a block that does not divide the hidden size, and (with heads) a head_dim that
    the kind cannot rotate."""
    try:
        known = family(model)
    except CompressError as error:
        raise StepConfigError(f"{_step(config)}: {error}") from None
    if known.moe:
        raise StepConfigError(f"{_step(config)}: {known.name} is a Mixture-of-Experts family: rotating its router and "
                              f"fused experts is not built; remove the rotate step for this model")
    if not known.norms_fold:
        raise StepConfigError(f"{_step(config)}: {known.name}'s norms compute x̂·(1 + weight) (and scale the "
                              f"embedding), which the rotation does not fold; remove the rotate step for this model")
    hidden, head_dim, _, _ = _dimensions(model)
    layers = decoder_layers(model)
    norms = [(f"layers.{i}.{name}", layer.get_submodule(name)) for i, layer in enumerate(layers) for name in NORMS]
    norms.append(("norm", getattr(model.get_decoder(), "norm", None)))
    for name, norm in norms:
        weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
        if isinstance(norm, torch.nn.LayerNorm) or bias is not None or weight is None or weight.shape != (hidden,):
            raise StepConfigError(f"{_step(config)}: {name} ({type(norm).__name__}) is not an RMSNorm with a weight "
                                  f"of {hidden} and no bias: a LayerNorm subtracts the mean, which a rotation does "
                                  f"not keep; remove the rotate step for this model")
    block = block_size(model, config)
    if hidden % block:
        raise StepConfigError(f"{_step(config)} block: {block} does not divide the hidden size {hidden}; use a "
                              f"divisor of it (hadamard: the power of two {hidden & -hidden} or one below it), or "
                              f"leave block out", ("block",))
    if config.heads and config.kind == "hadamard" and head_dim & (head_dim - 1):
        raise StepConfigError(f"{_step(config)} heads: head_dim {head_dim} is not a power of two, which a Sylvester "
                              f"Hadamard needs; set heads: false (or kind: random)", ("heads",))


# ---------------------------------------------------------------- the matrices


def hadamard(size: int) -> torch.Tensor:
    """The normalised Sylvester Hadamard matrix of a power-of-two `size` (float64, orthogonal and symmetric)."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two size, got {size}")
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)])
    return matrix / math.sqrt(size)


def random_orthogonal(size: int, generator: torch.Generator) -> torch.Tensor:
    """A random orthogonal matrix (float64), Haar-distributed: Q of the QR of a Gaussian, its columns' signs fixed
    by R's diagonal."""
    q, r = torch.linalg.qr(torch.randn(size, size, dtype=torch.float64, generator=generator))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def rotation_block(kind: str, size: int, generator: torch.Generator) -> torch.Tensor:
    return hadamard(size) if kind == "hadamard" else random_orthogonal(size, generator)


def rotate_columns(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """weight · Q over its last dimension, with Q = diag(block, block, ...): each run of block.shape[0] columns is
    multiplied by `block` (in float64, returned in weight's dtype)."""
    size = block.shape[0]
    shape = weight.shape
    rotated = weight.to(torch.float64).reshape(*shape[:-1], shape[-1] // size, size) @ block.to(weight.device)
    return rotated.reshape(shape).to(weight.dtype)


def rotate_rows(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Qᵀ · weight over its first dimension (a Linear's outputs), with Q = diag(block, ...)."""
    return rotate_columns(weight.T, block).T


# ---------------------------------------------------------------- the verb


def _untie(model: torch.nn.Module) -> int:
    """Give a head tied to the embedding its own copy of the weight; the bytes that adds to the checkpoint (0 when
    it was not tied), recorded for step.json as a quantize step's untying is (compress.quantize.head_embed)."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    cost = 0
    if head.weight is embedding.weight or head.weight.data_ptr() == embedding.weight.data_ptr():
        head.weight = torch.nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)
        cost = head.weight.numel() * head.weight.element_size()
        setattr(model, UNTIED_ATTR, cost)
    for config in {id(c): c for c in (model.config, getattr(model.config, "get_text_config", lambda: None)())
                   if c is not None}.values():
        config.tie_word_embeddings = False
    return cost


def _fold_norm(norm: torch.nn.Module, linears: list[torch.nn.Linear]) -> None:
    """W ← W·diag(g) for each Linear reading the norm, and g ← 1."""
    scale = norm.weight.to(torch.float64)
    for linear in linears:
        linear.weight.copy_((linear.weight.to(torch.float64) * scale).to(linear.weight.dtype))
    norm.weight.fill_(1.0)


def _value_rows(attention: torch.nn.Module, known: Family, head_dim: int, heads: int, kv_heads: int):
    """The Linear holding the values, and the slice of its output rows that are the values."""
    if known.fused_qkv:
        start = (heads + kv_heads) * head_dim
        return attention.qkv_proj, slice(start, start + kv_heads * head_dim)
    return attention.v_proj, slice(0, kv_heads * head_dim)


@torch.no_grad()
def fold_norms(model: torch.nn.Module, known: Family) -> int:
    """Step 1 alone: every RMSNorm's weight folded into the Linears that read it (the final norm's into the head,
    untied first if tied) and set to 1; the float model computes the same logits. Returns the bytes untying the head
    added (0: it was not tied)."""
    untied = _untie(model)
    _fold_norm(model.get_decoder().norm, [model.get_output_embeddings()])
    for layer in decoder_layers(model):
        for norm, names in _reads(known).items():
            _fold_norm(layer.get_submodule(norm), [layer.get_submodule(name) for name in names])
    return untied


@torch.no_grad()
def rotate(model: torch.nn.Module, config: Rotate, *, show_progress: bool = True) -> torch.nn.Module:
    """Rotate `model`'s residual stream (and, with `config.heads`, each head's values) by an orthogonal Q fused into
    its weights, in place; the float model computes the same logits (up to rounding). Returns the model."""
    require_float(model, "rotate", "its weights lie on a quantization grid that a rotation would leave")
    check_rotatable(model, config)
    known = family(model)
    hidden, head_dim, heads, kv_heads = _dimensions(model)
    generator = torch.Generator().manual_seed(config.seed)
    block = rotation_block(config.kind, block_size(model, config), generator)
    layers = decoder_layers(model)
    reads = _reads(known)
    # 1. fold every norm into its readers
    untied = fold_norms(model, known)
    if untied and distributed.is_main():
        warnings.warn(f"rotate: the head was tied to the embedding and is now untied (config.tie_word_embeddings "
                      f"false, the head its own weight): the final norm folds into the head only; the checkpoint "
                      f"holds the head apart, {untied / 2**20:,.1f} MiB more than the tied model's one tensor",
                      stacklevel=3)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    # 2. rotate the stream: in through the embedding, read by W·Q, written by Qᵀ·W
    embedding.weight.copy_(rotate_columns(embedding.weight, block))
    head.weight.copy_(rotate_columns(head.weight, block))
    for layer in layers:
        for name in (name for names in reads.values() for name in names):
            linear = layer.get_submodule(name)
            linear.weight.copy_(rotate_columns(linear.weight, block))
        for name in WRITES:
            linear = layer.get_submodule(name)
            linear.weight.copy_(rotate_rows(linear.weight, block))
            if linear.bias is not None:
                linear.bias.copy_(rotate_columns(linear.bias, block))
    # 3. heads: each head's values by H, o_proj's columns of each head by H
    if config.heads:
        per_head = rotation_block(config.kind, head_dim, generator)
        for layer in layers:
            values, rows = _value_rows(layer.self_attn, known, head_dim, heads, kv_heads)
            values.weight[rows] = rotate_rows(values.weight[rows], per_head)
            if values.bias is not None:
                values.bias[rows] = rotate_columns(values.bias[rows], per_head)
            output = layer.self_attn.o_proj
            output.weight.copy_(rotate_columns(output.weight, per_head))
    return model

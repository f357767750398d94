"""Recipe: `- rotate: {kind: hadamard | random, block: N, heads: true, seed: S}`: an orthogonal rotation of the residual
stream fused into the weights, as its own step before low-bit quantization."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from compress.config.base import MAX_SEED, MAX_WIDTH, Strict

ROTATION_KINDS = {
    "hadamard": "block-diagonal normalised Hadamard (Sylvester), blocks of `block` channels",
    "random": "a random orthogonal matrix drawn from `seed` (QR of a Gaussian), block-diagonal when `block` is set",
}


class Rotate(Strict):
    """A rotation of the residual stream (QuaRot / SpinQuant's R1), fused into the weights: `- rotate: {}`.

    Each RMSNorm's weight is folded into the Linears that read it (and set to 1), the embedding rows become E·Q, every
    Linear that reads the stream W·Q, every Linear that writes into it (o_proj, down_proj: weights and biases) Qᵀ·W,
    and the head W·Q. RMSNorm(x·Q) = RMSNorm(x)·Q once its weight is 1, so the float model computes the same logits;
    the stream's outlier channels are spread over `block` channels, which a low-bit grid (W4A4, W3) rounds with less
    loss. With `heads`, the values and o_proj's inputs are also rotated head by head (R2), which fuses the same way.

    Its own step, before the quantize step: the checkpoint it writes is a plain float model that stock transformers
    loads (no runtime support: every rotation is fused). A model whose head is tied to its embedding is untied (the
    final norm folds into the head only), which adds the head's bytes to the checkpoint."""

    kind: Literal["hadamard", "random"] = Field(
        "hadamard", description="; ".join(f"{k}: {v}" for k, v in ROTATION_KINDS.items()))
    block: int | None = Field(None, ge=2, le=MAX_WIDTH, description=(
        "channels per diagonal block of Q; must divide the hidden size (hadamard: a power of two). Default: hadamard, "
        "the largest power of two that divides the hidden size; random, the whole hidden size"))
    heads: bool = Field(True, description="also rotate each head's values and o_proj's inputs (head_dim blocks)")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="random: the draw of Q")

    @model_validator(mode="after")
    def _hadamard_block(self):
        if self.kind == "hadamard" and self.block and self.block & (self.block - 1):
            raise ValueError(f"block {self.block}: a Hadamard block here is a power of two (Sylvester's "
                             f"construction), e.g. {1 << (self.block.bit_length() - 1)}; or use kind: random")
        return self

    def describe(self) -> str:
        block = f"blocks of {self.block}" if self.block else (
            "largest power-of-two blocks" if self.kind == "hadamard" else "full width")
        seed = f", seed {self.seed}" if self.kind == "random" else ""
        heads = " and per head (values → o_proj)" if self.heads else ""
        return (f"rotate: {self.kind} ({block}{seed}) of the residual stream{heads}, fused into the weights; "
                f"norms folded, a tied head untied")

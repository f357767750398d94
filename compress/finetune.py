"""`finetune(model, LoRARecovery(...), train_data)`: recover what a compression step cost by training low-rank
adapters (peft LoRA, Hu et al. 2021) through transformers' Trainer, then merge them into the weights so the result
is an ordinary model that later steps (quantization) and stock loaders take as is."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from compress.errors import CompressError
from compress.quantize.formats import is_quantized
from compress.training import LoRAAdapter, TrainingBudget, merged, train, with_lora


class LoRARecovery(TrainingBudget, LoRAAdapter):  # fields: method, r, alpha, ..., steps, lr, ...
    """Recipe: `finetune: {method: lora, r: 8, alpha: 16, steps: 300, lr: 3.0e-4, data: wikitext2-valid}`."""

    method: Literal["lora"] = "lora"
    merge: bool = Field(True, description="merge the adapters into the weights (required: each step is a full model)")

    @field_validator("merge")
    @classmethod
    def _merged(cls, value: bool) -> bool:
        if not value:
            raise ValueError("merge: false is not supported: every step folder is a complete, ordinary model and a "
                             "later quantize step needs plain weights; keep merge: true")
        return value

    def describe(self) -> str:
        return f"LoRA recovery r={self.r} alpha={self.alpha:g}, {self.budget()}"


def finetune(model: torch.nn.Module, config: LoRARecovery, train_data: torch.Tensor | list[dict], seed: int = 0,
             show_progress: bool = True) -> torch.nn.Module:
    """Train LoRA adapters on `train_data` (token windows [windows, seq_len] from `compress.data.training_windows`,
    or prompted task examples from `compress.training.training_examples`) for
    `config.steps` steps, merge them, and return the plain model."""
    if is_quantized(model):
        raise CompressError("finetune after quantize: merged adapters would move the weights off the quantization "
                            "grid; put the finetune step before quantize")
    adapted = with_lora(model, config)
    train(adapted, config, train_data, seed=seed, show_progress=show_progress)
    return merged(adapted)


__all__ = ["LoRARecovery", "finetune"]

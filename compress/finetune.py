"""`finetune(model, LoRARecovery(...), train_data)`: recover what a compression step cost by training low-rank
adapters (peft LoRA, Hu et al. 2021) through transformers' Trainer, then merge them into the weights so the result
is an ordinary model that later steps (quantization) and stock loaders take as is."""

from __future__ import annotations

import torch

from compress.config.finetune import LoRARecovery
from compress.modules import require_float
from compress.training import merged, train, with_lora


def finetune(model: torch.nn.Module, config: LoRARecovery, train_data: torch.Tensor | list[dict], seed: int = 0, *,
             show_progress: bool = True) -> torch.nn.Module:
    """Train LoRA adapters on `train_data` (token windows [windows, seq_len] from `compress.data.training_windows`,
    or prompted task examples from `compress.training.training_examples`) for
    `config.steps` steps, merge them, and return the plain model."""
    require_float(model, "finetune", "merged adapters would move the weights off the quantization grid")
    adapted = with_lora(model, config.lora)
    adapted = train(adapted, config, train_data, seed=seed, show_progress=show_progress, step="finetune (LoRA)")
    return merged(adapted)


__all__ = ["LoRARecovery", "finetune"]

"""Recipe: `finetune: {method: lora, lora: {r: 8, alpha: 16}, steps: 300, lr: 3.0e-4, data: wikitext2-valid}`."""

from __future__ import annotations

from typing import Literal

from compress.config.training import LoRA, TrainingBudget


class LoRARecovery(TrainingBudget):
    """LoRA adapters trained on the step's data, then merged into the weights (every step folder is a complete,
    ordinary model)."""

    method: Literal["lora"] = "lora"
    lora: LoRA = LoRA()

    def describe(self) -> str:
        return f"{self.lora.describe()} recovery, {self.budget()}"

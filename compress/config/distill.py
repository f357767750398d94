"""Recipe: `distill: {kd: {teacher: base, temperature: 2.0, alpha: 0.7}, lora: {r: 16}, steps: 300}`."""

from __future__ import annotations

from pydantic import Field

from compress.config.training import KD, LoRA, TrainingBudget


class Distill(TrainingBudget):
    """Distill a teacher into the model: every weight trained, or (with `lora`) adapters merged back."""

    kd: KD = KD()
    lora: LoRA | None = Field(None, description="train LoRA adapters (merged back) instead of every weight")
    lr: float = Field(2e-4, gt=0, le=1)

    def describe(self) -> str:
        student = f"{self.lora.describe()} student" if self.lora else "full student"
        return f"distill {self.kd.describe()}, {student}, {self.budget()}"

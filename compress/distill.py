"""`distill(student, Distill(...), train_data, teacher)`: knowledge distillation (Hinton et al. 2015) from a teacher
— typically the model before compression — into the compressed student, through a transformers Trainer subclass
that users can also run in their own pipelines (`DistillationTrainer`).

Loss per labelled position, at temperature T:
    α · T² · KL(softmax(teacher / T) ‖ softmax(student / T))  +  (1 − α) · CE(student, next token)
    + β · Σ_layers ‖h_student − h_teacher‖² / ‖h_teacher‖²        (β = hidden_mse; layers of equal width only)
The T² keeps the distillation gradients on the scale of the CE term's as T changes. The teacher runs without
gradients (no activations kept for backward), optionally in a lower precision."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from compress.errors import CompressError
from compress.models import DTYPES, check_teacher_name
from compress.quantize.formats import is_quantized
from compress.training import LabelledPositionsTrainer, LoRAAdapter, TrainingBudget, labelled_logits, merged, train, with_lora


class Distill(TrainingBudget):
    """Recipe: `distill: {teacher: base, temperature: 2.0, alpha: 0.7, steps: 300, lora: {r: 16}}`."""

    teacher: str = Field("base", description="base (the recipe's model), an earlier step's folder (e.g. 01-prune), "
                                             "or any model source")
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.7, ge=0, le=1, description="weight of the distillation term; 1 - alpha weights the CE")
    hidden_mse: float = Field(0.0, ge=0, description="weight of the relative hidden-state MSE (equal-width layers)")
    teacher_dtype: Literal["same", "float32", "bfloat16", "float16"] = "same"
    lora: LoRAAdapter | None = Field(None, description="train LoRA adapters (merged back) instead of every weight")
    lr: float = Field(2e-4, gt=0)

    @field_validator("teacher")
    @classmethod
    def _teacher(cls, value: str) -> str:
        return check_teacher_name(value)

    def describe(self) -> str:
        student = f"LoRA r={self.lora.r} student" if self.lora else "full student"
        return (f"distill from {self.teacher} (T={self.temperature:g}, alpha={self.alpha:g}"
                f"{f', hidden MSE {self.hidden_mse:g}' if self.hidden_mse else ''}), {student}, {self.budget()}")


def check_same_vocabulary(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    """Distillation compares next-token distributions entry by entry: both models must score the same tokens."""
    sizes = (student.get_output_embeddings().out_features, teacher.get_output_embeddings().out_features)
    if sizes[0] != sizes[1]:
        raise CompressError(f"teacher and student have different vocabularies ({sizes[1]:,} vs {sizes[0]:,} output "
                            f"tokens); distillation needs a teacher with the student's tokenizer")


def check_same_tokenizer(student_tokenizer, teacher_tokenizer) -> None:
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise CompressError("teacher and student tokenizers differ (different tokens or token ids); distillation "
                            "needs a teacher with the student's tokenizer")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      config: Distill) -> torch.Tensor:
    t = config.temperature
    kd = F.kl_div(F.log_softmax(student_logits.float() / t, -1), F.log_softmax(teacher_logits.float() / t, -1),
                  log_target=True, reduction="batchmean") * t * t
    if config.alpha == 1:
        return kd
    return config.alpha * kd + (1 - config.alpha) * F.cross_entropy(student_logits.float(), targets)


def hidden_state_loss(student_states: tuple, teacher_states: tuple, positions: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Mean relative MSE over the decoder layers whose outputs have the same shape in both models (pruning keeps
    the hidden size, so all of them; a narrower student's are skipped). Layers pair by depth when the counts match,
    else only the final states pair. `positions` ([batch, seq] bool) limits it to the trained positions (the
    answers of prompted examples; not the padding)."""
    pairs = list(zip(student_states, teacher_states)) if len(student_states) == len(teacher_states) \
        else [(student_states[-1], teacher_states[-1])]
    if positions is not None:
        pairs = [(s[positions], t[positions]) for s, t in pairs]
    losses = [F.mse_loss(s.float(), t.float()) / t.float().square().mean().clamp_min(1e-6)
              for s, t in pairs[1:] if s.shape == t.shape]  # [0] is the embedding output: identical inputs
    if not losses:
        raise CompressError("hidden_mse: no teacher layer has the student's hidden width; set hidden_mse: 0")
    return torch.stack(losses).mean()


class DistillationTrainer(LabelledPositionsTrainer):
    """A transformers Trainer whose loss distills `teacher` into the model being trained:
    `DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=ds, distill=Distill(...))`.
    Only `distill`'s loss settings (temperature, alpha, hidden_mse, teacher_dtype) apply here; `args` rules the
    training itself."""

    def __init__(self, *args, teacher: torch.nn.Module, distill: Distill | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.distill = distill or Distill()
        student = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        check_same_vocabulary(student, teacher)
        dtype = None if self.distill.teacher_dtype == "same" else DTYPES[self.distill.teacher_dtype]
        self.teacher = teacher.to(device=self.args.device, dtype=dtype).eval().requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        hidden = self.distill.hidden_mse > 0
        ids, labels = inputs["input_ids"], inputs["labels"]
        logits, targets, outputs = labelled_logits(model, ids, labels, output_hidden_states=hidden)
        with torch.no_grad():  # nothing of the teacher's forward is kept for backward
            teacher_logits, _, teacher_outputs = labelled_logits(self.teacher, ids, labels, output_hidden_states=hidden)
        loss = distillation_loss(logits, teacher_logits, targets, self.distill)
        if hidden:
            trained = torch.zeros_like(labels, dtype=torch.bool)
            trained[:, :-1] = labels[:, 1:] != -100  # the positions whose next token is trained on
            loss = loss + self.distill.hidden_mse * hidden_state_loss(outputs.hidden_states,
                                                                      teacher_outputs.hidden_states, trained)
        return (loss, {"logits": logits}) if return_outputs else loss


def distill(model: torch.nn.Module, config: Distill, train_data: torch.Tensor | list[dict], teacher: torch.nn.Module,
            seed: int = 0, show_progress: bool = True) -> torch.nn.Module:
    """Distill `teacher` into `model` on `train_data` (token windows [windows, seq_len] or
    `compress.training.training_examples`) for `config.steps` steps, every
    weight trained or (with `config.lora`) LoRA adapters merged back; returns the plain model."""
    if is_quantized(model):
        raise CompressError("distill after quantize: training would move the weights off the quantization grid; "
                            "put distill before quantize, or use quantize: {method: qat, distill_from: base}")
    check_same_vocabulary(model, teacher)
    student = with_lora(model, config.lora) if config.lora else model.train().requires_grad_(True)
    train(student, config, train_data, seed=seed, show_progress=show_progress, trainer_class=DistillationTrainer,
          teacher=teacher, distill=config)
    return merged(student)


__all__ = ["Distill", "DistillationTrainer", "check_same_tokenizer", "check_same_vocabulary", "distill"]

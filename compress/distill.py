"""`distill(student, Distill(...), train_data, teacher)`: knowledge distillation (Hinton et al. 2015) from a teacher
— typically the model before compression — into the compressed student, through a transformers Trainer subclass
that users can also run in their own pipelines (`DistillationTrainer`).

Loss per labelled position, at temperature T (the KD block: `kd: {teacher, temperature, alpha, hidden_mse}`):
    α · T² · KL(softmax(teacher / T) ‖ softmax(student / T))  +  (1 − α) · CE(student, next token)
    + β · mean over paired layers of ‖h_student − h_teacher‖² / ‖h_teacher‖²        (β = hidden_mse)
The T² keeps the distillation gradients on the scale of the CE term's as T changes. Student layer i of L_s pairs
with teacher layer round(i · L_t / L_s) of L_t (by depth; the same layer when the counts match), and only pairs of
equal width count. The teacher runs without gradients (no activations kept for backward), optionally in a lower
precision."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compress.config.distill import Distill
from compress.config.training import KD
from compress.errors import CompressError
from compress.modules import require_float
from compress.training import LabelledPositionsTrainer, labelled_logits, merged, token_count, train, with_lora


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
                      kd: KD, tokens=None) -> torch.Tensor:
    """The KD loss of the labelled positions given, summed and divided by `tokens` (default: their count; the
    Trainer passes the whole batch's count over every process)."""
    t = kd.temperature
    tokens = targets.numel() if tokens is None else tokens
    loss = F.kl_div(F.log_softmax(student_logits.float() / t, -1), F.log_softmax(teacher_logits.float() / t, -1),
                    log_target=True, reduction="sum") * t * t / tokens
    if kd.alpha == 1:
        return loss
    return kd.alpha * loss + (1 - kd.alpha) * F.cross_entropy(student_logits.float(), targets, reduction="sum") / tokens


def paired_layers(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """(student, teacher) hidden-state indices paired by depth: student layer i (1-based; 0 is the embedding output,
    identical inputs, never paired) with teacher layer round(i · L_t / L_s), at least 1."""
    return [(i, max(1, round(i * teacher_layers / student_layers))) for i in range(1, student_layers + 1)]


def hidden_state_loss(student_states: tuple, teacher_states: tuple, positions: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Mean relative MSE over the paired decoder layers (`paired_layers`) whose outputs have the same width in both
    models (pruning keeps the hidden size, so all of them). `positions` ([batch, seq] bool) limits it to the trained
    positions (the answers of prompted examples; not the padding)."""
    losses = []
    for i, j in paired_layers(len(student_states) - 1, len(teacher_states) - 1):
        s, t = student_states[i], teacher_states[j]
        if s.shape != t.shape:
            continue
        if positions is not None:
            s, t = s[positions], t[positions]
        losses.append(F.mse_loss(s.float(), t.float()) / t.float().square().mean().clamp_min(1e-6))
    if not losses:
        raise CompressError("hidden_mse: no teacher layer has the student's hidden width; set hidden_mse: 0")
    return torch.stack(losses).mean()


class DistillationTrainer(LabelledPositionsTrainer):
    """A transformers Trainer whose loss distills `teacher` into the model being trained:
    `DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=ds, kd=compress.KD(alpha=0.5))`.
    The KD block's loss settings (temperature, alpha, hidden_mse, teacher_dtype) apply here; its `teacher` names
    what a recipe loads and is not read; `args` rules the training itself."""

    def __init__(self, *args, teacher: torch.nn.Module, kd: KD | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.kd = kd or KD()
        student = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        check_same_vocabulary(student, teacher)
        dtype = None if self.kd.teacher_dtype == "same" else getattr(torch, self.kd.teacher_dtype)
        self.teacher = teacher.to(device=self.args.device, dtype=dtype).eval().requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        hidden = self.kd.hidden_mse > 0
        ids, labels = inputs["input_ids"], inputs["labels"]
        with self.autocast():
            logits, targets, outputs = labelled_logits(model, ids, labels, output_hidden_states=hidden)
            with torch.no_grad():  # nothing of the teacher's forward is kept for backward
                teacher_logits, _, teacher_outputs = labelled_logits(self.teacher, ids, labels,
                                                                     output_hidden_states=hidden)
        tokens = token_count(num_items_in_batch, targets)
        loss = distillation_loss(logits, teacher_logits, targets, self.kd, tokens)
        if hidden:
            trained = torch.zeros_like(labels, dtype=torch.bool)
            trained[:, :-1] = labels[:, 1:] != -100  # the positions whose next token is trained on
            # a mean over this batch's positions, weighted by its share of the tokens (exact in one process)
            share = targets.numel() / tokens
            loss = loss + self.kd.hidden_mse * share * hidden_state_loss(outputs.hidden_states,
                                                                          teacher_outputs.hidden_states, trained)
        self.check_finite_loss(loss, model)
        return (loss, {"logits": logits}) if return_outputs else loss


def distill(model: torch.nn.Module, config: Distill, train_data: torch.Tensor | list[dict], teacher: torch.nn.Module,
            seed: int = 0, *, show_progress: bool = True) -> torch.nn.Module:
    """Distill `teacher` into `model` on `train_data` (token windows [windows, seq_len] or
    `compress.training.training_examples`) for `config.steps` steps, every
    weight trained or (with `config.lora`) LoRA adapters merged back; returns the plain model."""
    require_float(model, "distill", "training would move the weights off the quantization grid (for a quantized "
                                    "student, use quantize: {method: qat, kd: {teacher: base}})")
    check_same_vocabulary(model, teacher)
    student = with_lora(model, config.lora) if config.lora else model.train().requires_grad_(True)
    student = train(student, config, train_data, seed=seed, show_progress=show_progress,
                    trainer_class=DistillationTrainer, step="distill", teacher=teacher, kd=config.kd)
    return merged(student)


__all__ = ["Distill", "DistillationTrainer", "check_same_tokenizer", "check_same_vocabulary", "distill"]

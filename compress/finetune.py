"""`finetune(model, tokenizer, LoRARecovery(...), train_ids)`: recover what a compression step cost by training
low-rank adapters (peft LoRA, Hu et al. 2021) through transformers' Trainer, then merge them into the weights so
the result is an ordinary model that later steps (quantization) and stock loaders take as is."""

from __future__ import annotations

import tempfile
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from transformers import Trainer, TrainingArguments

from compress.data import DatasetName
from compress.errors import CompressError
from compress.quantize.formats import is_quantized


class LoRARecovery(BaseModel):
    """Recipe: `finetune: {method: lora, r: 8, alpha: 16, steps: 300, lr: 3.0e-4, data: wikitext2-valid}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["lora"] = "lora"
    r: int = Field(8, ge=1, description="adapter rank")
    alpha: float = Field(16, gt=0, description="adapter scale numerator (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | tuple[str, ...] = Field(
        "all-linear", description="peft target_modules: all-linear (every Linear but the output head) or names")
    steps: int = Field(300, ge=1, description="optimizer steps")
    lr: float = Field(3e-4, gt=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    batch_size: int = Field(8, ge=1)
    seq_len: int = Field(256, ge=8)
    data: DatasetName = Field("wikitext2-valid", description="a named text dataset or a .txt path; cut into seq_len "
                                                              "windows")
    merge: bool = Field(True, description="merge the adapters into the weights (required: each step is a full model)")

    @field_validator("merge")
    @classmethod
    def _merged(cls, value: bool) -> bool:
        if not value:
            raise ValueError("merge: false is not supported: every step folder is a complete, ordinary model and a "
                             "later quantize step needs plain weights; keep merge: true")
        return value

    def describe(self) -> str:
        return (f"LoRA recovery r={self.r} alpha={self.alpha:g}, {self.steps} steps of {self.batch_size} x "
                f"{self.seq_len} tokens from {self.data}, lr {self.lr:g}")


class _LabelledPositionsTrainer(Trainer):
    """Next-token loss with the output head applied only where a label exists: over a 49k vocabulary the head is
    most of a small model's step time, and with prompt-masked data (-100 labels) most positions need no logits."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        labels = inputs["labels"][:, 1:]
        hidden = base.get_decoder()(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                                    use_cache=False).last_hidden_state[:, :-1]
        scored = labels != -100
        logits = base.get_output_embeddings()(hidden[scored])
        loss = torch.nn.functional.cross_entropy(logits.float(), labels[scored])
        return (loss, {"logits": logits}) if return_outputs else loss


def finetune(model: torch.nn.Module, config: LoRARecovery, train_ids: torch.Tensor, seed: int = 0,
             show_progress: bool = True) -> torch.nn.Module:
    """Train LoRA adapters on `train_ids` ([windows, seq_len] token ids, `compress.data.training_windows`) for
    `config.steps` steps, merge them, and return the plain model."""
    from peft import LoraConfig, get_peft_model

    if is_quantized(model):
        raise CompressError("finetune after quantize: merged adapters would move the weights off the quantization "
                            "grid; put the finetune step before quantize")
    if train_ids.shape[0] < config.batch_size:
        raise CompressError(f"training data has {train_ids.shape[0]} windows of {train_ids.shape[1]} tokens, fewer "
                            f"than one batch of {config.batch_size}; lower batch_size or seq_len")
    lora = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, bias="none",
                      target_modules=config.target_modules if isinstance(config.target_modules, str)
                      else list(config.target_modules), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    examples = [{"input_ids": row, "labels": row} for row in train_ids]
    on_cpu = next(model.parameters()).device.type == "cpu"
    with tempfile.TemporaryDirectory(prefix="compress-finetune-") as scratch:
        args = TrainingArguments(
            output_dir=scratch, max_steps=config.steps, per_device_train_batch_size=config.batch_size,
            learning_rate=config.lr, warmup_steps=config.warmup_ratio,  # a float < 1 is a ratio lr_scheduler_type="cosine",
            logging_steps=max(1, config.steps // 10), save_strategy="no", report_to="none", seed=seed,
            use_cpu=on_cpu, disable_tqdm=not show_progress, dataloader_num_workers=0, remove_unused_columns=False)
        _LabelledPositionsTrainer(model=peft_model, args=args, train_dataset=examples).train()
    merged = peft_model.merge_and_unload()
    for param in merged.parameters():
        param.requires_grad_(True)  # peft froze the base weights; an ordinary model has them trainable
    return merged.eval()


__all__ = ["LoRARecovery", "finetune"]

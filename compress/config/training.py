"""What the training steps share (LoRA recovery, distillation, QAT): the budget and data of a run, one LoRA block
(passed through to peft's LoraConfig) and one knowledge-distillation block, nested the same way in every step that
takes them: `lora: {...}`, `kd: {...}`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from compress.config.base import MAX_BATCH, MAX_LAYER, MAX_SEQ_LEN, MAX_STEPS, MAX_WIDTH, Strict
from compress.config.data import DatasetName
from compress.config.sources import check_teacher_name


class TrainingBudget(Strict):
    """How long and on what a training step runs."""

    steps: int = Field(300, ge=1, le=MAX_STEPS, description="optimizer steps")
    lr: float = Field(3e-4, gt=0, le=1)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    batch_size: int = Field(8, ge=1, le=MAX_BATCH)
    seq_len: int = Field(256, ge=8, le=MAX_SEQ_LEN)
    data: tuple[DatasetName, ...] = Field(
        ("wikitext2-valid",), min_length=1,
        description="a dataset or a list of them: a text dataset or .txt path is cut into seq_len windows; a choice "
                    "task's train split (rte-train, politeness-train) becomes prompted examples, trained on the "
                    "answer tokens only")

    autocast: Literal["off", "bfloat16"] = Field(
        "off", description="bfloat16: the forward and backward passes compute under torch.autocast in bfloat16 (the "
                           "weights, their gradients and the optimizer stay in the model's dtype); on a CPU with "
                           "AVX512-BF16 or AMX a float32 model's training steps run faster, at bfloat16's rounding")
    sharding: Literal["replicate", "fsdp", "fsdp_offload"] = Field(
        "replicate", description="under several processes: every process holds the whole model (DDP), or FSDP2 shards "
                                 "weights, gradients and optimizer states over them (fsdp_offload: the shards wait on "
                                 "the CPU) for a model that does not fit one GPU; one process: no effect")

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_more(cls, value):
        return (value,) if isinstance(value, str) else value

    def budget(self) -> str:
        return (f"{self.steps} steps of {self.batch_size} x {self.seq_len} tokens from {' + '.join(self.data)}, "
                f"lr {self.lr:g}" + (f", autocast {self.autocast}" if self.autocast != "off" else ""))


# peft's init_lora_weights: True (Kaiming-uniform A, zero B), False (random B: not an identity start), or a named
# initialisation; pissa_niter_N is written as pissa_niter_16 etc.
# eva, corda and loftq need a data- or config-dependent setup step that peft does not run by itself: not offered
LORA_INITS = ("gaussian", "olora", "pissa", "orthogonal")


class LoRA(Strict):
    """Low-rank adapters (peft LoRA, Hu et al. 2021) trained in place of the full weights and merged back into them.
    Every field is a peft `LoraConfig` field of the same meaning (`alpha` is `lora_alpha`, `dropout` is
    `lora_dropout`), so DoRA, rsLoRA and the initialisations are one key away."""

    r: int = Field(8, ge=1, le=MAX_WIDTH, description="adapter rank")
    alpha: float = Field(16, gt=0, le=1e6, description="adapter scale numerator (scale = alpha / r; rsLoRA: / √r)")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | tuple[str, ...] = Field(
        "all-linear", description="peft target_modules: all-linear (every Linear but the output head) or names")
    exclude_modules: tuple[str, ...] | None = Field(None, description="module names kept out of target_modules")
    use_dora: bool = Field(False, description="weight-decomposed LoRA (Liu et al. 2024)")
    use_rslora: bool = Field(False, description="rank-stabilised scale alpha / sqrt(r) (Kalajdzievski 2023)")
    init_lora_weights: bool | str = Field(True, description=f"true, false, or one of {', '.join(LORA_INITS)}")
    layers_to_transform: tuple[int, ...] | None = Field(None, description="decoder layer indices; default: all")
    rank_pattern: dict[str, int] = Field({}, description="per-module rank overrides (peft rank_pattern)")
    alpha_pattern: dict[str, float] = Field({}, description="per-module alpha overrides (peft alpha_pattern)")

    @field_validator("init_lora_weights")
    @classmethod
    def _init(cls, value: bool | str) -> bool | str:
        if isinstance(value, str) and value not in LORA_INITS and not value.startswith("pissa_niter_"):
            raise ValueError(f"got {value!r}; allowed: true, false, {', '.join(LORA_INITS)}, pissa_niter_N")
        return value

    @field_validator("layers_to_transform")
    @classmethod
    def _layers(cls, value):
        if value is not None and any(not 0 <= i <= MAX_LAYER for i in value):
            raise ValueError(f"layer indices must lie in 0..{MAX_LAYER}")
        return value

    @model_validator(mode="after")
    def _layers_need_names(self):
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            raise ValueError("layers_to_transform needs target_modules as a list of names (peft refuses it with "
                             f"'{self.target_modules}'), e.g. target_modules: [q_proj, v_proj]")
        return self

    def peft_kwargs(self) -> dict:
        """The keyword arguments of peft's LoraConfig."""
        target = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return dict(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=target,
                    exclude_modules=list(self.exclude_modules) if self.exclude_modules else None,
                    use_dora=self.use_dora, use_rslora=self.use_rslora, init_lora_weights=self.init_lora_weights,
                    layers_to_transform=list(self.layers_to_transform) if self.layers_to_transform else None,
                    rank_pattern=dict(self.rank_pattern), alpha_pattern=dict(self.alpha_pattern), bias="none",
                    task_type="CAUSAL_LM")

    def describe(self) -> str:
        extras = [name for name, on in (("DoRA", self.use_dora), ("rsLoRA", self.use_rslora)) if on]
        return f"LoRA r={self.r} alpha={self.alpha:g}{''.join(f' {e}' for e in extras)}"


class KD(Strict):
    """Knowledge distillation (Hinton et al. 2015) from a teacher:
        alpha · T² · KL(teacher_T ‖ student_T) + (1 − alpha) · CE + hidden_mse · relative hidden-state MSE."""

    teacher: str | None = Field(None, description=(
        "base (the recipe's model), an earlier step's folder (e.g. 01-prune), or any model source; default: base for "
        "distill, and for QAT the model before it was quantized (the last step folder before the first quantize "
        "step, or the step's own input)"))
    temperature: float = Field(2.0, gt=0, le=100)
    alpha: float = Field(0.7, ge=0, le=1, description="weight of the distillation term; 1 - alpha weights the CE")
    hidden_mse: float = Field(0.0, ge=0, le=1e4, description="weight of the relative hidden-state MSE (layers paired "
                                                             "evenly by depth; equal widths only)")
    teacher_dtype: Literal["same", "float32", "bfloat16", "float16"] = "same"

    @field_validator("teacher")
    @classmethod
    def _teacher(cls, value: str | None) -> str | None:
        return None if value is None else check_teacher_name(value)

    def describe(self) -> str:
        hidden = f", hidden MSE {self.hidden_mse:g}" if self.hidden_mse else ""
        return (f"distilling from {self.teacher or 'the default teacher'} (T={self.temperature:g}, "
                f"alpha={self.alpha:g}{hidden})")

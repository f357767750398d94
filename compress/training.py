"""What every training step shares (LoRA recovery, distillation, QAT): the step budget and data of a recipe step,
optional LoRA adapters merged back afterwards, and one transformers Trainer run over token windows of text or over
prompted task examples (loss on the answer tokens only)."""

from __future__ import annotations

import contextlib
import copy
import tempfile

import torch
from transformers import Trainer, TrainingArguments

from compress import distributed
from compress.config.training import LoRA, TrainingBudget
from compress.data import training_windows
from compress.errors import CompressError
from compress.modules import decoder_layers
from compress.tasks import prompted_examples, task_for_split


def training_examples(tokenizer, datasets: str | tuple[str, ...], seq_len: int, data_dir=None) -> list[dict]:
    """What a training step trains on ({"input_ids", "labels"} each, at most seq_len tokens): the windows of every
    text dataset and the prompted rows of every task split among `datasets` (a training step's `data`)."""
    examples = []
    for dataset in (datasets,) if isinstance(datasets, str) else datasets:
        if task_for_split(dataset):
            examples += prompted_examples(tokenizer, dataset, seq_len, data_dir)
        else:
            examples += [{"input_ids": row, "labels": row}
                         for row in training_windows(tokenizer, dataset, seq_len, data_dir)]
    return examples


def with_lora(model: torch.nn.Module, adapter: LoRA) -> torch.nn.Module:
    """The model wrapped with peft LoRA adapters as the LoRA block describes (every field is a LoraConfig field)."""
    import warnings

    from peft import LoraConfig, get_peft_model

    from compress.moe import moe_blocks

    kwargs = adapter.peft_kwargs()
    fused_experts = any(hasattr(block.experts, "gate_up_proj") for block in moe_blocks(model))
    if fused_experts and kwargs.get("lora_dropout"):  # peft adapts fused expert weights only without dropout
        warnings.warn(f"LoRA dropout {kwargs['lora_dropout']} is not applied: peft's adapters on fused MoE expert "
                      f"weights take no dropout, so this model trains with dropout 0", stacklevel=2)
        kwargs["lora_dropout"] = 0.0
    return get_peft_model(model, LoraConfig(**kwargs))


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model with any LoRA adapters merged into its weights."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
        for param in model.parameters():
            param.requires_grad_(True)  # peft froze the base weights; an ordinary model has them trainable
    return model.eval()


def labelled_logits(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                    output_hidden_states: bool = False):
    """(logits at the positions that have a next-token label, those labels, model outputs). The head (49k outputs
    for SmolLM2: most of a small model's step) runs only at the sequence positions where some row has a label
    (`logits_to_keep`), so prompt-masked data (-100 labels) costs far less. The model's own forward is called, so a
    DDP or FSDP wrapper around it synchronises as it must."""
    targets = labels[:, 1:]
    scored = targets != -100
    positions = scored.any(0).nonzero().squeeze(1)  # input positions whose next token is a label in some row
    outputs = model(input_ids=input_ids, use_cache=False, output_hidden_states=output_hidden_states,
                    logits_to_keep=positions)
    return outputs.logits[scored[:, positions]], targets[scored], outputs


def token_count(num_items_in_batch, targets: torch.Tensor):
    """What a summed per-token loss is divided by: the Trainer's count of labelled tokens in the whole batch (every
    process's share, every accumulation step), or this batch's own count. Then several processes give the same
    gradient as one."""
    return targets.numel() if num_items_in_batch is None else num_items_in_batch


def first_non_finite_parameter(model: torch.nn.Module) -> str | None:
    """The name of the first parameter holding a NaN or inf, or None."""
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            return name
    return None


class LabelledPositionsTrainer(Trainer):
    """Trainer with the next-token loss computed from `labelled_logits`; a loss that is NaN or inf on any process
    stops training on every process, with one error naming the step (`step_name`, set by `train`). With
    `autocast_dtype` (set by `train` from the budget's `autocast`) the model's forward runs under torch.autocast in
    that dtype (its backward follows the recorded dtypes)."""

    step_name = "training"
    autocast_dtype: torch.dtype | None = None

    def autocast(self):
        """The context the forward passes run in: torch.autocast in `autocast_dtype`, or nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.args.device.type, dtype=self.autocast_dtype)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self.autocast():
            logits, targets, _ = labelled_logits(model, inputs["input_ids"], inputs["labels"])
        loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
        loss = loss / token_count(num_items_in_batch, targets)
        self.check_finite_loss(loss, model)
        return (loss, {"logits": logits}) if return_outputs else loss

    def check_finite_loss(self, loss: torch.Tensor, model: torch.nn.Module) -> None:
        """Stop before the backward pass of a non-finite loss: its gradients would turn every weight NaN. The ranks
        agree first (every one reaches this point once per batch), so none is left waiting in a gradient all-reduce
        that a rank which stopped alone would never join."""
        finite = bool(torch.isfinite(loss.detach()))
        if distributed.all_true(finite):
            return
        where = first_non_finite_parameter(model)
        cause = (f"the weight {where} is already NaN or inf" if where is not None else
                 "the weights are finite, so the forward overflowed (in float16, try dtype bfloat16)")
        value = "finite here" if finite else f"{loss.item()}"
        raise CompressError(f"{self.step_name}: the training loss is not finite (this process: {value}) at training "
                            f"step {self.state.global_step + 1} of {self.state.max_steps}: {cause}; lower lr, or check "
                            f"the model before this step")


HALF_PRECISION = (torch.bfloat16, torch.float16)


class MasterWeightsAdamW(torch.optim.AdamW):
    """AdamW that keeps a float32 master copy of every bfloat16/float16 parameter: each update is applied to the
    master, and the parameter becomes the master's rounding. Applied to a half-precision weight itself, an update
    below half the weight's spacing rounds back to the same value (lr 2e-5 against a weight near 0.02, whose bfloat16
    spacing is 1.2e-4): the weight would never move. The forward pass still runs in the model's dtype."""

    def __init__(self, params, **kwargs):
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.halves: list[tuple[torch.nn.Parameter, torch.Tensor]] = []  # (the model's parameter, its master)
        with_masters = []
        for group in groups:
            params_or_masters = []
            for param in group["params"]:
                if param.dtype in HALF_PRECISION:
                    master = param.detach().float().requires_grad_(True)
                    self.halves.append((param, master))
                    param = master
                params_or_masters.append(param)
            with_masters.append({**group, "params": params_or_masters})
        super().__init__(with_masters, **kwargs)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for param, master in self.halves:
            master.grad = None if param.grad is None else param.grad.float()
        super().step()
        for param, master in self.halves:
            param.copy_(master)
            master.grad = None
        return loss


def _trained_in_half_precision(model: torch.nn.Module) -> dict[str, torch.dtype]:
    """{name: dtype} of every trained parameter in bfloat16 or float16 (LoRA adapters are float32 already: peft
    makes them so)."""
    return {name: p.dtype for name, p in model.named_parameters() if p.requires_grad and p.dtype in HALF_PRECISION}


def _sharded_mixed_precision(half: dict[str, torch.dtype], sharded: bool) -> dict:
    """TrainingArguments for float32 master weights under FSDP2: accelerate remaps the optimizer's parameters to their
    shards, which MasterWeightsAdamW's masters are not; under mixed precision it upcasts the trained parameters to
    float32 itself, and computes in the half type."""
    if not (sharded and half):
        return {}
    return {"bf16" if torch.bfloat16 in half.values() else "fp16": True}


def _master_weights_optimizer(half: dict[str, torch.dtype], sharded: bool, args: TrainingArguments) -> dict:
    """Trainer arguments for float32 master weights in one process or replicated ones: MasterWeightsAdamW with the
    Trainer's AdamW settings (the forward pass is unchanged)."""
    if sharded or not half:
        return {}
    kwargs = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
    return {"optimizer_cls_and_kwargs": (MasterWeightsAdamW, kwargs)}


def pad_right(examples: list[dict]) -> dict:
    """Collate examples of different lengths: input ids padded on the right (under a causal mask the pads follow
    every real token and cannot change it, so no attention mask is needed), labels padded with -100 (no loss)."""
    width = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, : len(example["input_ids"])] = example["input_ids"]
        labels[row, : len(example["labels"])] = example["labels"]
    return {"input_ids": input_ids, "labels": labels}


def _length_grouping(examples: list[dict]) -> dict:
    """Batch examples of similar length together when lengths differ (prompted task rows): with random batches padded
    to their longest row, a step on the prompted task rows spends most of its work on padding.
    The argument's name changed within transformers 5."""
    if len({len(example["input_ids"]) for example in examples}) == 1:
        return {}
    if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True}


def _base(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _meta_skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` (wrappers, adapters and all) whose parameters are on the meta device: no memory, the same
    names and structure, ready for the trained weights."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _fsdp_arguments(model: torch.nn.Module, sharding: str) -> dict:
    """TrainingArguments for accelerate's FSDP2: each decoder layer a shard unit, full state dicts."""
    layer = type(decoder_layers(_base(model))[0]).__name__
    config = {"version": 2, "transformer_layer_cls_to_wrap": [layer], "reshard_after_forward": True,
              "cpu_offload": sharding == "fsdp_offload", "state_dict_type": "FULL_STATE_DICT",
              "cpu_ram_efficient_loading": False}
    if hasattr(TrainingArguments, "_apply_legacy_fsdp_to_config"):  # transformers >= 5.18: fsdp=True, the rest here
        return {"fsdp": True, "fsdp_config": config}
    return {"fsdp": "full_shard auto_wrap" + (" offload" if sharding == "fsdp_offload" else ""), "fsdp_config": config}


def _unsharded(trained: torch.nn.Module, skeleton: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The FSDP2-trained model as a plain module on every process: the full weights gathered into the skeleton."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in trained.parameters()):  # accelerate fell back to something else
        raise CompressError("sharding: fsdp was asked for but the Trainer did not shard the model with FSDP2; check "
                            "the accelerate and transformers versions, or use sharding: replicate")
    state = get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True))
    skeleton.load_state_dict(state, assign=True)
    _base(skeleton).tie_weights()
    return skeleton.to(device)


def train(model: torch.nn.Module, budget: TrainingBudget, data: torch.Tensor | list[dict], seed: int = 0,
          show_progress: bool = True, trainer_class: type[Trainer] = LabelledPositionsTrainer, callbacks=(),
          step: str = "training", **trainer_kwargs) -> torch.nn.Module:
    """Train `model` for `budget.steps` steps through a transformers Trainer (`trainer_class`, e.g.
    DistillationTrainer), with cosine decay after a linear warm-up; returns the trained model (`model` itself,
    trained in place, unless FSDP2 sharded it: then a plain copy with the trained weights). `data`: token windows
    [windows, seq_len] (`compress.data.training_windows`, every token trained on) or examples with their own labels
    (`training_examples`). `step` names the recipe step in errors (a non-finite loss). A model in bfloat16 or
    float16 trains with float32 master weights (MasterWeightsAdamW) and is returned in its own dtype."""
    if isinstance(data, torch.Tensor):
        data = [{"input_ids": row, "labels": row} for row in data]
    if len(data) < budget.batch_size:
        raise CompressError(f"training data has {len(data)} examples, fewer than one batch of {budget.batch_size}; "
                            f"lower batch_size (or seq_len, for text windows) or use more data")
    processes = distributed.world_size()
    if budget.batch_size % processes:
        raise CompressError(f"batch_size {budget.batch_size} is the global batch and must split evenly over "
                            f"{processes} processes; use a multiple of {processes}")
    device = next(model.parameters()).device
    on_cpu = device.type == "cpu"
    sharded = processes > 1 and budget.sharding != "replicate"
    if sharded and on_cpu:
        raise CompressError(f"sharding: {budget.sharding} runs on GPUs only (accelerate's FSDP2 has no CPU backend); "
                            f"on the CPU use sharding: replicate")
    skeleton = _meta_skeleton(model) if sharded else None
    half = _trained_in_half_precision(model)
    with tempfile.TemporaryDirectory(prefix="compress-train-") as scratch:
        args = TrainingArguments(
            output_dir=scratch, max_steps=budget.steps, per_device_train_batch_size=budget.batch_size,
            learning_rate=budget.lr, warmup_steps=budget.warmup_ratio,  # a float < 1 is a ratio of the steps
            lr_scheduler_type="cosine", logging_steps=max(1, budget.steps // 10), save_strategy="no",
            report_to="none", seed=seed, use_cpu=on_cpu, disable_tqdm=not show_progress, dataloader_num_workers=0,
            remove_unused_columns=False, **_length_grouping(data),
            # batch_size is the global batch: each of several processes takes its slice of every batch, so the
            # batches (and their order) are those of one process
            accelerator_config={"split_batches": True}, ddp_find_unused_parameters=False,
            **(_fsdp_arguments(model, budget.sharding) if sharded else {}), **_sharded_mixed_precision(half, sharded))
        config = _base(model).config
        use_cache = config.use_cache
        trainer = trainer_class(model=model, args=args, train_dataset=data, data_collator=pad_right,
                                callbacks=list(callbacks), **_master_weights_optimizer(half, sharded, args),
                                **trainer_kwargs)
        trainer.step_name = step
        trainer.autocast_dtype = None if budget.autocast == "off" else getattr(torch, budget.autocast)
        try:
            trainer.train()
        finally:  # training turns the KV cache off in the config; a saved step would then decode without it
            config.use_cache = use_cache
    # the skeleton was copied before the Trainer touched the config: it keeps use_cache as it was
    if not sharded:
        return model
    trained = _unsharded(trainer.model, skeleton, device)
    for name, param in trained.named_parameters():  # the float32 masters back to the model's own dtype
        if name in half:
            param.data = param.data.to(half[name])
    return trained

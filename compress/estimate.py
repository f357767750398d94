"""`estimate(source)`: will this model fit? Disk and memory per precision and per pruning ratio, for inference
(weights + KV cache + the prefill's working set) and for the training steps (LoRA recovery, distillation: weights,
gradients, optimizer states, saved activations, logits), from the config alone: the model is built on the meta
device, so a 70B estimate costs no memory and downloads nothing but config.json.

The activation terms count what a Llama-family decoder layer keeps (for backward) or holds at its peak (inference),
per token, in units of the hidden size h and the MLP width i; eval/bench_estimate.py checks the totals against
measured peaks (torch's allocator on CUDA, the process's resident memory on the CPU)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from transformers import AutoConfig, AutoModelForCausalLM

from compress.architectures import family
from compress.config.prune import TaylorPrune
from compress.config.sources import ARCHITECTURES, RandomInit
from compress.errors import CompressError
from compress.models import architecture_config, random_init_config, resolve_source
from compress.modules import DEFAULT_IGNORE, decoder_layers, quantizable_linears
from compress.prune.structure import planned_experts, planned_widths
from compress.widths import build_layers_at_recorded_widths, layer_widths, shared_expert, shrink_layer_to

# bits per weight as saved: compressed-tensors packs the integers densely, ceil(n · bits / 32) int32 words per row
# (3-bit values straddle words);
# the FP4 grids pack two e2m1 values per byte and count their one-byte scales here (e4m3 per 16, e8m0 per 32)
PRECISIONS = {"fp32": 32.0, "bf16": 16.0, "fp8": 8.0, "int8": 8.0, "int4": 4.0, "int3": 3.0,
              "nvfp4": 4 + 8 / 16, "mxfp4": 4 + 8 / 32}
FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class EstimateConfig(BaseModel):
    """`compress estimate SOURCE --context 4096 --batch 1`: what is estimated, at which sizes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    context: int = Field(2048, ge=1, description="tokens per sequence at inference (prompt + generated)")
    batch: int = Field(1, ge=1, description="sequences decoded together")
    dtype: str = Field("bfloat16", description="precision of what is not quantized, and of training")
    group_size: int = Field(128, ge=1, description="int formats: weights per scale")
    ratios: tuple[Annotated[float, Field(gt=0, lt=1)], ...] = Field(
        (0.25, 0.5), description="pruning ratios to estimate (every decoder layer); also a comma-separated string")
    train_batch: int = Field(8, ge=1)
    train_seq_len: int = Field(256, ge=8)
    lora_r: int = Field(8, ge=1)
    kv_cache: Literal["auto", "dtype", "fp8"] = Field(
        "auto", description="the KV cache's precision: fp8 (one byte a value: a kv_cache step), dtype (the model's; "
                             "fp32 rows: fp32), auto: fp8 where the model's config has a kv_cache_scheme, else dtype")

    @field_validator("ratios", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        return tuple(part for part in value.split(",") if part.strip()) if isinstance(value, str) else value


@dataclass
class Shapes:
    """What the estimate needs from a model: parameter counts by role and the widths that size activations."""

    params: int  # stored tensors (a tied head counted once)
    quantizable: int  # decoder Linear weights: what quantization shrinks
    lora_params_per_rank: int  # sum of (in + out) over the Linears LoRA (all-linear) adapts
    layers: int
    hidden: int
    intermediate: int  # summed over layers / layers (pruned layers are narrower)
    kv_width: int  # KV heads x head_dim, summed over layers / layers
    vocab: int


def source_config(source: str | RandomInit):
    """The transformers config of a model source, reading no weights (a hub id: its config.json only)."""
    if isinstance(source, RandomInit):
        return random_init_config(source)[0]
    name = {entry.hub_id: name for name, entry in ARCHITECTURES.items()}.get(source, source)
    if name in ARCHITECTURES:  # known shapes need no download
        return architecture_config(name)
    located = resolve_source(source)
    kwargs = {"gguf_file": located.gguf_file} if located.gguf_file else {}
    try:
        return AutoConfig.from_pretrained(located.location, **kwargs)
    except OSError as error:
        raise CompressError(f"could not read the config of {located.describe()}: {str(error).splitlines()[0]}; "
                            f"known shapes work offline: {', '.join(ARCHITECTURES)}")


def shapes(config, prune: TaylorPrune | None = None) -> Shapes:
    """Build the model a transformers config describes on the meta device (no memory), prune its shapes as
    `prune` would, and count."""
    known = family(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        build_layers_at_recorded_widths(model)  # a pruned model's per-layer widths (no-op for stock configs)
    layers = decoder_layers(model)
    if prune is not None:
        start, end = prune.layers or (0, len(layers))
        for index in range(start, end):
            layer = layers[index]
            widths = planned_widths(layer_widths(layer, known), prune.ratio, prune.heads, prune.targets, prune.multiple,
                                    layer.self_attn.head_dim, f"decoder layer {index}")
            if widths.num_experts and prune.experts:
                widths = planned_experts(widths, prune.experts, config.num_experts_per_tok, f"decoder layer {index}")
            shrink_layer_to(layer, widths, known)
    linears = [module for _, module in quantizable_linears(model)]  # routers are in DEFAULT_IGNORE
    experts = [p for name, p in model.named_parameters() if ".experts." in name and p.dim() == 3]
    count = len(layers)
    return Shapes(
        params=sum(p.numel() for p in model.parameters()),
        # MoE experts (fused 3-D parameters until quantization makes them Linears: compress.moe) count too
        quantizable=sum(m.weight.numel() for m in linears) + sum(p.numel() for p in experts),
        lora_params_per_rank=sum(m.in_features + m.out_features for m in linears),
        layers=count, hidden=config.hidden_size,
        intermediate=sum(_active_mlp_width(layer, config, known) for layer in layers) // count,
        kv_width=sum(_kv_width(layer.self_attn, config, known) for layer in layers) // count,
        vocab=model.get_output_embeddings().out_features,
    )


def _kv_width(attn, config, known) -> int:
    """KV heads x head_dim of one layer (Phi-3's fused qkv_proj: from the config)."""
    if not known.fused_qkv:
        return attn.k_proj.out_features
    return config.num_key_value_heads * (getattr(config, "head_dim", None)
                                         or config.hidden_size // config.num_attention_heads)


def _active_mlp_width(layer, config, known) -> int:
    """The MLP width a token passes through: the dense MLP's, or (MoE) the experts it is routed to plus any shared
    expert."""
    mlp = layer.mlp
    if known.mlp != "experts":
        return mlp.down_proj.in_features
    width = config.num_experts_per_tok * mlp.experts.down_proj.shape[-1]
    shared = shared_expert(mlp)
    return width + (shared.down_proj.in_features if shared is not None else 0)


def disk_bytes(shape: Shapes, precision: str, dtype_bytes: int, group_size: int) -> int:
    """Size of the saved weights: quantized Linears at their packed width plus one scale per group for int4 / int3
    (fp8 and int8 have one scale per output row: negligible, left out; nvfp4 / mxfp4 count theirs in PRECISIONS, and
    NVFP4's 4-byte global scale per tensor is left out); everything else (embeddings, norms) at `dtype_bytes`."""
    if precision in ("fp32", "bf16"):
        return shape.params * int(PRECISIONS[precision] // 8)
    scales = shape.quantizable // group_size if precision.startswith("int") and precision != "int8" else 0
    rest = shape.params - shape.quantizable
    return int(shape.quantizable * PRECISIONS[precision] / 8) + scales * dtype_bytes + rest * dtype_bytes


def linear_bytes(rows: int, cols: int, bits: int, group_size: int, sym: bool, scale_bytes: int,
                 embedding: bool = False) -> int:
    """Saved bytes of one Linear on an integer grid, as compressed-tensors' pack-quantized writes it: each row's
    values packed densely into ceil(cols · bits / 32) int32 words, one scale per group (in the model's dtype), an
    asymmetric grid's zero points packed the same way along the output dimension, and the 2-entry int64
    weight_shape. What a mixed-precision budget (compress.quantize.mixed) spends and what each grid of a step costs.
    `embedding`: an 8-bit input embedding [vocab, hidden], saved int-quantized (one int8 per value and its scales,
    compress.quantize.formats)."""
    groups = 1 if group_size == -1 else cols // group_size
    if embedding:
        return rows * cols + rows * groups * scale_bytes
    zero_points = 0 if sym else -(-rows * bits // 32) * groups * 4
    return rows * -(-cols * bits // 32) * 4 + rows * groups * scale_bytes + zero_points + 16


def inference_bytes(shape: Shapes, precision: str, config: EstimateConfig, kv_fp8: bool = False) -> dict[str, int]:
    """Weights as stored, the KV cache for context x batch tokens (16-bit, fp32 for an fp32 model; with kv_fp8 one
    byte a value, its per-layer scales left out), and the
    prefill's peak working set: per token the residual stream, the normed input and the MLP's gate, up and product
    (2h + 3i), plus the last position's logits in fp32."""
    dtype_bytes = FLOAT_BYTES[config.dtype]
    act_bytes = 4 if precision == "fp32" else dtype_bytes
    tokens = config.context * config.batch
    weights = disk_bytes(shape, precision, dtype_bytes, config.group_size)
    kv_cache = 2 * shape.layers * shape.kv_width * tokens * (1 if kv_fp8 else act_bytes)
    working = tokens * (2 * shape.hidden + 3 * shape.intermediate) * act_bytes + config.batch * shape.vocab * 4
    return {"weights": weights, "kv_cache": kv_cache, "activations": working,
            "total": weights + kv_cache + working}


def _saved_per_token(shape: Shapes, lora_r: int | None) -> float:
    """Elements autograd keeps per token per decoder layer (no gradient checkpointing), counted with
    torch.autograd.graph.saved_tensors_hooks on a SmolLM2-shaped Llama layer (fp32, sdpa attention) and written in
    the layer's widths: the norms, projection inputs, rotary q/k, attention inputs and output, the MLP's gate,
    activation, up and product. LoRA (all-linear, with dropout) adds each adapted Linear's dropped-out input and
    mask and the rank-r intermediates."""
    if lora_r is None:
        return 9.38 * shape.hidden + 2.56 * shape.kv_width + 4.56 * shape.intermediate
    return 17.2 * shape.hidden + 2.55 * shape.kv_width + 5.57 * shape.intermediate + 9.4 * lora_r


def training_bytes(shape: Shapes, config: EstimateConfig) -> dict[str, dict[str, int]]:
    """Peak memory of one training step of LoRA recovery (frozen weights, fp32 adapters with AdamW) and of
    full-student distillation (AdamW states in the weights' precision, a frozen teacher of the same size):
    weights + gradients + optimizer states + saved activations + the step's logits (the head's output, its fp32
    copy, log-softmax and their gradients; distillation adds the teacher's)."""
    dtype_bytes = FLOAT_BYTES[config.dtype]
    tokens = config.train_batch * config.train_seq_len
    fp32_copy = 4 if dtype_bytes < 4 else 0  # the losses upcast the logits; a no-op when they are fp32 already
    logits = tokens * shape.vocab * (dtype_bytes + fp32_copy + 4 + 4)  # + log-softmax + gradient

    lora_params = config.lora_r * shape.lora_params_per_rank
    lora = {"weights": shape.params * dtype_bytes + lora_params * 4, "gradients": lora_params * 4,
            "optimizer": lora_params * 8,
            "activations": tokens * shape.layers * _saved_per_token(shape, config.lora_r) * dtype_bytes + logits}
    student = shape.params * dtype_bytes
    distill = {"weights": 2 * student, "gradients": student, "optimizer": 2 * student,
               "activations": tokens * shape.layers * _saved_per_token(shape, None) * dtype_bytes
               + logits + tokens * shape.vocab * (dtype_bytes + fp32_copy + 4)}  # the teacher's
    for part in (lora, distill):
        part["total"] = sum(part.values())
    return {"lora": lora, "distill": distill}


def estimate(source, config: EstimateConfig = EstimateConfig()) -> dict:
    """Every figure `compress estimate` prints, as a dict of bytes. `source`: a model source (str or RandomInit)
    or a transformers config."""
    if config.dtype not in FLOAT_BYTES:
        raise CompressError(f"dtype {config.dtype!r} is not one of {', '.join(FLOAT_BYTES)}")
    model_config = source if hasattr(source, "to_dict") else source_config(source)
    base = shapes(model_config)
    dtype_bytes = FLOAT_BYTES[config.dtype]
    kv_fp8 = config.kv_cache == "fp8" or (config.kv_cache == "auto" and _has_kv_cache_scheme(model_config))
    result = {"source": getattr(source, "_name_or_path", None) or str(source), "config": config.model_dump(mode="json"),
              "params": base.params, "quantizable_params": base.quantizable, "precisions": {}, "pruned": {},
              "training": {}}
    result["kv_cache"] = {"counted": "fp8" if kv_fp8 else config.dtype, "bytes": {
        config.dtype: inference_bytes(base, "bf16", config)["kv_cache"],
        "fp8": inference_bytes(base, "bf16", config, kv_fp8=True)["kv_cache"]}}
    for precision in PRECISIONS:
        result["precisions"][precision] = {"disk": disk_bytes(base, precision, dtype_bytes, config.group_size),
                                           "inference": inference_bytes(base, precision, config, kv_fp8)}
    for ratio in config.ratios:
        pruned = shapes(model_config, TaylorPrune(ratio=ratio))
        result["pruned"][str(ratio)] = {
            "params": pruned.params,
            "precisions": {p: {"disk": disk_bytes(pruned, p, dtype_bytes, config.group_size),
                               "inference": inference_bytes(pruned, p, config, kv_fp8)["total"]} for p in PRECISIONS}}
    result["training"] = training_bytes(base, config)
    saved = saved_grid_bytes(model_config, dtype_bytes)
    if saved:  # a quantized checkpoint: its own grids, as saved (several for a mixed-precision step)
        grids, on_grids = saved  # the rest (norms, and a float head or embedding) in the dtype
        result["as_saved"] = {"grids": grids, "disk": sum(grids.values()) + (base.params - on_grids) * dtype_bytes}
    return result


def _quantization_config(model_config) -> dict:
    quant = getattr(model_config, "quantization_config", None) or {}
    return quant if isinstance(quant, dict) else quant.to_dict() if hasattr(quant, "to_dict") else vars(quant)


def saved_grid_bytes(model_config, dtype_bytes: int) -> tuple[dict[str, int], int] | None:
    """{grid: bytes} of the modules a compressed-tensors checkpoint's config groups put on integer grids (several
    groups: a mixed-precision step) — decoder Linears, and the head and the embedding where a step quantized them —
    each counted by linear_bytes, and how many weights they hold; None where the config has no integer config
    groups."""
    groups = (_quantization_config(model_config).get("config_groups") or {}).values()
    grids = [(g["weights"], g.get("targets", [])) for g in groups if (g.get("weights") or {}).get("type") == "int"]
    if not grids:
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
        build_layers_at_recorded_widths(model)
    ignore = _quantization_config(model_config).get("ignore") or []
    totals: dict[str, int] = {}
    counted: list[int] = []  # weights each grid holds: the head's and the embedding's leave the float remainder
    # every Linear but the MoE routers (the head too, unless ignored: a step may quantize it), and the embedding
    embedding = model.get_input_embeddings()
    routers = tuple(name for name in DEFAULT_IGNORE if name != "lm_head")
    modules = [*quantizable_linears(model, ignore=routers),
               *[(name, m) for name, m in model.named_modules() if m is embedding]]
    for name, linear in modules:
        if name in ignore:
            continue
        is_embedding = isinstance(linear, torch.nn.Embedding)
        for weights, targets in grids:  # targets: exact names (several groups), "re:" patterns or "Linear"
            if name in targets or ("Linear" in targets and not is_embedding) or any(
                    t.startswith("re:") and re.fullmatch(t[3:], name) for t in targets):
                group = weights.get("group_size") or -1
                key = f"W{weights['num_bits']} {'per-channel' if group == -1 else f'g{group}'} " \
                      f"{'sym' if weights.get('symmetric', True) else 'asym'}"
                rows, cols = linear.weight.shape
                totals[key] = totals.get(key, 0) + linear_bytes(rows, cols, weights["num_bits"], group,
                                                                weights.get("symmetric", True), dtype_bytes,
                                                                embedding=is_embedding)
                counted.append(linear.weight.numel())
                break
    return totals, sum(counted)


def _has_kv_cache_scheme(model_config) -> bool:
    """Whether a model's config.json says its KV cache is quantized (compressed-tensors' kv_cache_scheme)."""
    return bool(_quantization_config(model_config).get("kv_cache_scheme"))


def _gib(value: int) -> str:
    return f"{value / 2**30:,.2f} GiB"


def render_estimate(result: dict, budget_gib: float | None = None) -> str:
    """Markdown tables of an `estimate` result; with `budget_gib`, each memory total says whether it fits."""
    config = result["config"]

    def mark(value: int) -> str:
        return "" if budget_gib is None else (" ✓" if value <= budget_gib * 2**30 else " ✗")

    def total(value: int) -> str:
        return _gib(value) + mark(value)

    lines = [f"# Estimate: {result['source']}", "",
             f"{result['params'] / 1e6:,.0f} M parameters, {result['quantizable_params'] / 1e6:,.0f} M of them in the "
             f"decoder's Linear layers and experts (what quantization shrinks); what is not quantized stays "
             f"{config['dtype']}; int formats have one scale per {config['group_size']} weights; nvfp4 one e4m3 "
             f"scale per 16 (and an FP32 one per tensor), mxfp4 one power-of-two scale per 32."
             + (f" ✓ / ✗: fits in {budget_gib:g} GiB or not." if budget_gib else ""), "",
             f"## Inference: {config['context']:,} tokens x batch {config['batch']}", "",
             "| precision | disk | weights | KV cache | working set | total |", "|---|---:|---:|---:|---:|---:|"]
    for precision, row in result["precisions"].items():
        memory = row["inference"]
        lines.append(f"| {precision} | {_gib(row['disk'])} | {_gib(memory['weights'])} | {_gib(memory['kv_cache'])} "
                     f"| {_gib(memory['activations'])} | {total(memory['total'])} |")
    saved = result.get("as_saved")
    if saved:
        grids = ", ".join(f"{grid} {_gib(size)}" for grid, size in saved["grids"].items())
        lines += ["", f"As saved (its quantization_config's grids): {_gib(saved['disk'])} on disk; the quantized "
                      f"Linears: {grids}."]
    kv = result.get("kv_cache")
    if kv:
        sizes = ", ".join(f"{_gib(value)} in {name}" for name, value in kv["bytes"].items())
        lines += ["", f"KV cache at {config['context']:,} tokens x batch {config['batch']}: {sizes} (a `kv_cache` "
                      f"step); the tables count it in {kv['counted']} (`--kv-cache`)."]
    if result["pruned"]:
        lines += ["", "## After structured pruning of every decoder layer (GiB: inference total / disk)", "",
                  "| ratio | params | " + " | ".join(result["precisions"]) + " |",
                  "|---|---:|" + "---:|" * len(result["precisions"])]
        for ratio, row in result["pruned"].items():
            cells = [f"{v['inference'] / 2**30:.1f}{mark(v['inference'])} / {v['disk'] / 2**30:.1f}"
                     for v in row["precisions"].values()]
            lines.append(f"| {float(ratio):.0%} | {row['params'] / 1e6:,.0f} M | " + " | ".join(cells) + " |")
    lines += ["", f"## Training: one step of {config['train_batch']} x {config['train_seq_len']} tokens, "
                  f"{config['dtype']}, no gradient checkpointing", "",
              "| step | weights | gradients | optimizer | activations + logits | total |",
              "|---|---:|---:|---:|---:|---:|"]
    names = {"lora": f"LoRA recovery (r {config['lora_r']}, all linear layers)",
             "distill": "distillation (full student + frozen teacher)"}
    for kind, row in result["training"].items():
        lines.append(f"| {names[kind]} | {_gib(row['weights'])} | {_gib(row['gradients'])} | "
                     f"{_gib(row['optimizer'])} | {_gib(row['activations'])} | {total(row['total'])} |")
    lines += ["", "Checked against measured peaks within 15 % (eval/bench_estimate.py); the CUDA context (~0.5 GiB) "
                  "and allocator slack come on top."]
    return "\n".join(lines)

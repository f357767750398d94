"""Recipe: `quantize: {method: rtn | gptq | awq | fp8 | smoothquant | qat, ...}`: one config class per method,
discriminated on `method`."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, field_validator, model_validator

from compress.config.base import MAX_TOKENS, MAX_WIDTH, Strict
from compress.config.data import CalibrationData
from compress.config.training import KD, TrainingBudget

SUPPORTED_BITS = (2, 3, 4, 8)
SAVE_FORMATS = ("compressed-tensors", "gptq")


class WeightOnlyConfig(Strict):
    """What every integer weight-only method shares: the grid (bits, group size, symmetry) and the saved format."""

    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = Field(128, description="input columns per scale; -1 = one scale per output channel")
    sym: bool = True
    format: Literal["compressed-tensors", "gptq"] = Field(
        "compressed-tensors", description="compressed-tensors (stock transformers, vLLM) or the GPTQ v1 layout")
    ignore: tuple[str, ...] = Field((), description=(
        "Linears kept in full precision besides lm_head: full module names or shell-style patterns, e.g. "
        "model.layers.0.mlp.down_proj or '*.down_proj' (a step's step.json lists each Linear's sensitivity)"))

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int) -> int:
        if value != -1 and not 1 <= value <= MAX_WIDTH:
            raise ValueError(f"got {value}; allowed: 1 to {MAX_WIDTH} columns, or -1 for per-channel")
        return value

    @model_validator(mode="after")
    def _gptq_layout(self):
        if self.format == "gptq" and self.bits == 3:
            raise ValueError("format gptq packs 2, 4 or 8 bits into int32 words; for 3 bits use format "
                             "compressed-tensors")
        if self.format == "gptq" and not self.sym:
            raise ValueError("format gptq (v1) stores zero points minus one, so an asymmetric zero point of 0 "
                             "cannot be written; use sym: true, or format compressed-tensors for asymmetric grids")
        return self

    def grid_summary(self) -> str:
        group = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        kept = f", {', '.join(self.ignore)} kept float" if self.ignore else ""
        if getattr(self, "grid", "int") != "int":
            inputs = " W4A4 (inputs on the same grid at run time)" if self.activations == "dynamic" else " weight-only"
            return f"{FP4_GRIDS[self.grid]}{inputs}{kept}"
        return f"W{self.bits} {group} {'sym' if self.sym else 'asym'}{kept}"


FP4_GROUP = {"nvfp4": 16, "mxfp4": 32}
FP4_GRIDS = {"nvfp4": "NVFP4 (e2m1, an e4m3 scale per 16, an FP32 scale per tensor)",
             "mxfp4": "MXFP4 (e2m1, a power-of-two scale per 32)"}


class FP4Grid(Strict):
    """The 4-bit floating-point grids that RTN and GPTQ round onto besides the integer one: `grid: nvfp4 | mxfp4`.
    Named `grid`, not `format`: `format` is the saved layout, and an FP4 grid is always saved as compressed-tensors'
    nvfp4- / mxfp4-pack-quantized. An FP4 grid fixes bits (4), group size (16 / 32) and symmetry, so those keys
    may be left out."""

    grid: Literal["int", "nvfp4", "mxfp4"] = Field(
        "int", description="int: integers in groups (bits, group_size, sym); nvfp4: e2m1 values, an e4m3 scale per 16 "
                           "and an FP32 scale per tensor; mxfp4: e2m1 values, a power-of-two scale per 32")
    activations: Literal["none", "dynamic"] = Field(
        "none", description="FP4 grids: dynamic also rounds each Linear's input onto the grid at run time (W4A4), "
                            "simulated in floating point where the hardware has no FP4 units")

    @model_validator(mode="before")
    @classmethod
    def _fp4_fixes_the_grid(cls, data):
        grid = data.get("grid") if isinstance(data, dict) else None
        if grid not in FP4_GROUP:
            return data
        fixed = {"bits": 4, "group_size": FP4_GROUP[grid], "sym": True, "format": "compressed-tensors"}
        for key, value in fixed.items():
            if key in data and data[key] != value:
                raise ValueError(f"grid {grid} has {key} {value} ({FP4_GRIDS[grid]}); remove `{key}: {data[key]}` "
                                 f"from the step, or use grid int for an integer grid")
        return {**data, **fixed}

    @model_validator(mode="after")
    def _inputs_need_an_fp4_grid(self):
        if self.activations == "dynamic" and self.grid == "int":
            raise ValueError("activations: dynamic rounds inputs onto an FP4 grid: set grid nvfp4 or mxfp4 (for 8-bit "
                             "activations use method fp8)")
        return self


def _grid_name(bits: int, group_size: int, sym: bool) -> str:
    return f"W{bits} {'per-channel' if group_size == -1 else f'g{group_size}'} {'sym' if sym else 'asym'}"


class GridChange(Strict):
    """A grid that differs from its step's in some of bits / group size / symmetry; unset keys are the step's."""

    bits: Literal[2, 3, 4, 8] | None = None
    group_size: int | None = Field(None, description="input columns per scale; -1 = one scale per output channel")
    sym: bool | None = None

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int | None) -> int | None:
        if value is not None and value != -1 and not 1 <= value <= MAX_WIDTH:
            raise ValueError(f"got {value}; allowed: 1 to {MAX_WIDTH} columns, or -1 for per-channel")
        return value

    def on(self, step: WeightOnlyConfig) -> tuple[int, int, bool]:
        """(bits, group_size, sym) of this grid inside `step`."""
        return (step.bits if self.bits is None else self.bits,
                step.group_size if self.group_size is None else self.group_size,
                step.sym if self.sym is None else self.sym)


class GridOverride(GridChange):
    """`{match: '*.down_proj', bits: 4}`: the Linears whose full module name matches the shell-style pattern take this
    grid instead of the step's."""

    match: str = Field(min_length=1, description="full module names or a shell-style pattern, as in `ignore`")

    @model_validator(mode="after")
    def _changes_something(self):
        if self.bits is None and self.group_size is None and self.sym is None:
            raise ValueError(f"override {self.match!r} changes nothing: give bits, group_size or sym")
        return self


class KeepSensitive(GridChange):
    """`keep: {fraction: 0.1, bits: 4}`: the budget form. The Linears the step's grid hurts most take this (higher)
    grid, ranked by a round-to-nearest probe over the step's calibration data: with `rank: loss` (default) by how
    much the model's next-token loss would drop were each kept on this grid rather than the step's (a second-order
    estimate from one forward and backward, compress.quantize.mixed.loss_probe); with `rank: output` by the relative
    output error ||(Q - W) X||² / ||W X||² on the step's grid over the Linear's calibration inputs X. Exactly one
    of: `count` Linears, a `fraction` of the step's Linears, every Linear whose score is `above` a threshold (nats
    of loss, or the relative error), or as many as fit in `extra_bytes` (a fraction of the weight bytes every Linear
    would take on the step's grid; with `rank: loss` filled by the loss saved per extra byte). Linears that read one
    input (q/k/v, gate/up) are kept or not together: serving engines fuse them into one Linear with one grid."""

    count: int | None = Field(None, ge=1, description="the N most sensitive Linears")
    fraction: float | None = Field(None, gt=0, lt=1, description="that fraction of the step's Linears, by count")
    above: float | None = Field(None, gt=0, description=(
        "every Linear whose score exceeds this: the loss it saves in nats (rank loss), its relative output error "
        "(rank output)"))
    extra_bytes: float | None = Field(None, gt=0, description=(
        "the most sensitive Linears that fit in this many more weight bytes than the step's grid alone, as a "
        "fraction of its bytes (0.12: at most 12 % more)"))
    rank: Literal["loss", "output"] = Field("loss", description=(
        "how Linears are ranked: loss (default) by the model's next-token loss increase that rounding each alone to "
        "the step's grid causes, less that of the kept grid, estimated from one forward and backward (the byte budget "
        "fills by that gain per extra byte); output by each Linear's own relative output error (the layers after it "
        "ignored)"))
    probe_samples: int = Field(8, ge=1, description=(
        "calibration sequences the loss probe reads (the first ones; its forward and backward cost grows with them)"))

    @model_validator(mode="after")
    def _one_budget(self):
        given = [key for key in ("count", "fraction", "above", "extra_bytes") if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one budget of count, fraction, above or extra_bytes (got "
                             f"{', '.join(given) or 'none'})")
        return self

    def budget(self) -> str:
        """What the budget keeps, for the step's description and record (the ranking named where it is not the
        default's)."""
        return self._budget() + (" by output error" if self.rank == "output" and self.above is None else "")

    def _budget(self) -> str:
        if self.count is not None:
            return f"the {self.count} most sensitive Linears"
        if self.fraction is not None:
            return f"the {self.fraction:.0%} most sensitive Linears"
        if self.above is not None:
            return f"Linears with {'loss gain' if self.rank == 'loss' else 'output error'} above {self.above:g}"
        return f"the most sensitive Linears within {self.extra_bytes:.0%} more weight bytes"


class PerLinearGrids(Strict):
    """Mixed precision inside one RTN or GPTQ step: `overrides` by name pattern, and (GPTQ, which reads calibration
    data) `keep`, a budget of the most sensitive Linears on a higher grid. Both live in the quantize step rather
    than in a step of their own because every Linear's grid must be known before the step's first solve (GPTQ
    calibrates each layer on the outputs of the quantized ones before it); the probe behind `keep` runs inside the
    step on the step's own calibration set, so a recipe needs no earlier quantize step to act on sensitivities. An
    explicit override wins over the budget: Linears it matches are not ranked."""

    overrides: tuple[GridOverride, ...] = Field((), description=(
        "per-pattern grids, e.g. [{match: '*.down_proj', bits: 4}]; a Linear may match one override only (or "
        "several that give it one grid)"))
    keep: KeepSensitive | None = Field(None, description=(
        "the most sensitive Linears on a higher grid: {fraction: 0.1, bits: 4} (or count, above, extra_bytes)"))

    @model_validator(mode="after")
    def _grids_compose(self):
        if not self.overrides and self.keep is None:
            return self
        if getattr(self, "grid", "int") != "int":
            raise ValueError(f"overrides and keep change integer grids; grid {self.grid} fixes bits, groups and "
                             f"symmetry: remove them, or use grid int")
        if self.keep is not None:
            bits, group, sym = self.keep.on(self)
            if (bits, group, sym) == (self.bits, self.group_size, self.sym):
                raise ValueError(f"keep's grid {_grid_name(bits, group, sym)} is the step's own: give it more bits "
                                 f"or a smaller group_size")
            if bits < self.bits:
                raise ValueError(f"keep's bits {bits} are fewer than the step's {self.bits}: the kept Linears take a "
                                 f"higher grid; to lower some Linears use overrides")
        if self.format == "gptq":
            grids = {o.on(self) for o in self.overrides} | ({self.keep.on(self)} if self.keep else set())
            if grids - {(self.bits, self.group_size, self.sym)}:
                raise ValueError("format gptq holds one grid per model; save mixed grids with format "
                                 "compressed-tensors (several config groups)")
        return self

    def mixed_summary(self) -> str:
        parts = [f"{o.match} {_grid_name(*o.on(self))}" for o in self.overrides]
        if self.keep is not None:
            parts.append(f"{self.keep.budget()} {_grid_name(*self.keep.on(self))}")
        return f" ({'; '.join(parts)})" if parts else ""


class HeadGrid(Strict):
    """`lm_head: {bits: 8}`: the output head on a symmetric integer grid of its own. Without a group_size, 8 bits take
    one scale per output row, the int8 grid the packed runtime has a kernel for (int8 in groups runs dequantized, the
    bf16 head in memory; on Qwen2.5-Coder-1.5B per row cost +0.05 % perplexity against groups of 128's +0.03 %,
    eval/results/bench_head_embed_qwen2.5-coder-1.5b_cpu.json), and 4 bits groups of 128 (one scale per row of 4-bit
    values loses too much, and the int4 kernel takes groups of 64-256)."""

    bits: int = Field(8, description="8 or 4")
    group_size: int = Field(-1, description="input (hidden) columns per scale; -1 = one scale per output row "
                                            "[default: -1 at 8 bits, 128 at 4 bits]")

    @model_validator(mode="before")
    @classmethod
    def _group_for_bits(cls, data):
        if cls is HeadGrid and isinstance(data, dict) and "group_size" not in data and data.get("bits") == 4:
            return {**data, "group_size": 128}
        return data

    @field_validator("bits")
    @classmethod
    def _bits(cls, value: int) -> int:
        if value not in (4, 8):
            raise ValueError(f"lm_head takes 8 or 4 bits, got {value}: use bits: 8 (near lossless) or bits: 4 with "
                             f"groups (group_size: 128), or leave lm_head out to keep the head float")
        return value

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int) -> int:
        if value != -1 and not 1 <= value <= MAX_WIDTH:
            raise ValueError(f"got {value}; allowed: 1 to {MAX_WIDTH} columns, or -1 for one scale per output row")
        return value

    def summary(self) -> str:
        return _grid_name(self.bits, self.group_size, True)


class EmbeddingGrid(HeadGrid):
    """`embeddings: {bits: 8}`: the input embeddings on a symmetric 8-bit grid, one scale per token row by default
    (or per `group_size` columns of it)."""

    group_size: int = Field(-1, description="hidden columns per scale; -1 (default) = one scale per token row")

    @field_validator("bits")
    @classmethod
    def _bits(cls, value: int) -> int:
        if value != 8:
            raise ValueError(f"embeddings take 8 bits only, got {value}: an embedding row is the residual stream's "
                             f"first value, with no calibration to make up its rounding (4 bits are not built); use "
                             f"bits: 8, or leave embeddings out to keep them float")
        return value


class HeadAndEmbeddings(Strict):
    """The output head and the input embeddings, which a weight-only step (RTN, GPTQ) leaves float unless asked:
    `lm_head: {bits: 8, group_size: 128}`, `embeddings: {bits: 8}`. Keys of their own rather than `overrides`:
    overrides match the decoder Linears the step quantizes, while the head and the embedding each need a decision the
    decoder does not (untying a tied head, the head's Hessian from the final norm, a lookup with no Hessian at all).
    A head tied to its embedding is untied and saved apart (compress.quantize.head_embed says why)."""

    lm_head: HeadGrid | None = Field(None, description="quantize the output head: {bits: 8} (one scale per row) or "
                                                        "{bits: 4, group_size: 128}")
    embeddings: EmbeddingGrid | None = Field(None, description="quantize the input embeddings: {bits: 8, "
                                                               "group_size: -1 (per token row) or a group}")

    @model_validator(mode="after")
    def _integer_layouts_only(self):
        if self.lm_head is None and self.embeddings is None:
            return self
        asked = " and ".join(k for k in ("lm_head", "embeddings") if getattr(self, k) is not None)
        if self.format == "gptq":
            raise ValueError(f"{asked}: format gptq holds the decoder's Linears on one grid; save with format "
                             f"compressed-tensors (several config groups), or remove {asked}")
        if getattr(self, "grid", "int") != "int":
            raise ValueError(f"{asked} take integer grids, which are not built beside grid {self.grid}: use grid int, "
                             f"or remove {asked}")
        return self

    def head_summary(self) -> str:
        parts = [f"lm_head {self.lm_head.summary()}" if self.lm_head else "",
                 f"embeddings {self.embeddings.summary()}" if self.embeddings else ""]
        return "".join(f", {part}" for part in parts if part)


class RTN(HeadAndEmbeddings, PerLinearGrids, FP4Grid, WeightOnlyConfig):
    """Round-to-nearest: `quantize: {method: rtn, bits: 4, group_size: 64, sym: true}`, or onto an FP4 grid:
    `{method: rtn, grid: nvfp4}`."""

    method: Literal["rtn"] = "rtn"

    @model_validator(mode="after")
    def _nvfp4_inputs_need_calibration(self):
        if self.grid == "nvfp4" and self.activations == "dynamic":
            raise ValueError("W4A4 NVFP4 scales each input by a per-tensor global scale measured on calibration data, "
                             "which rtn does not read: use method gptq (it calibrates), or grid mxfp4 (no global "
                             "scale)")
        return self

    @model_validator(mode="after")
    def _keep_needs_calibration(self):
        if self.keep is not None:
            raise ValueError("keep ranks Linears by their output error on calibration inputs, which rtn does not "
                             "read: use method gptq, or name the Linears with overrides")
        return self

    def describe(self) -> str:
        return f"rtn {self.grid_summary()}{self.mixed_summary()}{self.head_summary()}"


class GPTQSolver(Strict):
    """The GPTQ solver's own settings, apart from the grid: `gptq: {act_order: true, damp: 0.01}` inside AWQ."""

    act_order: bool = Field(True, description="visit columns by decreasing Hessian diagonal; groups stay in place")
    damp: float = Field(0.01, gt=0, le=1, description="fraction of the mean Hessian diagonal added to it")
    block_size: int = Field(128, ge=1, le=MAX_WIDTH, description="columns per lazy batch update")

    def describe(self) -> str:
        return f"gptq{' act-order' if self.act_order else ''}"


class GPTQ(HeadAndEmbeddings, PerLinearGrids, FP4Grid, WeightOnlyConfig, GPTQSolver):
    """GPTQ: `quantize: {method: gptq, bits: 4, group_size: 128, act_order: true, damp: 0.01, schedule: sequential,
    calibration: {dataset: wikitext2-valid, samples: 128, seq_len: 2048}, offload: false}`."""

    method: Literal["gptq"] = "gptq"
    schedule: Literal["sequential", "two_pass"] = Field(
        "sequential", description="sequential: inside a decoder layer each group of Linears is calibrated on the "
                                  "outputs of the already-quantized ones before it (the GPTQ reference's true "
                                  "sequential order); two_pass: every Hessian of a layer from its float weights, "
                                  "then one more pass for the next layer's inputs (fewer forwards, slightly worse)")
    calibration: CalibrationData | None = Field(None, description="default: the recipe's data.calibration")
    offload: bool = Field(False, description="keep weights on the CPU; one decoder layer at a time visits the GPU")
    batch_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description=(
        "tokens per calibration forward; default: the whole set in one forward when it fits in memory, else "
        "chunks of 16384. Only the summation order depends on it, never the algorithm"))

    def describe(self) -> str:
        schedule = "" if self.schedule == "sequential" else " two-pass"
        return (f"gptq {self.grid_summary()}{self.mixed_summary()}{self.head_summary()}"
                f"{' act-order' if self.act_order else ''}{schedule}{' offload' if self.offload else ''}")


class AWQ(WeightOnlyConfig):
    """Activation-aware weight quantization: `quantize: {method: awq, bits: 4, group_size: 64, calibration: {...}}`,
    rounded to the grid by RTN, or by GPTQ on the scaled weights with `gptq: {act_order: true}`."""

    method: Literal["awq"] = "awq"
    grid_points: int = Field(20, ge=1, le=1000, description="exponents tried for the scales: 0, 1/n, ..., (n-1)/n")
    duo_scaling: bool = Field(True, description="scales from activations and weights, x^a / w^(1-a) (AutoAWQ's "
                                                "default); false: x^a")
    loss: Literal["block", "linear"] = Field(
        "block", description="what judges a scale: block: the output of the block that reads the Linears (attention, "
                             "MLP), run on the calibration set for every candidate (the paper's choice); linear: the "
                             "Linears' own outputs, from XᵀX without running anything (about 10x faster on a CPU)")
    search_tokens: int | None = Field(16384, ge=1, description=(
        "calibration tokens (whole sequences, the first ones) on which the block loss runs the attention and the MLP "
        "for every candidate; the statistics, the clipping and the groups judged by one Linear use every token. The "
        "search costs about 20 block forwards per token it reads, so this bounds it: 16384 keeps AWQ within about 2x "
        "GPTQ's time at 128 x 2048 calibration tokens; None: every token"))
    clip: bool = Field(True, description="then search each group's clipping range (the paper's weight clipping)")
    first_token_weight: float = Field(1.0, ge=1, description=(
        "how much each sequence's first token counts in the search's output error and the clipping's XᵀX, against "
        "1 for every other token (the statistics x̄ count it once): the first position is where attention sinks and "
        "massive activations sit, and every later token reads its key and value"))
    propagate: Literal["float", "quantized"] = Field("float", description=(
        "what the next decoder layer is searched on: float: the float layers' outputs (AutoAWQ's and "
        "llm-compressor's choice); quantized: the outputs of the layers already scaled, clipped and rounded, as GPTQ "
        "does (with gptq: the rounding comes later, so float only)"))
    gptq: GPTQSolver | None = Field(None, description="round the scaled weights with GPTQ; None: round-to-nearest")
    calibration: CalibrationData | None = Field(None, description="default: the recipe's data.calibration")

    @model_validator(mode="after")
    def _propagate(self):
        if self.propagate == "quantized" and self.gptq is not None:
            raise ValueError("propagate: quantized needs the layers rounded as AWQ goes; with gptq: they are rounded "
                             "after every layer is scaled: use propagate: float (the default)")
        return self

    def describe(self) -> str:
        then = f" + {self.gptq.describe()}" if self.gptq else ""
        loss = " linear-loss" if self.loss == "linear" else ""
        propagate = " quantized-propagation" if self.propagate == "quantized" else ""
        first = f" first-token-weight {self.first_token_weight:g}" if self.first_token_weight != 1 else ""
        return f"awq {self.grid_summary()}{loss}{' clip' if self.clip else ''}{first}{propagate}{then}"


class FP8(Strict):
    """FP8: `quantize: {method: fp8}` (W8A8) or `{method: fp8, activations: none}` (FP8 weights only)."""

    method: Literal["fp8"] = "fp8"
    activations: Literal["dynamic", "none"] = Field("dynamic", description="dynamic: per-token FP8 at run time")

    def describe(self) -> str:
        return "fp8 W8A8 (e4m3, per-channel weights, dynamic per-token activations)" if self.activations == "dynamic" \
            else "fp8 W8A16 (e4m3, per-channel weights)"


class SmoothQuant(Strict):
    """SmoothQuant W8A8 int8: `quantize: {method: smoothquant, alpha: 0.5, calibration: {...}}`; int8 weights, one scale
    per output channel, rounded by RTN, or by GPTQ on the smoothed weights with `gptq: {act_order: true}`; activations
    int8 per token at run time. Its own method rather than an option of rtn/gptq: the grid is fixed (int8 per channel,
    symmetric, since the int8 GEMM takes nothing else), it needs calibration for the activation maxima even when the
    weights are rounded by RTN, and the GPTQ rounding is AWQ's `gptq:` block, so one recipe shape serves both."""

    method: Literal["smoothquant"] = "smoothquant"
    alpha: float | Literal["search"] = Field(0.5, description=(
        "migration strength in [0, 1]: inputs divided by s = max|x|^alpha / max|w|^(1-alpha) per input channel, "
        "weights multiplied by it (0: the weights' range moved into the activations, 1: the activations' range into "
        "the weights); search: per group of Linears, the alpha in 0, 0.1, ..., 1 whose W8A8 outputs are closest to "
        "the float ones on the calibration set"))
    gptq: GPTQSolver | None = Field(None, description="round the smoothed weights with GPTQ; None: round-to-nearest")
    ignore: tuple[str, ...] = Field((), description=(
        "Linears kept in full precision (weights and inputs) besides lm_head: full module names or shell-style "
        "patterns, e.g. '*.down_proj'"))
    calibration: CalibrationData | None = Field(None, description="default: the recipe's data.calibration")

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, value):
        if value != "search" and not 0 <= value <= 1:
            raise ValueError(f"alpha {value} is outside [0, 1], the migration strength's range (0.5: the paper's "
                             f"default; alpha: search picks one per group of Linears)")
        return value

    def describe(self) -> str:
        alpha = "alpha searched" if self.alpha == "search" else f"alpha {self.alpha:g}"
        then = self.gptq.describe() if self.gptq else "rtn"
        kept = f", {', '.join(self.ignore)} kept float" if self.ignore else ""
        return (f"smoothquant W8A8 int8 ({alpha}, {then} per-channel weights, dynamic per-token int8 "
                f"activations{kept})")


QAT_TRAINS = {
    "weights": "the float weights through a straight-through rounding, each group's scale from its min and max at "
               "every step",
    "scales": "each group's scale, the integer codes fixed (EfficientQAT's end-to-end step: one number per group "
              "trains, the memory-lean choice)",
    "weights_and_scales": "the float weights through a straight-through rounding and each group's scale (LSQ)",
}


class QAT(WeightOnlyConfig, TrainingBudget):
    """Quantization-aware training: `quantize: {method: qat, bits: 4, group_size: 64, train: scales, steps: 100,
    kd: {}}`. After a PTQ step (GPTQ, AWQ, RTN) on the same grid it starts from that step's weights and scales
    (quantization-aware recovery); on a float model, from round-to-nearest."""

    method: Literal["qat"] = "qat"
    train: Literal["weights", "scales", "weights_and_scales"] = Field(
        "weights", description="what trains: " + "; ".join(f"{k}: {v}" for k, v in QAT_TRAINS.items()))
    lr: float = Field(2e-5, gt=0, le=1, description="full-weight training: far below LoRA's rates")
    scale_space: Literal["linear", "log"] = Field(
        "linear", description="how learned scales train (train: scales or weights_and_scales): linear, each scale "
                              "itself; log, its logarithm, so that an Adam step moves every scale by about lr times "
                              "its size, whatever the model's scales are (a linear step moves it by about lr)")
    kd: KD | None = Field(None, description="distil from a teacher while training (default teacher: the model "
                                            "before quantization); None: plain LM loss")

    @model_validator(mode="after")
    def _log_space_needs_learned_scales(self):
        if self.scale_space == "log" and self.train == "weights":
            raise ValueError("scale_space: log trains the learned scales' logarithms, and train: weights learns no "
                             "scales (each group's scale follows its weights' range): use train: scales or "
                             "weights_and_scales, or leave scale_space out")
        return self

    def describe(self) -> str:
        teacher = f", {self.kd.describe()}" if self.kd else ""
        trains = {"weights": "", "scales": ", scales trained", "weights_and_scales": ", weights and scales trained"}
        space = " in log space" if self.scale_space == "log" else ""
        return f"QAT {self.grid_summary()}{trains[self.train]}{space}, {self.budget()}{teacher}"


QuantizeConfig = Annotated[Union[RTN, GPTQ, AWQ, FP8, SmoothQuant, QAT], Field(discriminator="method")]


class Dequantize(Strict):
    """Recipe: `- dequantize: {}`. Forget the quantization grid of a quantized model — a pre-quantized checkpoint
    (GPTQ, AWQ, compressed-tensors) or an earlier quantize step — keeping every weight's value: later steps see a
    float model (prune, LoRA recovery, distillation, another quantization)."""

    def describe(self) -> str:
        return "dequantize: the weights keep their values, the grid is dropped"

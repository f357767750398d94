"""Step specs: what each step kind and method is, for the recipe's order rules and the pipeline's dispatch.

A spec names its config class and its verb, and declares what the step needs (calibration token ids, training rows,
a teacher), whether it accepts a quantized input, and what it produces (a quantized or a pruned model, and in which
format it is saved). The recipe checks step order against the specs; the pipeline gives each verb what its spec
asks for. Nothing here imports torch: verbs are named as `module:function` and imported when a step runs. The base
step (00-base: the recipe's model loaded from its source) has a spec too, BASE, so the pipeline runs every step alike.

Adding a method: a config class (compress/config/), a function `verb(model, config, *, calibration=None,
train_data=None, teacher=None, seed=0, show_progress=True)` taking the inputs its spec declares, and an entry below."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Literal

from compress.config import AWQ, FP8, GPTQ, QAT, RTN, Dequantize, Distill, LoRARecovery, SmoothQuant, TaylorPrune
from compress.config.kv_cache import KVCache
from compress.config.rotate import Rotate
from compress.config.sources import Base


def _dense(config) -> str:
    return "dense"


def _config_format(config) -> str:
    return config.format


def _compressed_tensors(config) -> str:
    return "compressed-tensors"


@dataclass(frozen=True)
class StepSpec:
    kind: str  # the recipe key: prune, finetune, distill, quantize
    config: type  # its config class; `method` (when present) tells methods of one kind apart
    verb: str  # module:function, called as verb(model, config, **inputs, show_progress=...)
    calibrates: bool = False  # needs calibration token ids: `config.calibration` (resolved from data.calibration)
    trains: bool = False  # needs training rows: `config.data` cut at `config.seq_len`; gets the recipe's seed
    teacher: Literal["never", "optional", "always"] = "never"  # `config.kd.teacher`, loaded by the pipeline
    accepts_quantized: bool = False  # may its input already lie on a quantization grid?
    quantizes: bool = False  # its output lies on a quantization grid (and is saved compressed)
    dequantizes: bool = False  # its output is a float model, whatever its input
    prunes: bool = False  # its output has narrower layers than its input
    save_format: Callable = _dense  # config -> "dense" | "compressed-tensors" | "gptq"
    # module:function (model, config, **inputs) -> the config as it will run, where a setting is decided at run time
    # by the machine (e.g. GPTQ's chunking by free memory): recorded in step.json, not fingerprinted
    resolve_run: str | None = None
    # module:function (model, config) -> None: what can be checked on the input model's shapes before any work
    check: str | None = None
    # the step loads the recipe's model from its source (the base step): its verb is (source, dtype, device) ->
    # (model, tokenizer), its fingerprint hashes the source's weights, and the whole recipe is checked against it
    loads: bool = False
    # module:function (config) -> the step's summary in the report, where config.describe() does not say it all
    summary: str | None = None
    # calibrated on the weights it is given (a KV cache's scales): no later step may change them
    needs_final_weights: bool = False

    @property
    def method(self) -> str | None:
        field = self.config.model_fields.get("method")
        return field.default if field else None

    @property
    def name(self) -> str:
        return f"{self.kind} ({self.method})" if self.method else self.kind

    def load_verb(self) -> Callable:
        return _load(self.verb)

    def check_model(self, model, config) -> None:
        if self.check:
            _load(self.check)(model, config)

    def datasets_read(self, config) -> list[str]:
        """The named datasets (or data files) the verb reads: its calibration set and its training data."""
        return ([config.calibration.dataset] if self.calibrates else []) + (list(config.data) if self.trains else [])

    def describe(self, config) -> str:
        """The step's one-line summary for step.json and the report."""
        return _load(self.summary)(config) if self.summary else config.describe()

    def run_config(self, model, config, inputs: dict):
        """The config as the step will run it (itself, unless the spec resolves run-time settings)."""
        return _load(self.resolve_run)(model, config, **inputs) if self.resolve_run else config


def _load(name: str) -> Callable:
    module, function = name.split(":")
    return getattr(importlib.import_module(module), function)


_QUANTIZABLE = "compress.architectures:check_quantizable"
# and, on an FP4 grid, widths in whole groups; every override and the budget against the Linears
_MIXED_GRIDS = "compress.quantize.mixed:check_grids"
SPECS = (
    StepSpec("prune", TaylorPrune, "compress.prune:prune", calibrates=True, prunes=True,
             check="compress.prune:check_prunable"),
    StepSpec("finetune", LoRARecovery, "compress.finetune:finetune", trains=True),
    StepSpec("distill", Distill, "compress.distill:distill", trains=True, teacher="always"),
    StepSpec("quantize", RTN, "compress.quantize.rtn:quantize_rtn", quantizes=True, save_format=_config_format,
             check=_MIXED_GRIDS),
    StepSpec("quantize", GPTQ, "compress.quantize.gptq:quantize_gptq", calibrates=True, quantizes=True,
             save_format=_config_format, resolve_run="compress.quantize.gptq:resolve_run",
             check=_MIXED_GRIDS),
    StepSpec("quantize", AWQ, "compress.quantize.awq:quantize_awq", calibrates=True, quantizes=True,
             save_format=_config_format, check=_QUANTIZABLE),
    StepSpec("quantize", FP8, "compress.quantize.fp8:quantize_fp8", quantizes=True, save_format=_compressed_tensors,
             check=_QUANTIZABLE),
    StepSpec("quantize", SmoothQuant, "compress.quantize.smoothquant:quantize_smoothquant", calibrates=True,
             quantizes=True, save_format=_compressed_tensors, check="compress.quantize.smoothquant:check_smoothquant"),
    StepSpec("quantize", QAT, "compress.quantize.qat:quantize_qat", trains=True, teacher="optional", quantizes=True,
             accepts_quantized=True, save_format=_config_format, check=_QUANTIZABLE),
    StepSpec("dequantize", Dequantize, "compress.quantize.dequantize:dequantize", accepts_quantized=True,
             dequantizes=True),
    StepSpec("kv_cache", KVCache, "compress.quantize.kv_cache:quantize_kv_cache", calibrates=True,
             accepts_quantized=True, save_format=_compressed_tensors, check="compress.quantize.kv_cache:check_kv_cache",
             needs_final_weights=True),
    StepSpec("rotate", Rotate, "compress.rotate:rotate", check="compress.rotate:check_rotatable"),
)

# not a recipe step: the model every run starts from, step 00
BASE = StepSpec("base", Base, "compress.models:load_model", loads=True, summary="compress.quantized_load:describe_base")

KINDS: dict[str, tuple[StepSpec, ...]] = {}
for _spec in SPECS:
    KINDS[_spec.kind] = KINDS.get(_spec.kind, ()) + (_spec,)

_BY_CONFIG = {spec.config: spec for spec in (BASE, *SPECS)}


def spec_of(config) -> StepSpec:
    """The spec of a step config instance."""
    try:
        return _BY_CONFIG[type(config)]
    except KeyError:
        raise TypeError(f"{type(config).__name__} is not a step config; known: "
                        f"{', '.join(c.__name__ for c in _BY_CONFIG)}") from None


def teacher_name(config) -> str | None:
    """The teacher a step distils from, per its spec: `kd.teacher`, or None."""
    spec = spec_of(config)
    return None if spec.teacher == "never" or config.kd is None else config.kd.teacher

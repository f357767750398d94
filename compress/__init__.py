"""compress: prune, recover, quantize and evaluate causal LMs, one verb and one config class per technique.

The public API is imported lazily (PEP 562): `import compress` and the config classes load no torch, so
`compress validate` answers at once; the first use of a verb imports what it needs."""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {  # name -> module that defines it
    "AWQ": "compress.config", "FP8": "compress.config", "GPTQ": "compress.config", "GPTQSolver": "compress.config",
    "QAT": "compress.config", "RTN": "compress.config", "SmoothQuant": "compress.config",
    "KD": "compress.config", "LoRA": "compress.config", "Distill": "compress.config",
    "LoRARecovery": "compress.config", "TaylorPrune": "compress.config", "Perplexity": "compress.config",
    "ChoiceEval": "compress.config",
    "Recipe": "compress.recipe", "load_recipe": "compress.recipe",
    "save_model": "compress.checkpoint",
    "DistillationTrainer": "compress.distill", "distill": "compress.distill",
    "evaluate": "compress.evaluate", "perplexity": "compress.evaluate",
    "finetune": "compress.finetune",
    "load": "compress.models", "load_model": "compress.models",
    "run": "compress.pipeline",
    "prune": "compress.prune",
    "QATCallback": "compress.quantize", "quantize": "compress.quantize",
    "Dequantize": "compress.config", "dequantize": "compress.quantize.dequantize",
    "KVCache": "compress.config.kv_cache", "quantize_kv_cache": "compress.quantize.kv_cache",
    "Rotate": "compress.config", "rotate": "compress.rotate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'compress' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__():
    return sorted(list(globals()) + __all__)


class _Package(types.ModuleType):
    """Verbs named like their module (`compress.prune`, `quantize`, `finetune`, `distill`, `evaluate`): importing the
    module sets the package attribute to the module object, so these are looked up each time and give the verb."""

    def __getattribute__(self, name: str):
        if name in _VERB_MODULES:
            return getattr(importlib.import_module(f"compress.{name}"), name)
        return super().__getattribute__(name)


_VERB_MODULES = frozenset(name for name, module in _EXPORTS.items() if module == f"compress.{name}")


sys.modules[__name__].__class__ = _Package

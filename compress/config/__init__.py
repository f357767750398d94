"""Every config class of compress, in a layer that imports pydantic and nothing heavy: `compress validate` checks a
recipe without torch, and each algorithm module imports its config from here."""

from compress.config.base import Strict
from compress.config.data import DATASETS, CalibrationData, DataConfig, DatasetName, NamedDataset
from compress.config.distill import Distill
from compress.config.evals import TASKS, ChoiceEval, EvalConfig, Perplexity
from compress.config.finetune import LoRARecovery
from compress.config.hub import HubPush
from compress.config.prune import TaylorPrune
from compress.config.quantize import (
    AWQ,
    FP8,
    GPTQ,
    QAT,
    RTN,
    Dequantize,
    GPTQSolver,
    QuantizeConfig,
    SmoothQuant,
    WeightOnlyConfig,
)
from compress.config.rotate import Rotate
from compress.config.sources import ARCHITECTURES, REGISTRY, RandomInit
from compress.config.training import KD, LoRA, TrainingBudget

__all__ = ["ARCHITECTURES", "AWQ", "Dequantize", "DATASETS", "FP8", "GPTQ", "GPTQSolver", "KD", "QAT", "REGISTRY",
           "RTN", "TASKS", "CalibrationData", "ChoiceEval", "DataConfig", "DatasetName", "Distill", "EvalConfig",
           "HubPush", "LoRA", "LoRARecovery", "NamedDataset", "Perplexity", "QuantizeConfig", "RandomInit", "Rotate",
           "SmoothQuant", "Strict", "TaylorPrune", "TrainingBudget", "WeightOnlyConfig"]

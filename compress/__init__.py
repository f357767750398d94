"""compress: prune, recover, quantize and evaluate causal LMs, one verb and one config class per technique."""

__version__ = "0.1.0"

from compress.checkpoint import save_model  # noqa: E402
from compress.distill import Distill, DistillationTrainer, distill  # noqa: E402
from compress.evaluate import Perplexity, evaluate, perplexity  # noqa: E402
from compress.finetune import LoRARecovery, finetune  # noqa: E402
from compress.models import load, load_model  # noqa: E402
from compress.pipeline import run  # noqa: E402
from compress.prune import TaylorPrune, prune  # noqa: E402
from compress.quantize import FP8, GPTQ, QAT, RTN, QATCallback, quantize  # noqa: E402
from compress.recipe import Recipe, load_recipe  # noqa: E402
from compress.tasks import ChoiceEval  # noqa: E402

__all__ = ["FP8", "GPTQ", "QAT", "RTN", "ChoiceEval", "Distill", "DistillationTrainer", "LoRARecovery", "Perplexity", "QATCallback",
           "Recipe", "TaylorPrune", "distill", "evaluate", "finetune", "load", "load_model", "load_recipe",
           "perplexity", "prune", "quantize", "run", "save_model"]


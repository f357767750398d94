"""`quantize(model, config, ...)`: one verb, one config class per method (RTN, GPTQ, AWQ, FP8, SmoothQuant, QAT); each
method's own function is named in its step spec (compress.steps)."""

from __future__ import annotations

import torch

from compress.config.quantize import AWQ, FP8, GPTQ, QAT, RTN, SmoothQuant
from compress.errors import CompressError
from compress.steps import spec_of


def quantize(model: torch.nn.Module, config: RTN | GPTQ | AWQ | FP8 | SmoothQuant | QAT,
             calibration: torch.Tensor | None = None, *,
             train_data: torch.Tensor | list[dict] | None = None, teacher: torch.nn.Module | None = None,
             seed: int = 0, show_progress: bool = True) -> torch.nn.Module:
    """Quantize `model` in place and return it. GPTQ, AWQ and SmoothQuant need `calibration`, token ids
    [samples, seq_len] (`compress.data.calibration_batches`); QAT needs `train_data`, token windows [windows, seq_len]
    (`compress.data.training_windows`) or `compress.training.training_examples`, and distils from `teacher` when
    its config has a `kd` block; RTN and FP8 need no data."""
    spec = spec_of(config)
    if spec.kind != "quantize":
        raise TypeError(f"{type(config).__name__} is a {spec.kind} config; quantize takes RTN, GPTQ, AWQ, FP8, "
                        f"SmoothQuant or QAT")
    spec.check_model(model, config)  # the family, before any work
    inputs: dict = {}
    if spec.calibrates:
        if calibration is None:
            raise CompressError(f"{spec.name} needs calibration token ids [samples, seq_len]: "
                                f"compress.data.calibration_batches(tokenizer, 'wikitext2-valid', 128, 512)")
        inputs["calibration"] = calibration
    if spec.trains:
        if train_data is None:
            raise CompressError(f"{spec.name} needs train_data: token ids [windows, seq_len] from "
                                f"compress.data.training_windows(tokenizer, 'wikitext2-valid', 256)")
        inputs.update(train_data=train_data, seed=seed)
    if spec.teacher != "never":
        if teacher is not None and config.kd is None:
            raise CompressError(f"a teacher was given but {spec.name} has no kd block, so it would train on the plain "
                                f"LM loss; pass {type(config).__name__}(..., kd=compress.KD(...)) to distil from it")
        inputs["teacher"] = teacher
    return spec.load_verb()(model, config, **inputs, show_progress=show_progress)


def __getattr__(name: str):  # the Trainer callback imports transformers' Trainer: only when asked for
    if name == "QATCallback":
        from compress.quantize.qat import QATCallback

        return QATCallback
    raise AttributeError(f"module 'compress.quantize' has no attribute {name!r}")


__all__ = ["AWQ", "FP8", "GPTQ", "QAT", "QATCallback", "RTN", "SmoothQuant", "quantize"]

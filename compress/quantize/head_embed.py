"""The output head and the input embeddings on integer grids, when a weight-only step (RTN, GPTQ) asks for them:
`lm_head: {bits: 8, group_size: 128}` (or 4 bits in groups), `embeddings: {bits: 8}`.

The head is a Linear [vocab, hidden]: RTN rounds it like a decoder Linear; GPTQ solves it against the Hessian of its
input, the final norm's output over the calibration set through the already quantized decoder (the step's last solve).
The embedding is a lookup table [vocab, hidden]: each token reads one row, so there is no Hessian to solve against and
both methods round it to nearest — first, so that GPTQ calibrates the decoder on what the quantized embedding feeds it.

Both are saved like the Linears, as compressed-tensors pack-quantized modules targeted by name. compressed-tensors
quantizes nn.Embedding as it does nn.Linear (apply_quantization_config and its forward wrapper take either, and its
compressors list both as compressible), so stock transformers decompresses a quantized embedding on load.

A head tied to its embedding (SmolLM2, most small models) is untied when either is quantized: the head gets its own
copy of the shared tensor, then its own grid. Quantizing the shared tensor once would put both on one grid, where the
head wants GPTQ's rounding against its Hessian and groups, and the lookup a plain rounding; and a tied compressed
checkpoint would rest on how each loader ties a module whose weight is replaced by packed tensors. The cost of
untying: the head is saved apart, at its grid's bytes (float when only the embeddings are quantized); the step warns
with the figure and records it in step.json (`untied_head_bytes`)."""

from __future__ import annotations

import warnings

import torch
from compressed_tensors.quantization import QuantizationArgs

from compress import distributed
from compress.errors import StepConfigError
from compress.estimate import linear_bytes
from compress.modules import QUANT_ATTR, WeightQuant
from compress.quantize.grid import fake_quantize, minmax_qparams, weight_args

UNTIED_ATTR = "untied_head_bytes"  # on the model after untying: the head's saved bytes, for step.json


def _step(config) -> str:
    return f"quantize ({config.method})"


def module_names(model: torch.nn.Module) -> tuple[str, str]:
    """Full names of the output head and the input embedding."""
    names = {id(module): name for name, module in model.named_modules()}
    return names.get(id(model.get_output_embeddings()), "lm_head"), names[id(model.get_input_embeddings())]


def _fitting_groups(width: int) -> str:
    fits = [g for g in (32, 64, 128, 256) if width % g == 0]
    return f"use {' or '.join(map(str, fits))}, or -1" if fits else "use -1"


def check_head_and_embeddings(model: torch.nn.Module, config) -> None:
    """Before any work: the head is a Linear and the embedding an Embedding whose widths the asked groups divide, and
    GPTQ finds the final norm whose output is the head's input."""
    head_grid, embedding_grid = getattr(config, "lm_head", None), getattr(config, "embeddings", None)
    if head_grid is not None:
        head = model.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear):
            raise StepConfigError(f"{_step(config)} lm_head: the model's output head is {type(head).__name__}, not a "
                                  f"Linear this step can quantize; remove lm_head", ("lm_head",))
        width = head.in_features
        if head_grid.group_size != -1 and width % head_grid.group_size:
            raise StepConfigError(f"{_step(config)} lm_head: group_size {head_grid.group_size} does not divide the "
                                  f"head's input width {width}; {_fitting_groups(width)} for one scale per row",
                                  ("lm_head", "group_size"))
        if config.method == "gptq" and not isinstance(getattr(model.get_decoder(), "norm", None), torch.nn.Module):
            raise StepConfigError(f"{_step(config)} lm_head: GPTQ solves the head against its input, the decoder's "
                                  f"final norm (model.norm), which {type(model).__name__} does not have; use method "
                                  f"rtn for the head, or remove lm_head", ("lm_head",))
    if embedding_grid is not None:
        embedding = model.get_input_embeddings()
        if not isinstance(embedding, torch.nn.Embedding):
            raise StepConfigError(f"{_step(config)} embeddings: the model's input embedding is "
                                  f"{type(embedding).__name__}, not an Embedding this step can quantize; remove "
                                  f"embeddings", ("embeddings",))
        width = embedding.embedding_dim
        if embedding_grid.group_size != -1 and width % embedding_grid.group_size:
            raise StepConfigError(f"{_step(config)} embeddings: group_size {embedding_grid.group_size} does not "
                                  f"divide the embedding width {width}; {_fitting_groups(width)} for one scale per "
                                  f"token row", ("embeddings", "group_size"))


def head_args(config, actorder: str | None = None) -> QuantizationArgs:
    return weight_args(config.lm_head.bits, config.lm_head.group_size, True, actorder)


def _untie(model: torch.nn.Module, config) -> None:
    """Give a head tied to the embedding its own copy of the tensor, and say what that costs on disk."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.weight.data_ptr() != embedding.weight.data_ptr():
        return
    head.weight = torch.nn.Parameter(embedding.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    model.config.tie_word_embeddings = False
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    text.tie_word_embeddings = False
    element = head.weight.element_size()
    if config.lm_head is not None:
        grid = config.lm_head
        cost = linear_bytes(head.out_features, head.in_features, grid.bits, grid.group_size, True, element)
        saved = f"its own copy on {grid.summary()}"
    else:
        cost = head.weight.numel() * element
        saved = "its own float copy (with lm_head: {bits: 8} too, that copy is stored at 8 bits)"
    head_name, embedding_name = module_names(model)
    if distributed.is_main():
        warnings.warn(f"{_step(config)}: {head_name} was tied to {embedding_name}; quantizing "
                      f"{'the head' if config.lm_head is not None else 'the embeddings'} unties them, and the "
                      f"checkpoint holds the head apart as {saved}: {cost / 2**20:,.1f} MiB more than the tied "
                      f"model's one tensor", stacklevel=3)
    setattr(model, UNTIED_ATTR, cost)


def round_module(module: torch.nn.Module, args: QuantizationArgs) -> None:
    """Round a Linear's or an Embedding's weight [rows, columns] to nearest on `args`, recording the grid."""
    scale, zero = minmax_qparams(module.weight, args)
    module.weight.copy_(fake_quantize(module.weight, scale, zero, args))
    setattr(module, QUANT_ATTR, WeightQuant(args, scale, zero))


@torch.no_grad()
def prepare(model: torch.nn.Module, config) -> None:
    """What comes before the decoder's rounding: untie a tied head, and round the embedding (both methods)."""
    if getattr(config, "lm_head", None) is None and getattr(config, "embeddings", None) is None:
        return
    check_head_and_embeddings(model, config)
    _untie(model, config)
    if config.embeddings is not None:
        grid = config.embeddings
        round_module(model.get_input_embeddings(), weight_args(grid.bits, grid.group_size, True))


@torch.no_grad()
def round_head(model: torch.nn.Module, config) -> None:
    """RTN's head: rounded to nearest on its grid."""
    if getattr(config, "lm_head", None) is not None:
        round_module(model.get_output_embeddings(), head_args(config))


def untied_record(model: torch.nn.Module) -> dict:
    """For step.json: what untying the head cost on disk, once (a later step's record does not repeat it)."""
    cost = model.__dict__.pop(UNTIED_ATTR, None)
    return {} if cost is None else {UNTIED_ATTR: cost}

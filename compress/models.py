"""Loading a model from any source (compress.sources): a registry name, a hub id, a local HF folder (including our
step folders), a .gguf file, or a named architecture with random weights (`{config: llama2-7b, init: random}`: a dry
run at full size). Every source comes back as a plain transformers model that `save_pretrained` can write.

The pieces: compress.sources (where a source is), compress.gguf_cache (GGUF files as cached folders),
compress.hub_download (hub checkpoints as folders), compress.quantized_load (quantized, pruned and multimodal
checkpoints, the packed runtime) and compress.identity (what a source's weights are); their public names are
re-exported here."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from compress.config.sources import ARCHITECTURES, REGISTRY, RandomInit, check_source_name
from compress.errors import CompressError
from compress.gguf_cache import gguf_as_folder, strip_gguf_quantizer
from compress.hub_download import hub_checkpoint_as_folder
from compress.identity import source_identity
from compress.load_errors import load_error
from compress.modules import grids_to_weights
from compress.quantized_load import (
    build_architecture,
    load_packed_folder,
    load_state,
    needs_own_loader,
    pack_loaded,
    quantized_input,
)
from compress.sources import ModelSource, load_tokenizer, public_name, read_config, resolve_source

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

__all__ = ["ARCHITECTURES", "DTYPES", "REGISTRY", "ModelSource", "RandomInit", "architecture_config",
           "build_architecture", "check_source_name", "gguf_as_folder", "load", "load_model", "load_tokenizer",
           "public_name", "quantized_input", "random_init_config", "resolve_source", "source_identity"]


def architecture_config(name: str):
    """The transformers config of a named architecture (or of a folder's config.json)."""
    if name in ARCHITECTURES:
        fields = dict(ARCHITECTURES[name].config)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    return AutoConfig.from_pretrained(name)


def random_init_config(spec: RandomInit):
    """(config, tokenizer) of a random-weights source: the architecture with the tokenizer's vocabulary."""
    source = resolve_source(spec.tokenizer)
    tokenizer = load_tokenizer(gguf_as_folder(source) if source.kind == "gguf" else source)
    config = architecture_config(spec.config)
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config, tokenizer


def _random_model(spec: RandomInit, dtype: str, device: str):
    config, tokenizer = random_init_config(spec)
    torch.manual_seed(spec.seed)
    with torch.device(device):  # drawn where it will run: 7B random weights in seconds on a GPU
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    return model.eval(), tokenizer


def load_model(source: str | RandomInit | ModelSource, dtype: str = "float32", device: str = "cpu"):
    """Load (model, tokenizer) from any source as plain, saveable transformers objects. Any failure is one
    CompressError that says what went wrong (the network is named only when the Hub or the network failed)."""
    if not isinstance(source, ModelSource):
        source = resolve_source(source)
    try:
        return _load_model(source, dtype, device)
    except CompressError:
        raise
    except Exception as error:  # noqa: BLE001 -- a bad file, an unknown architecture, no memory: one line each
        raise load_error(source, error) from error


def _load_model(source: ModelSource, dtype: str, device: str):
    if source.random:
        return _random_model(source.random, dtype, device)
    if source.kind == "gguf":
        source = gguf_as_folder(source)
    if source.kind == "hub":
        source = hub_checkpoint_as_folder(source, needs_own_loader)
    if source.kind == "dir":
        config = read_config(Path(source.location) / "config.json", source)
        if needs_own_loader(config):
            model = load_state(Path(source.location), config, DTYPES[dtype]).to(device).eval()
            grids_to_weights(model)  # the restored grids follow the weights to the device
            return model, load_tokenizer(source)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(source.location, dtype=DTYPES[dtype], **kwargs)
    if source.gguf_file:
        strip_gguf_quantizer(model)
    tokenizer = load_tokenizer(source)
    return model.to(device).eval(), tokenizer


RUNTIMES = ("dequantized", "packed")


def load(path: str | Path, dtype: str = "float32", device: str = "cpu", runtime: str = "dequantized"):
    """Load a step folder (or any model source) back: `model, tokenizer = compress.load("runs/x/01-quantize")`.

    runtime="dequantized": quantized weights as ordinary tensors on their grid (every verb works on the model; as
    much memory as a float model). runtime="packed": quantized Linears kept packed and run with low-bit kernels
    (compress.quantize.packed; inference only); settings without a kernel stay dequantized, with a warning."""
    if runtime not in RUNTIMES:
        raise CompressError(f"unknown runtime '{runtime}'; allowed: {', '.join(RUNTIMES)}")
    if runtime == "packed":
        source = resolve_source(str(path))
        if source.kind == "dir" and dtype in DTYPES:
            model = load_packed_folder(Path(source.location), DTYPES[dtype], device)
            if model is not None:  # built packed from the checkpoint: never dense
                return model, load_tokenizer(source)
        model, tokenizer = load_model(str(path), dtype=dtype, device=device)
        pack_loaded(model)
        return model, tokenizer
    return load_model(str(path), dtype=dtype, device=device)


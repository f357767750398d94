"""The model families compress knows, found by `config.model_type`, and what each step can do with them.

Each family names the coupled groups the algorithms work on: the attention projections (separate q/k/v/o, or Phi-3's
fused `qkv_proj`), per-head q/k norms (Qwen3, Gemma 3: an RMSNorm over head_dim, shared by every head, so removing a
head leaves them as they are), the MLP (gate/up/down, or a fused `gate_up_proj`), and Mixture-of-Experts blocks (a
router and, in transformers 5, the experts as fused 3-D parameters — `gate_up_proj` [E, 2I, H], `down_proj`
[E, H, I] — that no `nn.Linear` hook sees; quantization turns them into per-expert Linears: compress.moe).
Whatever else a family has that depends on neither head nor channel counts (Gemma's pre/post feed-forward norms
over the hidden size, scaled embeddings, logit soft-capping, sliding-window layers; Qwen2's q/k/v biases, sliced
with their rows) needs nothing from the algorithms, nor from the evaluations: perplexity and the choice tasks score
through the model's own forward, final logit soft-capping or scaling included (tests/test_own_forward.py checks
every family here).

An unknown family stops before any work (prune, every quantize method, `compress estimate`) with the list of the
known ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.errors import CompressError


@dataclass(frozen=True)
class Family:
    name: str
    attention: str  # "q/k/v/o" or "qkv/o" (fused)
    mlp: str  # "gate/up/down", "gate_up/down" (fused) or "experts" (MoE)
    head_norms: bool = False  # q_norm / k_norm over head_dim
    experts_field: str = ""  # MoE: the config fields of the expert count and each expert's width
    expert_width_field: str = ""
    shared_expert_width_field: str = ""  # a dense MLP beside the routed experts (Qwen2-MoE), pruned like an MLP
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # per-expert Linears (checkpoints)
    # (in checkpoint files, in transformers 5 modules): transformers renames on load and back on save
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    # the layer norms compute x̂·weight, so AWQ's scales fold into their weight (Gemma's compute x̂·(1 + weight))
    norms_fold: bool = True

    @property
    def fused_qkv(self) -> bool:
        """q, k and v are one Linear, `self_attn.qkv_proj` (rows q | k | v)."""
        return self.attention == "qkv/o"

    @property
    def fused_gate_up(self) -> bool:
        """The MLP's gate and up are one Linear, `mlp.gate_up_proj` (rows gate | up)."""
        return self.mlp == "gate_up/down"

    @property
    def moe(self) -> bool:
        """The MLP is a router `mlp.gate` and experts `mlp.experts` (fused 3-D parameters, or compress.moe's
        Linears)."""
        return self.mlp == "experts"

    @property
    def same_input_linears(self) -> tuple[tuple[str, ...], ...]:
        """Sibling Linears (by their names in one parent module) that read the same input where the family keeps them
        separate: q/k/v; gate/up of a dense MLP, of a shared expert, and of each expert once compress.moe made them
        Linears (named as the family's checkpoints name them)."""
        groups = [] if self.fused_qkv else [("q_proj", "k_proj", "v_proj")]
        if self.mlp == "gate/up/down" or self.shared_expert_width_field:
            groups.append(("gate_proj", "up_proj"))
        if self.moe:
            groups.append(self.expert_names[:2])
        return tuple(dict.fromkeys(groups))


FAMILIES: dict[str, Family] = {
    "llama": Family("Llama 2 / 3.x, SmolLM2", "q/k/v/o", "gate/up/down"),
    "mistral": Family("Mistral", "q/k/v/o", "gate/up/down"),
    "qwen2": Family("Qwen2 / 2.5", "q/k/v/o", "gate/up/down"),
    "qwen3": Family("Qwen3", "q/k/v/o", "gate/up/down", head_norms=True),
    "gemma": Family("Gemma", "q/k/v/o", "gate/up/down", norms_fold=False),
    "gemma2": Family("Gemma 2", "q/k/v/o", "gate/up/down", norms_fold=False),
    "gemma3_text": Family("Gemma 3 (text)", "q/k/v/o", "gate/up/down", head_norms=True, norms_fold=False),
    "phi3": Family("Phi-3 / Phi-4", "qkv/o", "gate_up/down"),
    "mixtral": Family("Mixtral", "q/k/v/o", "experts", experts_field="num_local_experts",
                      expert_width_field="intermediate_size", expert_names=("w1", "w3", "w2"),
                      checkpoint_renames=((".block_sparse_moe.", ".mlp."),)),
    "qwen2_moe": Family("Qwen2-MoE", "q/k/v/o", "experts", experts_field="num_experts",
                        expert_width_field="moe_intermediate_size",
                        shared_expert_width_field="shared_expert_intermediate_size"),
    "qwen3_moe": Family("Qwen3-MoE", "q/k/v/o", "experts", head_norms=True, experts_field="num_experts",
                        expert_width_field="moe_intermediate_size"),
}


# Multimodal checkpoints whose language model compress loads alone (the vision tower is not loaded; steps save
# text-only checkpoints of the language model's family): model_type -> the prefixes of the language model's keys in
# their files (transformers 5 saves Gemma 3 with the first, its modules are named with the second).
LANGUAGE_MODEL_KEYS = {"gemma3": ("language_model.model.", "model.language_model.")}


def model_type(model_or_config) -> str:
    """config.model_type of a model, a config, or a config.json read as a dict."""
    if isinstance(model_or_config, dict):
        return model_or_config.get("model_type", "")
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None) or type(model_or_config).__name__


def family(model_or_config) -> Family:
    """The family of a model (or config); an unknown one is an error that lists the known ones."""
    kind = model_type(model_or_config)
    if kind not in FAMILIES:
        config = getattr(model_or_config, "config", model_or_config)
        text = (config.get("text_config") if isinstance(config, dict) else getattr(config, "text_config", None)) or {}
        text_kind = model_type(text)
        hint = ""
        if kind in LANGUAGE_MODEL_KEYS:
            hint = (f"; it is a multimodal checkpoint whose language model is '{text_kind}': load its folder through "
                    f"compress (`model: FOLDER`, compress.load_model), which takes the language model alone")
        elif text_kind in FAMILIES:
            hint = (f"; it is a multimodal checkpoint whose language model is '{text_kind}', which compress knows, "
                    f"but compress works on text-only checkpoints: start from the text-only release of the model, "
                    f"or save its language model alone")
        raise CompressError(f"compress knows the model families {', '.join(FAMILIES)} (config.model_type); this "
                            f"model is '{kind}'{hint}")
    return FAMILIES[kind]


def known_family(model_or_config) -> Family | None:
    """The family of a model (or config), or None for a family the table does not know."""
    return FAMILIES.get(model_type(model_or_config))


def checkpoint_name(model_or_config, name: str) -> str:
    """A module name as the family's checkpoint files spell it (transformers' save renames it so)."""
    known = known_family(model_or_config)
    for in_files, in_modules in known.checkpoint_renames if known else ():
        name = name.replace(in_modules, in_files)
    return name


def module_name(model_or_config, name: str) -> str:
    """A checkpoint file's key as transformers 5's modules spell it."""
    known = known_family(model_or_config)
    for in_files, in_modules in known.checkpoint_renames if known else ():
        name = name.replace(in_files, in_modules)
    return name


def check_quantizable(model: torch.nn.Module, config=None) -> None:
    """The quantize steps' shape check (compress.steps): the family must be a known one."""
    family(model)

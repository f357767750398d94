"""FP8 KV cache: every attention layer's keys (after RoPE) and values rounded onto the e4m3 grid with static scales as
they are written to the cache, the scales calibrated on the calibration set (amax / 448, per layer, or per KV head
of each layer). Saved as compressed-tensors' `kv_cache_scheme` with each attention module's `k_scale` and `v_scale`
(`model.layers.N.self_attn.k_scale`), the tensors vLLM loads into its FP8 cache.

At run time a forward pre-hook on each attention module hands it, in place of its cache, a stand-in whose `update`
rounds the new keys and values and then stores them in the real cache: the layer's attention (eager, sdpa or any
other: the rounding happens before it) reads the rounded cache, its current tokens included, as a serving engine's
FP8 cache does. With no cache (use_cache=False: perplexity, choice scoring) the stand-in rounds what the attention
reads, so the evals measure the cache's cost. The values are kept in the compute dtype (simulated), so memory here is
a 16-bit cache's; `compress estimate` and `compress bench` count the bytes an FP8 cache takes."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from compressed_tensors.quantization import QuantizationArgs
from rich.progress import track

from compress.architectures import family
from compress.config.kv_cache import KVCache
from compress.errors import CompressError
from compress.modules import decoder_layers
from compress.quantize.fp8_runtime import E4M3, E4M3_MAX

KV_ATTR = "kv_cache_quant"  # on each attention module that runs a quantized cache: its KVQuant
_HOOK_ATTR = "_kv_cache_hook"
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")  # transformers' names for an attention's cache
STRATEGIES = {"per_tensor": "tensor", "per_head": "attn_head"}  # compressed-tensors' names
CALIBRATION_BATCH = 8  # sequences per calibration forward


def kv_args(scales: str) -> QuantizationArgs:
    """The kv_cache_scheme compressed-tensors and vLLM read: FP8 e4m3, symmetric, static scales."""
    return QuantizationArgs(num_bits=8, type="float", symmetric=True, dynamic=False, strategy=STRATEGIES[scales])


@dataclass
class KVQuant:
    """One attention layer's quantized cache: its scheme and scales ([1] per tensor, [kv_heads, 1, 1] per head, in the
    dtype they are saved in, so rounding uses exactly the saved values)."""

    args: QuantizationArgs
    k_scale: torch.Tensor
    v_scale: torch.Tensor
    keys_centred: bool = False  # its k_proj bias lost the keys' offset before calibration (centre_keys)

    @property
    def scales(self) -> str:
        return "per_head" if self.args.strategy == "attn_head" else "per_tensor"


def round_to_cache(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [batch, kv_heads, tokens, head_dim] rounded onto the e4m3 grid of `scale` (values beyond the calibrated
    range saturate at ±448 × scale, as an FP8 cache stores them)."""
    scale = scale.to(device=x.device, dtype=torch.float32)
    return ((x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float() * scale).to(x.dtype)


class _CacheStandIn:
    """What the attention module sees as its cache for one call: `update` hands the new keys and values to `on_update`
    (rounding or observing them), then to the real cache when there is one; anything else is the real cache's."""

    def __init__(self, cache, on_update):
        self._cache, self._on_update = cache, on_update

    def update(self, key_states, value_states, *args, **kwargs):
        key_states, value_states = self._on_update(key_states, value_states)
        if self._cache is None:
            return key_states, value_states
        return self._cache.update(key_states, value_states, *args, **kwargs)

    def __getattr__(self, name):
        cache = self.__dict__.get("_cache")
        if cache is None:
            raise AttributeError(name)
        return getattr(cache, name)


def _cache_argument(attention: torch.nn.Module) -> tuple[str, int] | None:
    """(name, position) of the attention forward's cache argument, or None where it takes no cache."""
    names = list(inspect.signature(type(attention).forward).parameters)[1:]  # without self
    found = next((name for name in CACHE_ARGUMENTS if name in names), None)
    return None if found is None else (found, names.index(found))


def _swap_cache_hook(attention: torch.nn.Module, on_update) -> torch.utils.hooks.RemovableHandle:
    """Register a forward pre-hook that puts a stand-in (calling on_update(attention, k, v)) in place of the
    attention's cache argument (found once here: the hook runs on every call, and compiles without a lookup)."""
    name, position = _cache_argument(attention)

    def hook(module, args, kwargs):
        if len(args) > position:
            args = (*args[:position], _CacheStandIn(args[position], lambda k, v: on_update(module, k, v)),
                    *args[position + 1:])
        else:
            kwargs[name] = _CacheStandIn(kwargs.get(name), lambda k, v: on_update(module, k, v))
        return args, kwargs

    return attention.register_forward_pre_hook(hook, with_kwargs=True)


def _round_kv(attention, key_states, value_states):
    quant: KVQuant = getattr(attention, KV_ATTR)
    return round_to_cache(key_states, quant.k_scale), round_to_cache(value_states, quant.v_scale)


def attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every decoder layer's self-attention."""
    prefix = next(name for name, module in model.named_modules() if module is decoder_layers(model))
    return [(f"{prefix}.{index}.self_attn", layer.self_attn) for index, layer in enumerate(decoder_layers(model))]


def kv_heads(attention: torch.nn.Module, config) -> int:
    """KV heads of one layer (a pruned layer may have fewer than the config says; Phi-3's fused qkv: the config)."""
    if hasattr(attention, "k_proj"):
        return attention.k_proj.out_features // attention.head_dim
    return config.num_key_value_heads


def check_kv_cache(model: torch.nn.Module, config: KVCache | None = None) -> None:
    """Before any work: the runtime can quantize this model's cache only where every decoder layer has a self_attn
    whose forward takes transformers' cache argument and knows its head size."""
    family(model)  # an unknown family names the known ones
    try:
        modules = attention_modules(model)
    except (AttributeError, StopIteration):
        modules = []
    bad = [name for name, attention in modules
           if _cache_argument(attention) is None or not hasattr(attention, "head_dim")]
    if not modules or bad:
        where = f"{bad[0]} ({type(dict(modules)[bad[0]]).__name__})" if bad else f"{type(model).__name__}"
        raise CompressError(f"a quantized KV cache needs each decoder layer's self_attn to take transformers' cache "
                            f"argument ({' / '.join(CACHE_ARGUMENTS)}) and to know its head_dim; {where} does not, "
                            f"so its keys and values cannot be rounded as they are cached: remove the kv_cache step "
                            f"for this model")


def install(attention: torch.nn.Module, quant: KVQuant, device: torch.device) -> None:
    """Run this attention module with a quantized cache (replacing one it already has); the scales live on `device`,
    where the layer runs."""
    remove(attention)
    quant = KVQuant(quant.args, quant.k_scale.to(device), quant.v_scale.to(device), quant.keys_centred)
    setattr(attention, KV_ATTR, quant)
    setattr(attention, _HOOK_ATTR, _swap_cache_hook(attention, _round_kv))


def remove(attention: torch.nn.Module) -> None:
    """Back to a float cache."""
    handle = getattr(attention, _HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
        delattr(attention, _HOOK_ATTR)
    if hasattr(attention, KV_ATTR):
        delattr(attention, KV_ATTR)


def kv_quantized(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, KVQuant]]:
    """(name, attention module, KVQuant) of every attention module running a quantized cache."""
    return [(name, module, getattr(module, KV_ATTR)) for name, module in model.named_modules()
            if getattr(module, KV_ATTR, None) is not None]


def kv_cache_precision(model: torch.nn.Module) -> str:
    """The cache's precision in a few words, for step.json and the report: "fp8 e4m3 per-tensor" or the dtype."""
    quantized = kv_quantized(model)
    if quantized:
        return f"fp8 e4m3 {quantized[0][2].scales.replace('_', '-')}"
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def centred_key_layers(model: torch.nn.Module) -> dict:
    """For step.json: the layers whose k_proj bias `centre_keys` changed, where any did."""
    layers = [index for index, (_, _, quant) in enumerate(kv_quantized(model)) if quant.keys_centred]
    return {"kv_cache_keys_centred_layers": layers} if layers else {}


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes the cache holds per token: keys and values of every layer, 1 byte a value in FP8, else the dtype's."""
    element = 1 if kv_quantized(model) else next(model.parameters()).element_size()
    modules = attention_modules(model)
    return sum(2 * kv_heads(attention, model.config) * attention.head_dim for _, attention in modules) * element


# A RoPE pair counts as still where it turns less than this (radians) over the model's longest context: there a
# constant taken out of the keys changes each attention score by at most about this fraction of its product with q.
STILL_PAIR_RADIANS = 0.5


def _rotary_frequencies(model: torch.nn.Module) -> torch.Tensor | None:
    """The model's RoPE frequencies per pair of key channels (its rotary module's inv_freq, scaling included)."""
    return next((module.inv_freq for name, module in model.named_modules()
                 if name.endswith("rotary_emb") and isinstance(getattr(module, "inv_freq", None), torch.Tensor)), None)


def _calibration_pass(model: torch.nn.Module, calibration: torch.Tensor, hooks: list, description: str,
                      show_progress: bool) -> None:
    """Every calibration batch through the model (no cache) for the hooks to observe; the hooks removed after, also
    on an error."""
    device = next(model.parameters()).device
    try:
        for batch in track(calibration.split(CALIBRATION_BATCH), description=description, disable=not show_progress,
                           transient=True):
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def centre_keys(model: torch.nn.Module, calibration: torch.Tensor, show_progress: bool = False) -> list[int]:
    """Where k_proj has a bias, subtract from it each layer's mean key (before RoPE, over the calibration tokens) on
    the pairs of channels that RoPE barely turns over the model's context (STILL_PAIR_RADIANS), and return the layers
    changed. Why: a large k_proj bias (Qwen2's first layers) makes a layer's keys one big constant plus a small
    variation; e4m3 keeps 3 mantissa bits relative to the constant and rounds the variation away (measured on
    Qwen2.5-Coder-1.5B in docs/quantization.md). Attention is unchanged up to that turn: a constant c in every key adds
    q·c to all of a query's scores, which its softmax drops."""
    frequencies = _rotary_frequencies(model)
    modules = [(index, attention) for index, (_, attention) in enumerate(attention_modules(model))
               if isinstance(getattr(attention, "k_proj", None), torch.nn.Linear)
               and attention.k_proj.bias is not None]
    if frequencies is None or not modules:
        return []
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None) or 32768
    still = frequencies.float().cpu() * context < STILL_PAIR_RADIANS
    sums = {index: torch.zeros(attention.k_proj.out_features, dtype=torch.float64) for index, attention in modules}
    counts = dict.fromkeys(sums, 0)

    def record(index):
        def hook(_module, _args, keys):
            sums[index] += keys.detach().double().sum(dim=tuple(range(keys.dim() - 1))).cpu()
            counts[index] += keys[..., 0].numel()
        return hook

    hooks = [attention.k_proj.register_forward_hook(record(index)) for index, attention in modules]
    _calibration_pass(model, calibration, hooks, "KV cache: mean keys", show_progress)
    changed = []
    for index, attention in modules:
        head_dim, rotated = attention.head_dim, 2 * still.numel()
        # rotate_half: channel j pairs with j + rotated / 2; channels past `rotated` (partial RoPE) never turn
        mask = torch.cat([still, still, torch.ones(head_dim - rotated, dtype=torch.bool)])
        offset = (sums[index] / counts[index]).view(-1, head_dim) * mask
        if offset.abs().max() > 0:
            bias = attention.k_proj.bias
            bias.copy_((bias.double() - offset.reshape(-1).to(bias.device)).to(bias.dtype))
            changed.append(index)
    return changed


@torch.no_grad()
def quantize_kv_cache(model: torch.nn.Module, config: KVCache, calibration: torch.Tensor, *,
                      show_progress: bool = True) -> torch.nn.Module:
    """Calibrate each layer's key and value scales on `calibration` (token ids [samples, seq_len]) with the cache in
    full precision (the keys centred first, `config.centre_keys`), then run the model with the FP8 cache."""
    check_kv_cache(model, config)
    modules = attention_modules(model)
    for _, attention in modules:
        remove(attention)  # calibrate on the float cache
    centred = set(centre_keys(model, calibration, show_progress)) if config.centre_keys else set()
    per_head = config.scales == "per_head"
    amax: dict[int, list[torch.Tensor | None]] = {id(a): [None, None] for _, a in modules}

    def observe(attention, key_states, value_states):
        seen = amax[id(attention)]
        for index, x in enumerate((key_states, value_states)):
            # per head: over batch, tokens and head_dim of [batch, kv_heads, tokens, head_dim]
            value = x.detach().abs().float().amax(dim=(0, 2, 3)) if per_head else x.detach().abs().float().amax()
            seen[index] = value if seen[index] is None else torch.maximum(seen[index], value)
        return key_states, value_states

    hooks = [_swap_cache_hook(attention, observe) for _, attention in modules]
    _calibration_pass(model, calibration, hooks, "KV cache scales", show_progress)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    args = kv_args(config.scales)
    for index, (_, attention) in enumerate(modules):
        k_amax, v_amax = amax[id(attention)]
        shape = (-1, 1, 1) if per_head else (1,)
        # saved in the model's dtype, as compressed-tensors initializes them: rounding uses the saved values
        k_scale, v_scale = ((a / E4M3_MAX).clamp(min=torch.finfo(torch.float16).tiny).reshape(shape).to(dtype)
                            for a in (k_amax, v_amax))
        install(attention, KVQuant(args, k_scale, v_scale, index in centred), device)
    return model


# ---------------------------------------------------------------- checkpoints


SCALE_NAMES = ("k_scale", "v_scale")


def kv_cache_state(model: torch.nn.Module, checkpoint_name) -> dict[str, torch.Tensor]:
    """`{attention}.k_scale` / `.v_scale` of every quantized-cache layer, named as the checkpoint names modules."""
    state = {}
    for name, _, quant in kv_quantized(model):
        state[f"{checkpoint_name(name)}.k_scale"] = quant.k_scale.detach().contiguous()
        state[f"{checkpoint_name(name)}.v_scale"] = quant.v_scale.detach().contiguous()
    return state


def kv_cache_scheme(model: torch.nn.Module) -> QuantizationArgs | None:
    """The model's kv_cache_scheme (None: a float cache); one per model, as compressed-tensors stores it."""
    schemes = {quant.args.model_dump_json(): quant.args for _, _, quant in kv_quantized(model)}
    if len(schemes) > 1:
        raise CompressError("compressed-tensors stores one kv_cache_scheme per model; this model's layers have "
                            f"{len(schemes)}: quantize its cache with one kv_cache step")
    return next(iter(schemes.values()), None)


def pop_kv_scales(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Take the k_scale / v_scale tensors out of a checkpoint's state dict (no module holds them as parameters)."""
    return {key: state.pop(key) for key in [k for k in state if k.rsplit(".", 1)[-1] in SCALE_NAMES]}


def install_from_checkpoint(model: torch.nn.Module, quantization_config: dict, scales: dict[str, torch.Tensor],
                            module_name) -> None:
    """Run a loaded model with the quantized cache its checkpoint describes (kv_cache_scheme and the scales, keyed
    as the checkpoint names them); a scheme this runtime cannot run, or a missing scale, is an error naming it."""
    scheme = (quantization_config or {}).get("kv_cache_scheme")
    if not scheme:
        return
    args = QuantizationArgs.model_validate(scheme)
    if args.type != "float" or args.num_bits != 8 or args.strategy not in STRATEGIES.values() or args.dynamic \
            or not args.symmetric:
        raise CompressError(f"config.json: kv_cache_scheme {args.model_dump(exclude_none=True)} is not one compress "
                            f"runs; it runs FP8 (type float, 8 bits, symmetric, static) with strategy tensor or "
                            f"attn_head")
    check_kv_cache(model)
    scales = {module_name(key): value for key, value in scales.items()}
    device = model.get_input_embeddings().weight.device  # packed layers may hold no parameter of their own
    for name, attention in attention_modules(model):
        try:
            k_scale, v_scale = scales[f"{name}.k_scale"], scales[f"{name}.v_scale"]
        except KeyError:
            raise CompressError(f"config.json has a kv_cache_scheme but the weights hold no {name}.k_scale / "
                                f".v_scale; the checkpoint is damaged or its config does not belong to its weights")
        install(attention, KVQuant(args, k_scale, v_scale), device)

"""Checkpoint formats for quantized models.

- compressed-tensors (default): `pack-quantized` for integer grids, `float-quantized` for FP8, `int-quantized` (int8
  weights as they are) for W8A8 int8, `nvfp4-pack-quantized` / `mxfp4-pack-quantized` for the FP4 grids (two e2m1
  values per byte, e4m3 / e8m0 scales, NVFP4's `weight_global_scale` and, for W4A4, `input_global_scale`). Stock
  transformers (with compressed-tensors installed) and vLLM load them all.
  The packing is compressed-tensors' own compressor, so the bytes are exactly what its loaders expect.
- GPTQ v1 (`format: gptq`): the AutoGPTQ / GPTQModel layout that existing "-GPTQ" checkpoints use: per Linear
  `qweight` (int32, 32/bits values packed along the input dimension), `qzeros` (int32, zero point minus one, packed
  along the output dimension), `scales` (float16 [groups, out]) and `g_idx` (int32 group of each input column),
  with `quantization_config` {quant_method: gptq, checkpoint_format: gptq} in config.json and quantize_config.json.
"""

from __future__ import annotations

import warnings

import torch
from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor, IntQuantizationCompressor
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationStatus

from compress.architectures import checkpoint_name, module_name
from compress.errors import CompressError
from compress.modules import WeightQuant, quantized_linears, quantized_modules
from compress.moe import moe_blocks
from compress.quantize.fp4 import decompress as fp4_decompress
from compress.quantize.fp4 import is_fp4
from compress.quantize.kv_cache import kv_cache_scheme, kv_cache_state, kv_quantized


def _schemes(model: torch.nn.Module) -> tuple[dict[str, QuantizationScheme], list[str]]:
    """Config groups and the ignore list. One shared grid gives llm-compressor's usual form (targets: Linear,
    ignore: the rest); several grids, or a quantized embedding (not a Linear), target exact module names."""
    by_args: dict[str, tuple] = {}
    for name, module, quant in quantized_modules(model):
        embedding = isinstance(module, torch.nn.Embedding)
        key = (quant.args.model_dump_json() + (quant.input_args.model_dump_json() if quant.input_args else "")
               + ("embedding" if embedding else ""))
        by_args.setdefault(key, (quant, [], _compressor(quant.args, quant.input_args, embedding)[1]))[1].append(name)
    # MoE routers are Linear modules in vLLM (not in transformers 5): name them, or it would expect them quantized
    routers = [r"re:.*\.gate$"] if moe_blocks(model) else []
    embedding = any(isinstance(module, torch.nn.Embedding) for _, module, _ in quantized_modules(model))
    if len(by_args) == 1 and not embedding:
        ((quant, names, _),) = by_args.values()
        quantized = set(names)
        ignore = [checkpoint_name(model, n) for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n not in quantized]
        scheme = QuantizationScheme(targets=["Linear"], weights=quant.args, input_activations=quant.input_args)
        return {"group_0": scheme}, ignore + routers
    mixed = len({format for _, _, format in by_args.values()}) > 1  # each group names its own format
    groups = {f"group_{i}": QuantizationScheme(targets=[checkpoint_name(model, n) for n in names], weights=quant.args,
                                               input_activations=quant.input_args, format=format if mixed else None)
              for i, (quant, names, format) in enumerate(by_args.values())}
    return groups, routers


def _compressor(args, input_args=None, embedding: bool = False):
    """compressed-tensors' compressor and format name for a weight grid: FP8 → float-quantized, int with quantized
    inputs (W8A8 int8) → int-quantized (what vLLM's int8 GEMMs read), other int → packed, FP4 → nvfp4- or
    mxfp4-pack-quantized (told apart by group size, as compressed-tensors tells them apart). An 8-bit embedding →
    int-quantized too: its int8 codes stay the module's `weight`, where stock transformers (5.x) needs one — it
    initializes every nn.Embedding's `weight` on load, and a packed embedding (weight_packed) has none."""
    if args.type == "float" and args.num_bits == 4:
        return ((NVFP4PackedCompressor, "nvfp4-pack-quantized") if args.group_size == 16
                else (MXFP4PackedCompressor, "mxfp4-pack-quantized"))
    if args.type == "float":
        return FloatQuantizationCompressor, "float-quantized"
    if input_args is not None or embedding:
        return IntQuantizationCompressor, "int-quantized"
    return PackedQuantizationCompressor, "pack-quantized"


# compressed-tensors packs an asymmetric grid's zero points eight to an int32 word, and its loader in stock transformers
# does not unpack them (llm-compressor issues 1618, 1704): the checkpoint is right, the stock loader refuses it
ASYMMETRIC_PACKED = ("asymmetric integer grids are saved as compressed-tensors pack-quantized with packed zero points, "
                     "which compress.load reads but stock transformers (compressed-tensors 0.20) refuses with a "
                     "size mismatch on weight_zero_point; for a checkpoint stock transformers loads, use sym: true")


def compressed_tensors_state_dict(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], ModelCompressor]:
    """The model's state dict with every quantized Linear compressed (int: weight_packed, weight_scale,
    weight_shape, weight_zero_point when asymmetric; FP8: an e4m3 weight and weight_scale), a quantized KV cache's
    k_scale / v_scale on each attention module, and the compressor whose `update_config` writes the matching config
    (format dense where only the cache is quantized)."""
    state = model.state_dict()
    schemes, ignore = _schemes(model)
    formats = set()
    for name, linear, quant in quantized_modules(model):  # an embedding's [vocab, hidden] as a Linear's [out, in]
        del state[f"{name}.weight"]
        compressor, format = _compressor(quant.args, quant.input_args, isinstance(linear, torch.nn.Embedding))
        formats.add(format)
        tensors = {"weight": linear.weight.detach(), "weight_scale": quant.scale, "weight_zero_point": quant.zero_point}
        if quant.global_scale is not None:  # NVFP4
            tensors["weight_global_scale"] = quant.global_scale.float().reshape(1).clone()  # one tensor per Linear
        compressed = compressor.compress(tensors, QuantizationScheme(targets=[name], weights=quant.args))
        state.update({f"{name}.{key}": value.contiguous() for key, value in compressed.items()})
        if quant.input_global_scale is not None:  # NVFP4 W4A4
            state[f"{name}.input_global_scale"] = quant.input_global_scale.float().reshape(1).clone()
    if "pack-quantized" in formats and any(not quant.args.symmetric for _, _, quant in quantized_linears(model)):
        warnings.warn(ASYMMETRIC_PACKED, stacklevel=2)
    state.update(kv_cache_state(model, lambda name: checkpoint_name(model, name)))
    config = QuantizationConfig(config_groups=schemes, ignore=ignore, format=formats.pop() if len(formats) == 1
                                else "mixed-precision" if formats else "dense", kv_cache_scheme=kv_cache_scheme(model),
                                quantization_status=QuantizationStatus.COMPRESSED)
    return state, ModelCompressor(quantization_config=config)


# ---------------------------------------------------------------- GPTQ v1


GPTQ_PACKABLE_BITS = (2, 4, 8)  # 32/bits values per int32 word; 3-bit words straddle and are not written here


def _pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned `bits`-bit values along `dim`: value k of each word sits at bit offset k·bits."""
    per_word = 32 // bits
    values = values.to(torch.int64).movedim(dim, 0)
    words = torch.zeros(values.shape[0] // per_word, *values.shape[1:], dtype=torch.int64, device=values.device)
    for k in range(per_word):
        words |= values[k::per_word] << (bits * k)
    words = torch.where(words >= 2**31, words - 2**32, words)  # the same 32 bits, read as signed int32
    return words.to(torch.int32).movedim(0, dim).contiguous()


def gptq_state_dict(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The model's state dict with every quantized Linear in the GPTQ v1 layout, and its quantization_config."""
    if kv_quantized(model):
        raise CompressError("the GPTQ format has no place for a quantized KV cache's scales: save the model with "
                            "format compressed-tensors")
    state = model.state_dict()
    quantized = list(quantized_linears(model))
    grids = {quant.args.model_dump_json(): quant.args for _, _, quant in quantized}
    if len(grids) != 1:
        raise CompressError(f"the GPTQ format holds one quantization grid per model; this model has {len(grids)}: "
                            f"save it with format compressed-tensors")
    (args,) = grids.values()
    bits, offset = args.num_bits, 2 ** (args.num_bits - 1)  # compressed-tensors' signed grid → GPTQ's unsigned one
    for name, linear, quant in quantized:
        out_features, in_features = linear.weight.shape
        group = in_features if args.group_size is None else args.group_size
        scale = quant.scale.float()  # [out, groups]
        zero = quant.zero_point.float() if quant.zero_point is not None else torch.zeros_like(scale)
        columns_scale = scale.repeat_interleave(group, dim=1)
        columns_zero = zero.repeat_interleave(group, dim=1)
        q = torch.round(linear.weight.float() / columns_scale + columns_zero) + offset  # [out, in], 0 … 2^bits-1
        del state[f"{name}.weight"]
        state[f"{name}.qweight"] = _pack_int32(q.T, bits, dim=0)  # [in·bits/32, out]
        state[f"{name}.qzeros"] = _pack_int32((zero + offset - 1).T, bits, dim=1)  # v1 stores zero − 1
        state[f"{name}.scales"] = scale.T.to(torch.float16).contiguous()  # [groups, out]
        state[f"{name}.g_idx"] = (torch.arange(in_features) // group).to(torch.int32)
    config = {
        "quant_method": "gptq", "checkpoint_format": "gptq", "bits": bits,
        "group_size": -1 if args.group_size is None else args.group_size, "sym": args.symmetric,
        # groups are contiguous (act-order visits columns in another order but keeps groups in place), so the
        # identity g_idx above is exact and loaders may take their fast no-act-order kernels
        "desc_act": False, "static_groups": args.actorder is not None, "true_sequential": True, "lm_head": False,
    }
    return state, config


def is_gptq(config: dict) -> bool:
    quant = config.get("quantization_config") or {}
    return quant.get("quant_method") == "gptq"


# ---------------------------------------------------------------- reading either format back


# mixed-precision: config groups that each name one of the others (compress writes it for an int8 embedding beside
# packed Linears)
READABLE_CT_FORMATS = ("pack-quantized", "float-quantized", "int-quantized", "nvfp4-pack-quantized",
                       "mxfp4-pack-quantized", "mixed-precision")
READABLE = ("compressed-tensors (pack-quantized, float-quantized, int-quantized, nvfp4- and mxfp4-pack-quantized, "
            "mixed-precision of these), "
            "GPTQ v1/v2 (2/3/4/8 bits), "
            "AWQ GEMM (4 bits)")


def is_quantized_checkpoint(config: dict) -> bool:
    """config.json (as a dict) of a quantized checkpoint this module can decompress; a quantization_config in a
    layout it cannot read is an error that names it and what is readable."""
    quant = config.get("quantization_config")
    if not quant:
        return False
    method = quant.get("quant_method")
    if method in ("gptq", "awq") or (method == "compressed-tensors" and quant.get("format") in READABLE_CT_FORMATS):
        return True
    if method == "compressed-tensors" and quant.get("kv_cache_scheme") and not quant.get("config_groups"):
        return True  # only the KV cache is quantized: the weights are dense
    layout = f"{method}" + (f" ({quant.get('format')})" if quant.get("format") else "")
    raise CompressError(f"this checkpoint is quantized as {layout}, which compress cannot read; readable: {READABLE}. "
                        f"Start from the float model, or convert it with its tool to one of these")


def describe_quantized_checkpoint(config: dict) -> str | None:
    """How a checkpoint's config.json says it was quantized, in a few words for the report (None: not quantized)."""
    if not is_quantized_checkpoint(config):
        return None
    quant = config["quantization_config"]
    method = quant.get("quant_method")
    if method == "gptq":
        version = "v2" if quant.get("checkpoint_format") == "gptq_v2" else "v1"
        group = quant.get("group_size", -1)
        return (f"GPTQ {version}, {quant.get('bits')}-bit, " + ("per channel" if group == -1 else f"group {group}")
                + (", act-order" if quant.get("desc_act") else ""))
    if method == "awq":
        from compress.quantize.foreign import awq_bits_and_group

        bits, group = awq_bits_and_group(quant)
        return f"AWQ GEMM, {bits}-bit, group {group}"
    kv = quant.get("kv_cache_scheme")
    cache = f", {kv.get('type')}{kv.get('num_bits')} KV cache ({kv.get('strategy')} scales)" if kv else ""
    return f"compressed-tensors {quant.get('format')}{cache}"


def decompressed_state_dict(state: dict[str, torch.Tensor], config: dict
                            ) -> tuple[dict[str, torch.Tensor], dict[str, WeightQuant]]:
    """Dense float weights from a quantized checkpoint's state dict (compressed-tensors, GPTQ, AWQ; keys already in
    transformers' module names: compress.architectures.module_name), and the grid of every quantized module (its
    scales and zero points as saved), so the loaded model is known as quantized."""
    from compress.quantize.foreign import awq_weights, gptq_weights

    if is_gptq(config):
        return gptq_weights(state, config["quantization_config"])
    if config["quantization_config"].get("quant_method") == "awq":
        return awq_weights(state, config["quantization_config"])
    try:
        quant = QuantizationConfig.model_validate(config["quantization_config"])
    except ValueError as error:  # pydantic's ValidationError: the first problem, in one line
        problem = error.errors()[0] if hasattr(error, "errors") else {"loc": (), "msg": str(error)}
        field = ".".join(str(part) for part in problem["loc"])
        raise CompressError(f"config.json: quantization_config is not a valid compressed-tensors config "
                            f"({field + ': ' if field else ''}{problem['msg']}); the checkpoint is damaged or was "
                            f"written by an incompatible tool")
    ignore = {module_name(config, name) for name in quant.ignore or []}
    schemes = list(quant.config_groups.values())
    for scheme in schemes:
        scheme.targets = [module_name(config, name) for name in scheme.targets]
    modules = {k.removesuffix(".weight_scale") for k in state if k.endswith(".weight_scale")}
    dense = {k: v for k, v in state.items() if k.rsplit(".", 1)[0] not in modules
             or not k.rsplit(".", 1)[-1].startswith("weight")}
    grids = {}
    for module in modules:
        if module in ignore:
            continue
        scheme = next((s for s in schemes if module in s.targets or "Linear" in s.targets), None)
        if scheme is None:
            raise CompressError(f"config.json: {module} has quantized weights (weight_scale) but no "
                                f"quantization_config.config_groups entry targets it (targets: "
                                f"{sorted({t for s in schemes for t in s.targets})}); the checkpoint is damaged or "
                                f"its config does not belong to its weights")
        compressor, _ = _compressor(scheme.weights, scheme.input_activations, scheme.format == "int-quantized")
        local = {name.removeprefix(module + "."): value for name, value in state.items()
                 if name.startswith(module + ".weight")}
        if is_fp4(scheme.weights):  # in float32 (compressed-tensors' own decompressor returns bfloat16)
            weight, scale = fp4_decompress(local, scheme.weights)
            decompressed = {"weight": weight, "weight_scale": scale}
        else:
            decompressed = compressor.decompress(local, scheme)  # the zero point comes back unpacked
        dense[f"{module}.weight"] = decompressed["weight"]
        scale = decompressed["weight_scale"]
        zero = decompressed.get("weight_zero_point")
        if zero is None:  # symmetric grids save no zero point: it is 0
            zero = torch.zeros(scale.shape, dtype=scheme.weights.zp_dtype or (
                scale.dtype if scheme.weights.type == "float" else torch.int8))
        global_scale = local.get("weight_global_scale")  # NVFP4's, kept so the grid is known whole
        input_global_scale = dense.pop(f"{module}.input_global_scale", None)  # NVFP4 W4A4
        grids[module] = WeightQuant(scheme.weights, scale, zero.reshape(scale.shape), scheme.input_activations,
                                    global_scale=global_scale, input_global_scale=input_global_scale)
    return dense, grids

"""Checkpoint formats for quantized models. compressed-tensors `pack-quantized` is the default: stock
transformers (with compressed-tensors installed) and vLLM load it. The packing itself is compressed-tensors'
own compressor, so the bytes are exactly what its loaders expect."""

from __future__ import annotations

import torch
from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationStatus

from compress.quantize.grid import quantized_linears


def _schemes(model: torch.nn.Module) -> tuple[dict[str, QuantizationScheme], list[str]]:
    """Config groups and the ignore list. One shared grid gives llm-compressor's usual form (targets: Linear,
    ignore: the rest); several grids target exact module names."""
    by_args: dict[str, tuple] = {}
    for name, _, quant in quantized_linears(model):
        key = quant.args.model_dump_json()
        by_args.setdefault(key, (quant.args, []))[1].append(name)
    if len(by_args) == 1:
        ((args, names),) = by_args.values()
        quantized = set(names)
        ignore = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in quantized]
        return {"group_0": QuantizationScheme(targets=["Linear"], weights=args)}, ignore
    groups = {f"group_{i}": QuantizationScheme(targets=names, weights=args)
              for i, (args, names) in enumerate(by_args.values())}
    return groups, []


def is_quantized(model: torch.nn.Module) -> bool:
    return next(quantized_linears(model), None) is not None


def compressed_tensors_state_dict(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], ModelCompressor]:
    """The model's state dict with every quantized Linear packed (weight_packed, weight_scale, weight_shape,
    weight_zero_point when asymmetric), and the compressor whose `update_config` writes the matching config."""
    state = model.state_dict()
    schemes, ignore = _schemes(model)
    for name, linear, quant in quantized_linears(model):
        del state[f"{name}.weight"]
        packed = PackedQuantizationCompressor.compress(
            {"weight": linear.weight.detach(), "weight_scale": quant.scale, "weight_zero_point": quant.zero_point},
            QuantizationScheme(targets=[name], weights=quant.args),
        )
        state.update({f"{name}.{key}": value.contiguous() for key, value in packed.items()})
    config = QuantizationConfig(
        config_groups=schemes, ignore=ignore, format="pack-quantized", quantization_status=QuantizationStatus.COMPRESSED
    )
    return state, ModelCompressor(quantization_config=config)


def is_pack_quantized(config: dict) -> bool:
    """A pack-quantized compressed-tensors checkpoint (config.json as a dict)."""
    quant = config.get("quantization_config") or {}
    return quant.get("quant_method") == "compressed-tensors" and quant.get("format") == "pack-quantized"


def decompressed_state_dict(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Dense float weights from a pack-quantized state dict, with compressed-tensors' own decompressor."""
    quant = QuantizationConfig.model_validate(config["quantization_config"])
    ignore = set(quant.ignore or [])
    schemes = list(quant.config_groups.values())
    dense = {k: v for k, v in state.items() if not k.rsplit(".", 1)[-1].startswith("weight_")}
    for key in [k for k in state if k.endswith(".weight_packed")]:
        module = key.removesuffix(".weight_packed")
        if module in ignore:
            continue
        scheme = next(s for s in schemes if module in s.targets or "Linear" in s.targets)
        local = {name.removeprefix(module + "."): value for name, value in state.items()
                 if name.startswith(module + ".weight_")}
        dense[f"{module}.weight"] = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    return dense

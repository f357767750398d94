"""`compress.load(folder, runtime="packed")` without a dense model: the architecture is built on the meta device, each
quantized Linear's packed module is made straight from the checkpoint's packed codes, scales and zero points (one
Linear, or one fused q/k/v or gate/up group, at a time), and only the float tensors (embeddings, norms, the head) are
allocated at full size. So loading a 4-bit model needs about its 4-bit size in memory, host and GPU alike, not the
float model's (measured: eval/results/packed_load_smollm2_cpu.json).

Read here: compressed-tensors checkpoints whose every quantized grid has a packed kernel (int4 in groups, int8 or FP8
per channel) in a dense decoder (no MoE experts, not multimodal). Anything else returns None, and compress.load takes
the dense path and packs afterwards, as before."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compress.errors import CompressError
from compress.modules import WeightQuant
from compress.quantize.packed import Grid, install_packed, packed_kind


def _eligible(config: dict) -> bool:
    from compress.architectures import LANGUAGE_MODEL_KEYS

    quant = config.get("quantization_config") or {}
    return (quant.get("quant_method") == "compressed-tensors" and quant.get("format") in
            ("pack-quantized", "float-quantized", "int-quantized", "mixed-precision")
            and config.get("model_type") not in LANGUAGE_MODEL_KEYS)


class _Tensors:
    """Every tensor of a folder's safetensors files, read one at a time onto `device`."""

    def __init__(self, folder: Path, device: str):
        from safetensors import safe_open

        self._files = [safe_open(str(f), framework="pt", device=device) for f in sorted(folder.glob("*.safetensors"))]
        self.where = {key: handle for handle in self._files for key in handle.keys()}

    def get(self, key: str) -> torch.Tensor:
        return self.where[key].get_tensor(key)


def _grid(module: str, scheme, tensors: _Tensors, dtype: torch.dtype, module_key) -> Grid | None:
    """One quantized module's grid, its codes read only when the packed module is built; None: no packed kernel."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    key = module_key(module)
    args = scheme.weights
    scale = tensors.get(f"{key}.weight_scale")
    packed = f"{key}.weight_packed" in tensors.where
    if packed:
        out_features, in_features = (int(n) for n in tensors.get(f"{key}.weight_shape").tolist())
    else:
        out_features, in_features = tensors.where[f"{key}.weight"].get_slice(f"{key}.weight").get_shape()
    zero = None
    if f"{key}.weight_zero_point" in tensors.where:
        zero = tensors.get(f"{key}.weight_zero_point")
        if packed and not args.symmetric:  # packed along the outputs (compressed-tensors' pack-quantized)
            zero = unpack_from_int32(zero, args.num_bits, (out_features, scale.shape[-1]), packed_dim=0)
        zero = zero.reshape(scale.shape)
    quant = WeightQuant(args, scale, zero, scheme.input_activations)
    kind, _ = packed_kind(in_features, out_features, quant)
    if kind is None:
        return None
    bias = tensors.get(f"{key}.bias").to(dtype) if f"{key}.bias" in tensors.where else None

    def codes() -> torch.Tensor:
        if packed:
            return unpack_from_int32(tensors.get(f"{key}.weight_packed"), args.num_bits, (out_features, in_features))
        return tensors.get(f"{key}.weight")  # FP8: the e4m3 weight; int8: the codes themselves

    return Grid(kind, in_features, out_features, quant, bias, dtype, codes)


def _materialize(model: torch.nn.Module, tensors: _Tensors, device: str, dtype: torch.dtype, checkpoint_key) -> None:
    """Every tensor still on the meta device (float weights, norms, rotary frequencies) allocated on `device` and filled
    from the checkpoint (rotary frequencies computed), one at a time."""
    for module_name, module in model.named_modules():
        for store in ("_parameters", "_buffers"):
            for name, tensor in list(getattr(module, store).items()):
                if tensor is None or not tensor.is_meta:
                    continue
                key = checkpoint_key(f"{module_name}.{name}" if module_name else name)
                if key in tensors.where:
                    value = tensors.get(key).to(dtype if tensor.is_floating_point() else tensor.dtype)
                    if store == "_parameters":
                        value = torch.nn.Parameter(value, requires_grad=False)
                elif store == "_buffers":  # rotary frequencies: computed below
                    value = torch.empty_like(tensor, device=device)
                else:  # a head tied to the embedding: tie_weights sets it
                    continue
                getattr(module, store)[name] = value
    model.tie_weights()
    for module in model.modules():  # rotary inverse frequencies: not in checkpoints, computed from the config
        if "RotaryEmbedding" in type(module).__name__:
            model._init_weights(module)
    missing = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if missing:
        raise CompressError(f"the checkpoint holds no tensor for {', '.join(missing[:3])}"
                            f"{' …' if len(missing) > 3 else ''}; it does not belong to its config.json")


@torch.no_grad()
def load_packed(folder: Path, dtype: torch.dtype, device: str):
    """The packed model of a quantized step folder, never dense (see the module's docstring); None where this reader
    does not apply."""
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoConfig, AutoModelForCausalLM

    from compress.architectures import checkpoint_name, module_name
    from compress.prune.structure import LAYER_WIDTHS_KEY, build_layers_at_recorded_widths

    config = json.loads((folder / "config.json").read_text())
    if not _eligible(config):
        return None
    quant = QuantizationConfig.model_validate(config["quantization_config"])
    tensors = _Tensors(folder, device)
    modules = {module_name(config, k.removesuffix(".weight_scale")) for k in tensors.where if k.endswith(".weight_scale")}
    if any("experts" in m for m in modules):
        return None
    ignore = {module_name(config, name) for name in quant.ignore or []}
    schemes = list(quant.config_groups.values())
    model_config = AutoConfig.from_pretrained(folder)
    del model_config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
        if getattr(model_config, LAYER_WIDTHS_KEY, None):
            build_layers_at_recorded_widths(model)
    key_of = {module_name(config, k): k for k in tensors.where}

    def checkpoint_key(name: str) -> str:
        return key_of.get(name, checkpoint_name(config, name))

    def module_key(module: str) -> str:
        return checkpoint_key(f"{module}.weight_scale").removesuffix(".weight_scale")

    grids = {}
    for module in sorted(modules - ignore):
        scheme = next((s for s in schemes if "Linear" in s.targets
                       or module in {module_name(config, t) for t in s.targets}), None)
        grid = None if scheme is None else _grid(module, scheme, tensors, dtype, module_key)
        if grid is None:  # no scheme (a damaged config: the dense path says so) or no packed kernel for it
            return None
        grids[module] = grid
    install_packed(model, grids)
    _materialize(model, tensors, device, dtype, checkpoint_key)
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()

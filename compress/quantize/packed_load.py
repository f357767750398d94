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
import warnings
from pathlib import Path

import torch

from compress.errors import CompressError
from compress.modules import QUANT_ATTR, WeightQuant, compute_rotary_frequencies
from compress.quantize.packed import EMBEDDING_NOTE, Grid, install_packed, packed_kind


def _eligible(config: dict) -> bool:
    from compress.architectures import LANGUAGE_MODEL_KEYS

    quant = config.get("quantization_config") or {}
    return (quant.get("quant_method") == "compressed-tensors" and quant.get("format") in
            ("pack-quantized", "float-quantized", "int-quantized", "mixed-precision")
            and config.get("model_type") not in LANGUAGE_MODEL_KEYS)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class _Tensors:
    """Every tensor of a folder's safetensors files, read one at a time into its own memory on `device`.

    Why not safetensors' safe_open: it maps each file, and every page read stays resident while any handle or tensor
    of it lives: loading SmolLM2's W4 folder held the whole 169 MB file beside the 111 MB packed model. Here each
    tensor is read with a plain file read into a fresh buffer (the format: an 8-byte header length, a JSON header of
    dtype, shape and byte offsets, then the data), so the host holds one tensor in flight at most."""

    def __init__(self, folder: Path, device: str):
        self.device = device
        self.where: dict[str, tuple[Path, dict, int]] = {}
        for path in sorted(folder.glob("*.safetensors")):
            with open(path, "rb") as file:
                length = int.from_bytes(file.read(8), "little")
                header = json.loads(file.read(length))
            header.pop("__metadata__", None)
            for key, entry in header.items():
                self.where[key] = (path, entry, 8 + length)

    def shape(self, key: str) -> list[int]:
        return self.where[key][1]["shape"]

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor on the device, converted to `dtype` (if given) slice by slice: a float32 embedding loaded as
        bfloat16 never exists whole in float32."""
        path, entry, start = self.where[key]
        if entry["dtype"] not in _DTYPES:
            raise CompressError(f"{path.name}: tensor {key} has dtype {entry['dtype']}, which compress does not read")
        stored = _DTYPES[entry["dtype"]]
        out = torch.empty(entry["shape"], dtype=dtype or stored, device=self.device)
        flat = out.view(-1)
        direct = flat.dtype == stored and flat.device.type == "cpu"  # read straight into place: no buffer at all
        step = max(1, flat.numel() if direct else self.SLICE_BYTES // stored.itemsize)
        # one, reused; on the host whatever default device the caller has set (the file is read into it)
        buffer = None if direct else torch.empty(min(step, flat.numel()), dtype=stored, device="cpu")
        with open(path, "rb") as file:
            file.seek(start + entry["data_offsets"][0])
            for first in range(0, flat.numel(), step):
                count = min(step, flat.numel() - first)
                target = flat[first:first + count] if direct else buffer[:count]
                if file.readinto(memoryview(target.view(torch.uint8).numpy())) != count * stored.itemsize:
                    raise CompressError(f"{path.name} is shorter than its header says (tensor {key}); the file is "
                                        f"truncated: write the step again")
                if not direct:
                    flat[first:first + count] = target
        return out

    SLICE_BYTES = 8 * 2**20  # the host's transient per tensor while converting


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
        out_features, in_features = tensors.shape(f"{key}.weight")
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
    bias = tensors.get(f"{key}.bias", dtype) if f"{key}.bias" in tensors.where else None

    def codes() -> torch.Tensor:
        if packed:
            return unpack_from_int32(tensors.get(f"{key}.weight_packed"), args.num_bits, (out_features, in_features))
        return tensors.get(f"{key}.weight")  # FP8: the e4m3 weight; int8: the codes themselves

    return Grid(kind, in_features, out_features, quant, bias, dtype, codes)


def _dequantized_embedding(embedding: torch.nn.Embedding, scheme, tensors: _Tensors, dtype: torch.dtype,
                           key: str) -> None:
    """A quantized embedding (int8 codes, compress.quantize.head_embed) dequantized in place of its meta weight, its
    grid kept on it so the model is known as quantized."""
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor

    local = {name.removeprefix(key + "."): tensors.get(name) for name in tensors.where
             if name.startswith(key + ".weight")}
    dense = IntQuantizationCompressor.decompress(local, scheme)  # int-quantized (compress.quantize.formats)
    embedding.weight = torch.nn.Parameter(dense["weight"].to(dtype), requires_grad=False)
    scale = local["weight_scale"]
    zero = local.get("weight_zero_point", torch.zeros(scale.shape, dtype=torch.int8, device=scale.device))
    setattr(embedding, QUANT_ATTR, WeightQuant(scheme.weights, scale, zero.reshape(scale.shape)))


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
                    value = tensors.get(key, dtype if tensor.is_floating_point() else tensor.dtype)
                    if store == "_parameters":
                        value = torch.nn.Parameter(value, requires_grad=False)
                elif store == "_buffers":  # rotary frequencies: computed below
                    value = torch.empty_like(tensor, device=device)
                else:  # a head tied to the embedding: tie_weights sets it
                    continue
                getattr(module, store)[name] = value
    model.tie_weights()
    compute_rotary_frequencies(model)
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
    from compress.widths import LAYER_WIDTHS_KEY, build_layers_at_recorded_widths

    config = json.loads((folder / "config.json").read_text())
    if not _eligible(config):
        return None
    quant = QuantizationConfig.model_validate(config["quantization_config"])
    tensors = _Tensors(folder, device)
    modules = {module_name(config, k.removesuffix(".weight_scale")) for k in tensors.where
               if k.endswith(".weight_scale")}
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

    grids, built = {}, dict(model.named_modules())
    for module in sorted(modules - ignore):
        scheme = next((s for s in schemes if module in {module_name(config, t) for t in s.targets}
                       or ("Linear" in s.targets and isinstance(built.get(module), torch.nn.Linear))), None)
        if isinstance(built.get(module), torch.nn.Embedding) and scheme is not None:
            _dequantized_embedding(built[module], scheme, tensors, dtype, module_key(module))
            warnings.warn(EMBEDDING_NOTE.format(name=module), stacklevel=3)
            continue
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

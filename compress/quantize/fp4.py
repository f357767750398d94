"""4-bit floating-point grids: every weight is an e2m1 number (±0, 0.5, 1, 1.5, 2, 3, 4, 6) times its group's scale.

- NVFP4: one scale per 16 weights, itself an FP8 e4m3 number, and one FP32 global scale per tensor that brings the
  group scales into e4m3's range (compressed-tensors' `tensor_group` strategy: llm-compressor's NVFP4A16 and NVFP4).
- MXFP4 (OCP Microscaling): one power-of-two scale (e8m0) per 32 weights, no global scale.

The grids are compressed-tensors' presets, and scales, global scales and rounding are its own functions
(`calculate_qparams`, `generate_gparam`, `fake_quantize`), so the weights in memory are the ones its
nvfp4- / mxfp4-pack-quantized compressors write and its loaders read back. `round_e2m1_` is the same rounding,
written for GPTQ's column loop (a few in-place operations on one column).

As llm-compressor writes NVFP4, Linears that read the same input (q/k/v, gate/up) share one global scale: serving
engines run each such group as one GEMM, which takes one global scale.

W4A4 (`activations: dynamic`): each Linear's input is rounded onto the same grid on every call (per 16 values
with a global scale measured on the calibration set for NVFP4; per 32 with power-of-two scales for MXFP4). Without
FP4 tensor cores (they arrive with Blackwell GPUs) this is simulated in floating point: the accuracy is the W4A4
model's, the speed is not measured.
"""

from __future__ import annotations

import copy
import types
from contextlib import contextmanager

import torch
from compressed_tensors.compressors.mx_utils import decompress_mx_scale
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as _ct_fake_quantize
from compressed_tensors.quantization.quant_scheme import MXFP4, NVFP4
from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp, generate_gparam

from compress import distributed
from compress.architectures import check_quantizable, known_family
from compress.config.quantize import FP4_GROUP
from compress.errors import CompressError
from compress.modules import QUANT_ATTR, quantizable_linears

E2M1_MAX = 6.0
_PRESETS = {"nvfp4": NVFP4, "mxfp4": MXFP4}


def weight_args(grid: str) -> QuantizationArgs:
    """compressed-tensors' weight args of an FP4 grid (its NVFP4 / MXFP4 presets)."""
    return copy.deepcopy(_PRESETS[grid]["weights"])


def input_args(grid: str) -> QuantizationArgs:
    """compressed-tensors' input-activation args of W4A4 on an FP4 grid."""
    return copy.deepcopy(_PRESETS[grid]["input_activations"])


def is_fp4(args: QuantizationArgs | None) -> bool:
    return args is not None and str(getattr(args.type, "value", args.type)) == "float" and args.num_bits == 4


def has_global_scale(args: QuantizationArgs) -> bool:
    return str(getattr(args.strategy, "value", args.strategy)) == "tensor_group"


def global_scale(weights: list[torch.Tensor], args: QuantizationArgs) -> torch.Tensor | None:
    """NVFP4's FP32 global scale of one tensor, or of several that share it: e4m3 max × e2m1 max / max |w|, so the
    largest group scale lands on e4m3's largest value. None for grids without one (MXFP4)."""
    if not has_global_scale(args):
        return None
    low = torch.stack([w.detach().float().amin() for w in weights]).amin()
    high = torch.stack([w.detach().float().amax() for w in weights]).amax()
    return generate_gparam(low, high)


def round_e2m1_(x: torch.Tensor) -> torch.Tensor:
    """Round in place onto e2m1 (ties to even, clamped to ±6): the grid's spacing is 0.5 below 2, 1 from 2 to 4 and 2
    from 4 to 6, so rounding x / spacing to an integer (torch rounds half to even) gives the nearest value."""
    magnitude = x.abs()
    spacing = torch.where(magnitude < 2, 0.5, torch.where(magnitude < 4, 1.0, 2.0))
    return x.div_(spacing).round_().mul_(spacing).clamp_(-E2M1_MAX, E2M1_MAX)


def same_input_groups(model: torch.nn.Module, names: list[str]) -> list[list[str]]:
    """`names` (Linears of `model`) split into the groups that share a global scale: siblings that read the same input
    (the family's q/k/v and gate/up), every other Linear alone."""
    known = known_family(model)
    siblings = known.same_input_linears if known else ()
    groups: dict[tuple, list[str]] = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        key = next(((parent, group) for group in siblings if leaf in group), (name,))
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def check_fp4_widths(model: torch.nn.Module, config) -> None:
    """The quantize steps' shape check (compress.steps) for RTN and GPTQ: a known family, and on an FP4 grid every
    quantized Linear's input width a multiple of the grid's group (16 for NVFP4, 32 for MXFP4)."""
    check_quantizable(model, config)
    grid = getattr(config, "grid", "int")
    if grid == "int":
        return
    group = FP4_GROUP[grid]
    bad = [(name, m.in_features) for name, m in quantizable_linears(model, keep_float=config.ignore)
           if m.in_features % group]
    if bad:
        name, width = bad[0]
        raise CompressError(
            f"quantize ({config.method}) grid: {grid}: {grid} scales groups of {group} input columns, and {name} has "
            f"{width} ({len(bad)} Linears with widths that are not a multiple of {group}); keep them float with "
            f"`ignore: ['{name}']`" + (", or use grid nvfp4 (groups of 16)" if grid == "mxfp4" and width % 16 == 0
                                       else "") + ", or an integer grid (grid: int) with a group_size that divides it")


# ---------------------------------------------------------------- W4A4: inputs on the grid at run time


@contextmanager
def observing_input_maxima(linears: dict[str, torch.nn.Linear], maxima: dict[str, float]):
    """Record max |x| of each Linear's input while the block runs (a pre-hook, so it sees inputs even where a later
    hook stops the forward)."""

    def hook(name):
        def record(module, args):
            maxima[name] = max(maxima.get(name, 0.0), args[0].detach().abs().amax().item())

        return record

    handles = [linear.register_forward_pre_hook(hook(name), prepend=True) for name, linear in linears.items()]
    try:
        yield maxima
    finally:
        for handle in handles:
            handle.remove()


def set_input_global_scales(linears: dict[str, torch.nn.Linear], maxima: dict[str, float]) -> None:
    """NVFP4 W4A4: each Linear's input global scale from the largest |x| any process saw on the calibration set."""
    names = sorted(linears)
    everywhere = distributed.gather([maxima.get(name, 0.0) for name in names])
    for i, name in enumerate(names):
        largest = torch.tensor(max(values[i] for values in everywhere))
        quant = getattr(linears[name], QUANT_ATTR)
        quant.input_global_scale = generate_gparam(-largest, largest).to(linears[name].weight.device)


def _fp4_input_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """W4A4: the input rounded onto the FP4 grid in groups along its features (compressed-tensors' dynamic
    quantization, as its own forward does in stock transformers), then the ordinary matmul."""
    quant = getattr(self, QUANT_ATTR)
    scale, zero = compute_dynamic_scales_and_zp(x, quant.input_args, self, global_scale=quant.input_global_scale)
    x = _ct_fake_quantize(x, scale, zero, quant.input_args, global_scale=quant.input_global_scale)
    return torch.nn.functional.linear(x, self.weight, self.bias)


def enable_fp4_activations(linear: torch.nn.Linear) -> None:
    """Round this Linear's input onto its FP4 grid on every call (W4A4, simulated in floating point)."""
    linear.forward = types.MethodType(_fp4_input_forward, linear)


# ---------------------------------------------------------------- reading a checkpoint back


def decompress(local: dict[str, torch.Tensor], args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 weight and float scale of one Linear from its nvfp4- / mxfp4-pack-quantized tensors (`local`:
    weight_packed, weight_scale, NVFP4's weight_global_scale). compressed-tensors' own decompressor rounds the weight
    to bfloat16; in float32 the loaded model is exactly the one quantized in memory."""
    packed = local["weight_packed"]
    codes = unpack_fp4_from_uint8(packed, packed.shape[0], 2 * packed.shape[1], dtype=torch.float32)
    stored = local["weight_scale"]
    scale = stored.float() if stored.dtype != torch.uint8 else decompress_mx_scale(stored).float()  # e4m3 / e8m0
    weight = dequantize(codes, scale, args=args, global_scale=local.get("weight_global_scale"), dtype=torch.float32)
    return weight, scale

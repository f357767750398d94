"""The packed runtime: quantized Linears kept packed in memory and run with PyTorch's own low-bit kernels, so a 4-bit
model is 4 bits when it runs, not only on disk. Built from the checkpoint's saved scales and zero points (the values
are exactly the checkpoint's); pruned layers keep their widths.

    int4, groups of 32/64/128/256   tinygemm: aten._weight_int4pack_mm (CUDA) and _weight_int4pack_mm_for_cpu, the
                                    kernels gpt-fast and torchao's int4 weight-only path call (bf16 compute). A Triton
                                    W4A16 kernel of ours was 1.6-4.3x slower than tinygemm at 1 and 16 rows on the
                                    H200 (eval/results/bench_int4_kernels_h200.json), so it is not here
    int8, one scale per row         aten._weight_int8pack_mm (CPU and CUDA; bf16 compute)
    FP8 e4m3 (W8A8 or weight-only)  the e4m3 weight alone is kept (1 byte); W8A8 runs torch._scaled_mm on GPUs with
                                    FP8 tensor cores, elsewhere the same rounding simulated
Anything else (3 or 2 bits, int8 in groups, asymmetric int8) has no kernel here: it stays dequantized, and
`pack_model` says so once per setting.

tinygemm's grid is unsigned: w = (q − 8)·s + m with q in [0, 15] and one (s, m) per group. Ours (compressed-tensors)
is w = (c − z)·s with c in [−8, 7]; so q = c + 8 and m = −z·s, exactly."""

from __future__ import annotations

import gc
from collections import Counter

import torch

from compress.modules import PACKED_ATTR, QUANT_ATTR, WeightQuant

INT4_GROUP_SIZES = (32, 64, 128, 256)
# The int4 and int8 kernels take their input, scales and output in bf16: the CUDA kernels only so, and on the CPU their
# float32 paths are reference loops (2 cores, a 576 x 1536 Linear, batch 64: int4 95 ms in float32, 2 ms in bf16; a
# float32 matmul 3-7 ms). So a packed model computes these Linears in bf16 whatever its dtype.
KERNEL_DTYPE = torch.bfloat16


def integer_codes(weight: torch.Tensor, quant: WeightQuant) -> torch.Tensor:
    """The grid's integers of a weight that lies on it: clamp(⌊W/s⌉ + z) (int32)."""
    columns = weight.shape[1] // quant.scale.shape[1]
    scale = quant.scale.float().repeat_interleave(columns, 1)
    zero = 0 if quant.zero_point is None else quant.zero_point.float().repeat_interleave(columns, 1)
    bits = quant.args.num_bits
    return torch.clamp(torch.round(weight.float() / scale) + zero, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1).int()


class _PackedLinear(torch.nn.Module):
    """What every packed Linear shares: its widths, its bias and the grid it came from (for `is_quantized`)."""

    kernel = ""

    def __init__(self, linear: torch.nn.Linear, quant: WeightQuant):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        setattr(self, PACKED_ATTR, self.kernel)
        setattr(self, QUANT_ATTR, quant)

    def _finish(self, out: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


def _inner_k_tiles(in_features: int) -> int:
    return next(tiles for tiles in (8, 4, 2) if in_features % (16 * tiles) == 0)


class Int4Linear(_PackedLinear):
    """4-bit weights in tinygemm's layout (half a byte per weight) and one (scale, offset) pair per group."""

    kernel = "int4 tinygemm"

    def __init__(self, linear: torch.nn.Linear, quant: WeightQuant):
        super().__init__(linear, quant)
        weight = linear.weight.detach()
        self.group_size = quant.args.group_size
        unsigned = integer_codes(weight, quant) + 8  # [out, in] in 0..15
        tiles = _inner_k_tiles(self.in_features)
        if weight.is_cuda:  # the CUDA packer takes two codes per byte, high nibble first
            pairs = (unsigned[:, ::2] << 4 | unsigned[:, 1::2]).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(pairs, tiles)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, tiles)
        scale = quant.scale.float()
        offset = torch.zeros_like(scale) if quant.zero_point is None else -quant.zero_point.float() * scale
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_offsets", torch.stack([scale, offset], -1).transpose(0, 1).contiguous()
                             .to(KERNEL_DTYPE))  # [groups, out, 2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(self.scales_and_offsets.dtype)
        if self.packed.is_cuda:
            out = torch.ops.aten._weight_int4pack_mm(flat, self.packed, self.group_size, self.scales_and_offsets)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size,
                                                             self.scales_and_offsets)
        return self._finish(out.to(x.dtype), shape)


class Int8Linear(_PackedLinear):
    """8-bit weights (one byte each) with one scale per output row."""

    kernel = "int8 weight-only"

    def __init__(self, linear: torch.nn.Linear, quant: WeightQuant):
        super().__init__(linear, quant)
        self.register_buffer("codes", integer_codes(linear.weight.detach(), quant).to(torch.int8))
        self.register_buffer("scales", quant.scale.reshape(-1).to(KERNEL_DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(self.scales.dtype), self.codes,
                                                 self.scales)
        return self._finish(out.to(x.dtype), shape)


class FP8Linear(_PackedLinear):
    """e4m3 weights (one byte each) with one scale per output row; W8A8 also rounds its input to e4m3 per token."""

    kernel = "fp8"

    def __init__(self, linear: torch.nn.Linear, quant: WeightQuant):
        super().__init__(linear, quant)
        from compress.quantize.fp8 import E4M3, _has_fp8_tensor_cores

        weight = linear.weight.detach()
        self.register_buffer("weight_fp8", (weight.float() / quant.scale.float()).to(E4M3))
        self.register_buffer("scales", quant.scale.float())  # [out, 1]
        self.dynamic_inputs = quant.input_args is not None
        self.tensor_cores = (self.dynamic_inputs and _has_fp8_tensor_cores(weight.device)
                             and weight.dtype == torch.bfloat16 and self.in_features % 16 == 0
                             and self.out_features % 16 == 0)
        self.kernel = "fp8 _scaled_mm" if self.tensor_cores else "fp8 (simulated matmul)"
        setattr(self, PACKED_ATTR, self.kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from compress.quantize.fp8 import quantize_activation

        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if self.tensor_cores:
            x_fp8, x_scale = quantize_activation(flat)
            out = torch._scaled_mm(x_fp8, self.weight_fp8.T, scale_a=x_scale, scale_b=self.scales.T,
                                   out_dtype=x.dtype)
        else:
            if self.dynamic_inputs:
                x_fp8, x_scale = quantize_activation(flat)
                flat = x_fp8.float() * x_scale
            out = (flat.float() @ (self.weight_fp8.float() * self.scales).T).to(x.dtype)
        return self._finish(out, shape)


def packed_kind(linear: torch.nn.Linear, quant: WeightQuant) -> tuple[type[_PackedLinear] | None, str]:
    """Which packed module runs this Linear's grid, or (None, why it stays dequantized)."""
    args = quant.args
    strategy = str(getattr(args.strategy, "value", args.strategy))
    kind = str(getattr(args.type, "value", args.type))
    if kind == "float" and args.num_bits == 8 and strategy == "channel":
        return FP8Linear, ""
    if kind == "int" and args.num_bits == 4 and strategy == "group" and args.group_size in INT4_GROUP_SIZES:
        if linear.out_features % 8 or linear.in_features % 32:
            return None, f"int4 with {linear.in_features} inputs x {linear.out_features} outputs (tinygemm needs " \
                         f"outputs in multiples of 8 and inputs in multiples of 32)"
        return Int4Linear, ""
    symmetric = quant.zero_point is None or not quant.zero_point.any()
    if kind == "int" and args.num_bits == 8 and strategy == "channel" and symmetric:
        return Int8Linear, ""
    group = f" g{args.group_size}" if strategy == "group" else f" per {strategy}"
    return None, f"{kind}{args.num_bits}{group}{'' if args.symmetric else ' asymmetric'}"


@torch.no_grad()
def pack_model(model: torch.nn.Module) -> list[str]:
    """Replace every quantized Linear of `model` by its packed module, in place; returns one note per setting that has
    no kernel here (those Linears stay dequantized)."""
    from compress.modules import quantized_linears

    missing: Counter = Counter()
    for name, linear, quant in list(quantized_linears(model)):
        packed_class, why = packed_kind(linear, quant)
        if packed_class is None:
            missing[why] += 1
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, packed_class(linear, quant))
    gc.collect()  # the replaced Linears sit in reference cycles: free their float weights now (7B FP8: 13 GB)
    return [f"no packed kernel for {why}: {count} Linear(s) run dequantized" for why, count in missing.items()]


def packed_kernels(model: torch.nn.Module) -> dict[str, int]:
    """How many Linears each packed kernel runs."""
    return dict(Counter(getattr(m, PACKED_ATTR) for m in model.modules() if hasattr(m, PACKED_ATTR)))


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer in memory (tied tensors once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total

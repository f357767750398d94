"""Quantized checkpoints other tools wrote, read back as dense weights (for evaluation, as a teacher, or as the start
of further steps). compressed-tensors folders (llm-compressor's) are read by compress.quantize.formats with
compressed-tensors' own decompressors; this module reads the two older layouts:

- GPTQ (AutoGPTQ, GPTQModel, optimum; `quant_method: gptq`), 2, 3, 4 or 8 bits. `qweight` int32 [in·bits/32, out]:
  each run of 32 input rows is one little-endian bit stream, value k at bit k·bits (so 3-bit values straddle words:
  32 of them fill 3 words); `qzeros` int32 [groups, out·bits/32], packed the same way along the outputs; `scales`
  [groups, out]; `g_idx` int32 [in], the group of each input column (act-order checkpoints permute it).
  weight[o, i] = scales[g, o] · (q[i, o] − z[g, o]) with g = g_idx[i], where the zero point z is stored minus one in
  the v1 format (`checkpoint_format: gptq`, AutoGPTQ's long-standing off-by-one) and as is in v2 (`gptq_v2`).
- AWQ GEMM (AutoAWQ; `quant_method: awq`, `version: gemm`), 4 bits: `qweight` int32 [in, out/8] and `qzeros` int32
  [groups, out/8] hold eight 4-bit values per word along the outputs in the order 0, 2, 4, 6, 1, 3, 5, 7 (the order
  its CUDA kernel dequantizes in); `scales` [groups, out]; weight = scales · (q − z).

Where the groups are contiguous the grid is kept (the model is known as quantized, on exactly the saved grid, in
compressed-tensors' signed form); act-order GPTQ checkpoints, whose groups are scattered over the columns, load as
float weights that lie on a grid compressed-tensors cannot describe without a g_idx, with a warning."""

from __future__ import annotations

import warnings

import torch

from compress.errors import CompressError
from compress.modules import WeightQuant
from compress.quantize.grid import weight_args

GPTQ_BITS = (2, 3, 4, 8)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds output column 8·word + AWQ_ORDER[i]
_PACKED = ("qweight", "qzeros", "scales", "g_idx")


def unpack_bitstream(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned `bits`-bit values packed into int32 words along `dim` as one little-endian bit stream."""
    stream = words.to(torch.int64).movedim(dim, 0) & 0xFFFFFFFF
    count = stream.shape[0] * 32 // bits
    start = torch.arange(count, device=words.device) * bits
    word, shift = start // 32, (start % 32).view(count, *([1] * (stream.dim() - 1)))
    low = stream[word] >> shift
    high = stream[(word + 1).clamp(max=stream.shape[0] - 1)] << (32 - shift)  # a straddling value's upper bits
    return ((low | high) & (2**bits - 1)).movedim(0, dim)


def _dense_rest(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in _PACKED}


def gptq_weights(state: dict[str, torch.Tensor], quant: dict
                 ) -> tuple[dict[str, torch.Tensor], dict[str, WeightQuant]]:
    """Dense weights of a GPTQ v1/v2 state dict, and the grid of each module whose groups are contiguous."""
    bits = quant.get("bits")
    if bits not in GPTQ_BITS:
        raise CompressError(f"GPTQ checkpoints with {bits} bits cannot be read; readable: {GPTQ_BITS}")
    version = quant.get("checkpoint_format") or quant.get("format") or "gptq"
    if version not in ("gptq", "gptq_v2"):
        raise CompressError(f"GPTQ checkpoint_format '{version}' cannot be read (a kernel-specific repacking, e.g. "
                            f"marlin or bitblas); readable: gptq (v1), gptq_v2. Re-save it with GPTQModel in the "
                            f"gptq format")
    group_size = quant.get("group_size", -1)
    # static_groups: act-order visited the columns in another order but kept the groups in place (compress writes it)
    args = weight_args(bits, group_size, quant.get("sym", True), "weight" if quant.get("static_groups") else None,
                       torch.float16)
    offset = 2 ** (bits - 1)
    dense, grids, scattered = _dense_rest(state), {}, 0
    for key in [k for k in state if k.endswith(".qweight")]:
        module = key.removesuffix(".qweight")
        q = unpack_bitstream(state[key], bits, dim=0).float()  # [in, out]
        zeros = unpack_bitstream(state[f"{module}.qzeros"], bits, dim=1).float()  # [groups, out]
        if version == "gptq":
            zeros = zeros + 1
        scales = state[f"{module}.scales"].float()
        in_features = q.shape[0]
        g_idx = state[f"{module}.g_idx"].long() if f"{module}.g_idx" in state else (
            torch.arange(in_features) // (in_features if group_size == -1 else group_size))
        dense[f"{module}.weight"] = (scales[g_idx] * (q - zeros[g_idx])).T.contiguous()
        contiguous = torch.equal(g_idx, torch.arange(in_features) // (in_features // scales.shape[0]))
        if contiguous:
            grids[module] = WeightQuant(args, scales.T.contiguous(), (zeros - offset).T.to(torch.int8).contiguous())
        else:
            scattered += 1
    if scattered:
        warnings.warn(f"{scattered} act-order GPTQ Linear(s) scatter their groups over the columns (g_idx): loaded "
                      f"as float weights (exactly the checkpoint's values), which every step treats as a float model",
                      stacklevel=3)
    return dense, grids


def awq_bits_and_group(quant: dict) -> tuple[int, int]:
    """An AWQ quantization_config's bits and group size (transformers' names, else AutoAWQ's own)."""
    return quant.get("bits", quant.get("w_bit", 4)), quant.get("group_size", quant.get("q_group_size", 128))


def awq_weights(state: dict[str, torch.Tensor], quant: dict
                ) -> tuple[dict[str, torch.Tensor], dict[str, WeightQuant]]:
    """Dense weights of an AutoAWQ GEMM state dict, and each module's grid (asymmetric 4-bit, contiguous groups)."""
    version = str(quant.get("version", "gemm")).lower()
    bits, group_size = awq_bits_and_group(quant)
    if version != "gemm" or bits != 4:
        raise CompressError(f"AWQ checkpoints in the '{version}' layout with {bits} bits cannot be read; readable: "
                            f"the GEMM layout, 4 bits (AutoAWQ's default)")
    args = weight_args(4, group_size, False, None, torch.float16)
    order = torch.tensor(AWQ_ORDER)

    def unpack(words: torch.Tensor) -> torch.Tensor:  # [rows, out/8] → [rows, out]
        nibbles = unpack_bitstream(words, 4, dim=1).view(words.shape[0], -1, 8)
        columns = torch.empty_like(nibbles)
        columns[:, :, order] = nibbles
        return columns.reshape(words.shape[0], -1)

    dense, grids = _dense_rest(state), {}
    for key in [k for k in state if k.endswith(".qweight")]:
        module = key.removesuffix(".qweight")
        q = unpack(state[key]).float()  # [in, out]
        zeros = unpack(state[f"{module}.qzeros"]).float()  # [groups, out]
        scales = state[f"{module}.scales"].float()
        columns = torch.arange(q.shape[0]) // group_size
        dense[f"{module}.weight"] = (scales[columns] * (q - zeros[columns])).T.contiguous()
        grids[module] = WeightQuant(args, scales.T.contiguous(), (zeros - 8).T.to(torch.int8).contiguous())
    return dense, grids

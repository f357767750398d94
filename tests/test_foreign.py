"""Quantized checkpoints other tools wrote load with the right weights: GPTQ v1/v2 folders packed by AutoGPTQ's own
algorithm (written out independently here: its row loop, including the 3-bit words that straddle), with and
without act-order g_idx, at 2, 3, 4 and 8 bits; AutoAWQ GEMM folders (its column loop and nibble order); and
layouts compress cannot read stop with an error that names them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import compress
from compress.errors import CompressError
from compress.modules import is_quantized

GROUP = 32


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16))


def _grid(linear: torch.nn.Linear, bits: int, act_order: bool, seed: int):
    """Random codes, zero points (>= 1: AutoGPTQ's v1 stores zero − 1 in unsigned words), fp16 scales and g_idx."""
    generator = torch.Generator().manual_seed(seed)
    out_features, in_features = linear.weight.shape
    groups = in_features // GROUP
    g_idx = torch.arange(in_features) // GROUP
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=generator)]
    scales = (torch.rand(groups, out_features, generator=generator) / 20 + 0.01).half()
    zeros = torch.randint(1, 2**bits, (groups, out_features), generator=generator)
    codes = torch.randint(0, 2**bits, (in_features, out_features), generator=generator)
    weight = (scales.float()[g_idx] * (codes - zeros[g_idx]).float()).T  # [out, in]
    return weight, scales, zeros, g_idx


def _autogptq_pack(weight, scales, zeros, g_idx, bits, v1=True):
    """AutoGPTQ's QuantLinear.pack (qlinear_cuda_old), transcribed."""
    scales_f = scales.float()
    scale_zeros = zeros.float() * scales_f
    intweight = torch.stack([torch.round((weight[:, idx] + scale_zeros[g_idx[idx]]) / scales_f[g_idx[idx]]).int()
                             for idx in range(weight.shape[1])], 1).t().contiguous().numpy().astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + (32 // bits)):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    stored = (zeros - 1 if v1 else zeros).numpy().astype(np.uint32)
    qzeros = np.zeros((stored.shape[0], stored.shape[1] // 32 * bits), dtype=np.uint32)
    i = col = 0
    while col < qzeros.shape[1]:
        if bits in (2, 4, 8):
            for j in range(i, i + (32 // bits)):
                qzeros[:, col] |= stored[:, j] << (bits * (j - i))
            i += 32 // bits
            col += 1
        else:
            for j in range(i, i + 10):
                qzeros[:, col] |= stored[:, j] << (3 * (j - i))
            i += 10
            qzeros[:, col] |= stored[:, i] << 30
            col += 1
            qzeros[:, col] |= (stored[:, i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qzeros[:, col] |= stored[:, j] << (3 * (j - i) + 1)
            i += 10
            qzeros[:, col] |= stored[:, i] << 31
            col += 1
            qzeros[:, col] |= (stored[:, i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qzeros[:, col] |= stored[:, j] << (3 * (j - i) + 2)
            i += 10
            col += 1
    as_int32 = lambda a: torch.from_numpy(a.view(np.int32).copy())  # noqa: E731
    return {"qweight": as_int32(qweight), "qzeros": as_int32(qzeros), "scales": scales,
            "g_idx": g_idx.to(torch.int32)}


def _autoawq_pack(weight, scales, zeros):
    """AutoAWQ's WQLinear_GEMM.from_linear packing, transcribed (int64 here, the same 32 bits)."""
    scales_f = scales.float()
    intweight = torch.stack([torch.round((weight[:, idx] + zeros[idx // GROUP] * scales_f[idx // GROUP])
                                         / scales_f[idx // GROUP]).long() for idx in range(weight.shape[1])], 1).t()
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]

    def pack(values):  # [rows, out] -> [rows, out / 8]
        packed = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
        for col in range(values.shape[1] // 8):
            for i in range(8):
                packed[:, col] |= values[:, col * 8 + order_map[i]].long() << (i * 4)
        return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)

    return {"qweight": pack(intweight), "qzeros": pack(zeros), "scales": scales}


@pytest.fixture
def tokenizer_files(tiny_model_dir):
    return [p for p in tiny_model_dir.iterdir() if "token" in p.name]


def _folder(tmp_path, quantization_config, pack, tokenizer_files, seed=0):
    """A Llama folder whose decoder Linears are packed by `pack`; returns it and the weights they stand for."""
    model = _tiny_llama()
    state = dict(model.state_dict())
    expected = {}
    for index, (name, linear) in enumerate((n, m) for n, m in model.named_modules()
                                            if isinstance(m, torch.nn.Linear) and ".layers." in n):
        weight, packed = pack(linear, seed + index)
        expected[name] = weight
        del state[f"{name}.weight"]
        state.update({f"{name}.{key}": value for key, value in packed.items()})
    folder = tmp_path / "foreign"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))
    for file in tokenizer_files:
        shutil.copy(file, folder / file.name)
    return folder, expected


def _check_weights(folder, expected):
    model, _ = compress.load(folder)
    modules = dict(model.named_modules())
    for name, weight in expected.items():
        torch.testing.assert_close(modules[name].weight, weight, atol=1e-6, rtol=1e-6)
    return model


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("version", ["gptq", "gptq_v2"])
def test_gptq_folders_packed_by_autogptq_load_with_the_right_weights(tmp_path, tokenizer_files, bits, version):
    def pack(linear, seed):
        weight, scales, zeros, g_idx = _grid(linear, bits, act_order=False, seed=seed)
        return weight, _autogptq_pack(weight, scales, zeros, g_idx, bits, v1=version == "gptq")

    folder, expected = _folder(tmp_path, {"quant_method": "gptq", "bits": bits, "group_size": GROUP, "sym": False,
                                          "desc_act": False, "checkpoint_format": version}, pack, tokenizer_files)
    model = _check_weights(folder, expected)
    assert is_quantized(model)  # contiguous groups: the grid is kept


@pytest.mark.parametrize("bits", [3, 4])
def test_act_order_gptq_loads_as_float_with_a_warning(tmp_path, tokenizer_files, bits):
    def pack(linear, seed):
        weight, scales, zeros, g_idx = _grid(linear, bits, act_order=True, seed=seed)
        return weight, _autogptq_pack(weight, scales, zeros, g_idx, bits)

    folder, expected = _folder(tmp_path, {"quant_method": "gptq", "bits": bits, "group_size": GROUP, "sym": False,
                                          "desc_act": True}, pack, tokenizer_files)
    with pytest.warns(UserWarning, match="14 act-order GPTQ Linear.* loaded as float weights"):
        model = _check_weights(folder, expected)
    assert not is_quantized(model)


def test_awq_gemm_folders_load_with_the_right_weights(tmp_path, tokenizer_files):
    def pack(linear, seed):
        weight, scales, zeros, _ = _grid(linear, 4, act_order=False, seed=seed)
        return weight, _autoawq_pack(weight, scales, zeros)

    folder, expected = _folder(tmp_path, {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True,
                                          "version": "gemm"}, pack, tokenizer_files)
    model = _check_weights(folder, expected)
    assert is_quantized(model)


@pytest.mark.parametrize("quantization_config,fragment", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quantized as bitsandbytes, which compress cannot read"),
    ({"quant_method": "compressed-tensors", "format": "marlin-24"}, r"compressed-tensors \(marlin-24\)"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "AWQ checkpoints in the 'gemv' layout"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "GPTQ checkpoint_format 'marlin'"),
    ({"quant_method": "gptq", "bits": 5}, "GPTQ checkpoints with 5 bits cannot be read"),
])
def test_layouts_compress_cannot_read_are_named(tmp_path, tokenizer_files, quantization_config, fragment):
    model = _tiny_llama()
    model.save_pretrained(tmp_path)
    for file in tokenizer_files:
        shutil.copy(file, tmp_path / file.name)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    with pytest.raises(CompressError, match=fragment):
        compress.load(tmp_path)


@pytest.mark.parametrize("quantization_config,described", [
    ({"quant_method": "gptq", "bits": 3, "group_size": 128, "desc_act": True, "checkpoint_format": "gptq_v2"},
     "GPTQ v2, 3-bit, group 128, act-order"),
    ({"quant_method": "gptq", "bits": 8, "group_size": -1}, "GPTQ v1, 8-bit, per channel"),
    ({"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "version": "gemm"}, "AWQ GEMM, 4-bit, group 64"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, "compressed-tensors pack-quantized"),
    (None, None),
])
def test_the_report_names_how_an_input_checkpoint_was_quantized(quantization_config, described):
    from compress.quantize.formats import describe_quantized_checkpoint

    assert describe_quantized_checkpoint({"quantization_config": quantization_config}) == described


def test_a_pre_quantized_folder_is_the_start_of_float_steps_after_dequantize(tmp_path, tokenizer_files):
    """A GPTQ folder another tool wrote: evaluated as it is, then dequantized (same weights, no grid), pruned and
    quantized again, through `compress run`; without the dequantize step the recipe is refused with that fix."""
    import os

    from rich.console import Console

    def pack(linear, seed):
        weight, scales, zeros, g_idx = _grid(linear, 4, act_order=False, seed=seed)
        return weight, _autogptq_pack(weight, scales, zeros, g_idx, 4)

    folder, expected = _folder(tmp_path, {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "sym": False},
                               pack, tokenizer_files)

    def run(steps: str):
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(f"name: foreign\nmodel: {folder}\nsteps:\n{steps}\n"
                          f"eval:\n  tasks: [wikitext2]\n  wikitext2: {{seq_len: 64, stride: 64, max_tokens: 512}}\n"
                          f"output_dir: {tmp_path / 'runs'}\n")
        return compress.run(recipe, console=Console(file=open(os.devnull, "w")), show_progress=False)  # noqa: SIM115

    prune = "  - prune: {importance: l2, ratio: 0.5, multiple: 16, uniform: true}"
    with pytest.raises(CompressError,
                       match=r"quantized checkpoint, and prune \(taylor\) need a float model.*- dequantize: \{\}"):
        run(prune)
    report = run(f"  - dequantize: {{}}\n{prune}\n  - quantize: {{method: rtn, bits: 4, group_size: 16}}")
    base, dequantized, pruned, quantized = report["steps"]
    assert base["summary"] == f"base (float32), from a quantized checkpoint: GPTQ v1, 4-bit, group {GROUP}"
    assert dequantized["summary"].startswith("dequantize")
    assert dequantized["wikitext2_perplexity"] == pytest.approx(base["wikitext2_perplexity"], rel=1e-5)
    assert pruned["params"] < dequantized["params"]
    model, _ = compress.load(tmp_path / "runs" / "01-dequantize")
    assert not is_quantized(model)
    modules = dict(model.named_modules())
    for name, weight in expected.items():  # the checkpoint's values, now a float model
        torch.testing.assert_close(modules[name].weight, weight, atol=1e-6, rtol=1e-6)


def test_dequantize_lets_float_steps_follow_a_quantize_step(tmp_path):
    from pydantic import ValidationError

    from compress.recipe import Recipe

    steps = [{"quantize": {"method": "rtn"}}, {"finetune": {}}]
    with pytest.raises(ValidationError, match=r"cannot follow steps.0. .quantize .rtn..*- dequantize: \{\}"):
        Recipe(name="x", model="smollm2-135m", steps=steps)
    recipe = Recipe(name="x", model="smollm2-135m", steps=[steps[0], {"dequantize": {}}, steps[1]])
    assert [step.kind for step in recipe.steps] == ["quantize", "dequantize", "finetune"]

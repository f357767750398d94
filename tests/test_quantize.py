"""RTN on the tiny model: weights land on the grid, the compressed-tensors checkpoint reloads in stock transformers
with the same logits, and shapes that do not fit give a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import compress
from compress.errors import CompressError
from compress.quantize.grid import quantized_linears


def _load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("bits,group_size,sym",
                         [(4, 32, True), (4, 32, False), (8, -1, True), (3, 64, True), (2, 16, False)])
def test_rtn_weights_lie_on_the_grid(tiny_model_dir, bits, group_size, sym):
    model = _load(tiny_model_dir)
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    compress.quantize(model, compress.RTN(bits=bits, group_size=group_size, sym=sym), show_progress=False)
    names = [name for name, _, _ in quantized_linears(model)]
    assert len(names) == 2 * 7 and "lm_head" not in names
    for name, linear, quant in quantized_linears(model):
        w = linear.weight.detach()
        groups = w.reshape(w.shape[0], quant.scale.shape[1], -1)
        # every group holds at most 2^bits distinct values, each an integer multiple of its scale (plus zero point)
        q = groups / quant.scale.unsqueeze(-1) + quant.zero_point.unsqueeze(-1)
        assert torch.allclose(q, q.round(), atol=1e-3)
        assert q.round().min() >= -(2 ** (bits - 1)) and q.round().max() <= 2 ** (bits - 1) - 1
        error = (w - original[name]).abs().max()
        assert 0 < error <= quant.scale.max() * 0.5 + 1e-6  # round-to-nearest: at most half a step off


@pytest.mark.parametrize("sym", [True, False])
def test_checkpoint_reloads_with_the_same_logits(tiny_model_dir, tmp_path, sym):
    """Symmetric: stock transformers. Asymmetric: compress.load (stock transformers mis-sizes the packed zero
    points of asymmetric pack-quantized checkpoints; vllm-project/llm-compressor#1618)."""
    model, tokenizer = compress.load_model(str(tiny_model_dir))
    ids = tokenizer("Round to nearest keeps every weight within half a step.", return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(ids).logits
    compress.quantize(model, compress.RTN(bits=4, group_size=32, sym=sym), show_progress=False)
    with torch.no_grad():
        in_memory = model(ids).logits
    assert not torch.allclose(before, in_memory)
    compress.save_model(model, tokenizer, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["ignore"] == ["lm_head"]
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    reloaded = _load(tmp_path / "q") if sym else compress.load(tmp_path / "q")[0]
    with torch.no_grad():
        after = reloaded(ids).logits
    torch.testing.assert_close(after, in_memory, rtol=0, atol=1e-5)


def test_quantized_checkpoint_is_smaller(tiny_model_dir, tmp_path):
    model, tokenizer = compress.load_model(str(tiny_model_dir))
    compress.save_model(model, tokenizer, tmp_path / "base")
    compress.quantize(model, compress.RTN(bits=4, group_size=32), show_progress=False)
    compress.save_model(model, tokenizer, tmp_path / "q")
    base = (tmp_path / "base" / "model.safetensors").stat().st_size
    quantized = (tmp_path / "q" / "model.safetensors").stat().st_size
    linear_bytes = sum(m.weight.numel() * 4 for _, m, _ in quantized_linears(model))
    # the Linear weights shrink from 32 to ~4.x bits; embeddings stay in float32
    assert base - quantized > 0.8 * linear_bytes


def test_group_size_that_does_not_divide_is_a_clear_error(tiny_model_dir):
    model = _load(tiny_model_dir)
    with pytest.raises(CompressError,
                       match=r"group_size 48 does not divide the input width 64 .* use one of 8, 16, 32, 64, or -1"):
        compress.quantize(model, compress.RTN(bits=4, group_size=48), show_progress=False)
    assert not list(quantized_linears(model))  # nothing was touched


def test_rtn_config_rejects_bad_values():
    with pytest.raises(ValueError):
        compress.RTN(bits=5)
    with pytest.raises(ValueError):
        compress.RTN(group_size=-2)
    with pytest.raises(ValueError):
        compress.RTN(bits=4, block=3)


def test_an_asymmetric_checkpoint_warns_that_stock_transformers_refuses_it(tiny_model_dir, tmp_path):
    """compressed-tensors packs asymmetric zero points, which its stock-transformers loader does not unpack: the save
    says so, compress.load reads the checkpoint exactly, and the stock loader's refusal is the one the warning names
    (if a compressed-tensors release fixes it, this test fails and the warning goes)."""
    from compress.checkpoint import save_model
    from compress.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir))
    compress.quantize(model, compress.RTN(bits=4, group_size=32, sym=False), show_progress=False)
    with pytest.warns(UserWarning, match="use sym: true"):
        save_model(model, tokenizer, tmp_path / "asym")
    ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    loaded, _ = compress.load(tmp_path / "asym")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "asym")

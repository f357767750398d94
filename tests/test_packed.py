"""The packed runtime: int4 (tinygemm), int8 and FP8 Linears built from a saved checkpoint compute what the
dequantized checkpoint computes, hold their weights in fewer bytes, and settings without a kernel say so."""

from __future__ import annotations

import pytest
import torch

import compress
from compress.checkpoint import save_model
from compress.errors import CompressError
from compress.models import load_model
from compress.quantize.packed import packed_kernels, weight_bytes


def _saved(tiny_model_dir, tmp_path, config):
    model, tokenizer = load_model(str(tiny_model_dir))
    compress.quantize(model, config, show_progress=False)
    save_model(model, tokenizer, tmp_path / "q")
    return tmp_path / "q"


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("config,kernel,tolerance", [
    (compress.RTN(bits=4, group_size=32), "int4 tinygemm", 1e-4),
    (compress.RTN(bits=4, group_size=32, sym=False), "int4 tinygemm", 1e-4),  # zero points become offsets
    (compress.RTN(bits=8, group_size=-1), "int8 weight-only", 1e-4),
    (compress.FP8(), "fp8 (simulated matmul)", 1e-5),
])
def test_packed_logits_equal_the_dequantized_checkpoints(tiny_model_dir, tmp_path, config, kernel, tolerance):
    folder = _saved(tiny_model_dir, tmp_path, config)
    dense, _ = compress.load(folder)
    packed, _ = compress.load(folder, runtime="packed")
    assert packed_kernels(packed) == {kernel: 14}  # every decoder Linear of the 2 layers
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.model.layers.modules())
    ids = torch.randint(0, dense.config.vocab_size, (2, 24))
    expected, got = _logits(dense, ids), _logits(packed, ids)
    assert (got - expected).abs().max() <= tolerance * expected.abs().max()
    decoder = lambda m: sum(weight_bytes(layer) for layer in m.model.layers)  # noqa: E731
    assert decoder(packed) < (0.2 if "int4" in kernel else 0.3) * decoder(dense)  # float32 -> 4 or 8 bits + scales


def test_settings_without_a_kernel_stay_dequantized_and_say_so(tiny_model_dir, tmp_path):
    folder = _saved(tiny_model_dir, tmp_path, compress.RTN(bits=3, group_size=32))
    with pytest.warns(UserWarning, match=r"no packed kernel for int3 g32: 14 Linear\(s\) run dequantized"):
        packed, _ = compress.load(folder, runtime="packed")
    assert packed_kernels(packed) == {}


def test_a_packed_model_is_for_inference_only(tiny_model_dir, tmp_path):
    folder = _saved(tiny_model_dir, tmp_path, compress.RTN(bits=4, group_size=32))
    packed, tokenizer = compress.load(folder, runtime="packed")
    with pytest.raises(CompressError, match="packed kernels .* inference only"):
        save_model(packed, tokenizer, tmp_path / "again")
    with pytest.raises(CompressError, match="on a quantized model"):
        compress.finetune(packed, compress.LoRARecovery(steps=1), torch.zeros(4, 8, dtype=torch.long))
    with pytest.raises(CompressError, match="unknown runtime 'fast'; allowed: dequantized, packed"):
        compress.load(folder, runtime="fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packed_int4_on_gpu_equals_dequantized(tiny_model_dir, tmp_path):
    folder = _saved(tiny_model_dir, tmp_path, compress.RTN(bits=4, group_size=32))
    dense, _ = compress.load(folder, dtype="bfloat16", device="cuda")
    packed, _ = compress.load(folder, dtype="bfloat16", device="cuda", runtime="packed")
    assert packed_kernels(packed) == {"int4 tinygemm": 14}
    ids = torch.randint(0, dense.config.vocab_size, (2, 24), device="cuda")
    expected, got = _logits(dense, ids).float(), _logits(packed, ids).float()
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()  # bf16 accumulation order

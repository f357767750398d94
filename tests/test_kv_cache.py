"""FP8 KV cache: scales calibrated as amax / 448 of each layer's cached keys and values, the cache rounded onto the
e4m3 grid under eager and sdpa attention, the checkpoint read by compressed-tensors' parser, compress.load and stock
transformers, and the bytes counted by estimate and bench. References: transformers' own DynamicCache contents, and
compressed-tensors' fake_quantize on a stock model."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from safetensors import safe_open
from transformers import AutoModelForCausalLM, DynamicCache

import compress
from compress.bench import step_folders
from compress.errors import CompressError, RecipeError
from compress.modules import is_packed
from compress.quantize.fp8 import E4M3, E4M3_MAX
from compress.quantize.kv_cache import check_kv_cache, kv_quantized, remove


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tokenizer = compress.load_model(str(tiny_model_dir))
    torch.manual_seed(0)
    calibration = torch.randint(0, len(tokenizer), (4, 24))
    ids = tokenizer("Keys after RoPE and values, eight bits each, as they are cached.", return_tensors="pt").input_ids
    return model, tokenizer, calibration, ids


def _quantized(tiny, scales="per_tensor", weights=None):
    model, tokenizer, calibration, ids = tiny
    model, _ = compress.load_model(str(model.name_or_path))
    if weights is not None:
        compress.quantize(model, weights, show_progress=False)
    compress.quantize_kv_cache(model, compress.KVCache(scales=scales), calibration=calibration, show_progress=False)
    return model


def _cached(model, ids) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    return cache


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("scales", ["per_tensor", "per_head"])
def test_scales_are_the_cached_amax_over_448(tiny, scales):
    model, _, calibration, _ = tiny
    float_cache = _cached(model, calibration)  # transformers' own cache: keys after RoPE, values
    quantized = _quantized(tiny, scales)
    for index, (name, _, quant) in enumerate(kv_quantized(quantized)):
        assert name == f"model.layers.{index}.self_attn"
        for cached, scale in ((float_cache.layers[index].keys, quant.k_scale),
                              (float_cache.layers[index].values, quant.v_scale)):
            dims = (0, 2, 3) if scales == "per_head" else (0, 1, 2, 3)
            expected = cached.abs().amax(dim=dims) / E4M3_MAX
            assert scale.shape == ((2, 1, 1) if scales == "per_head" else (1,))  # compressed-tensors' shapes
            torch.testing.assert_close(scale.flatten(), expected.flatten(), rtol=1e-6, atol=0)


def test_cache_holds_e4m3_values_under_eager_and_sdpa(tiny):
    _, _, _, ids = tiny
    model = _quantized(tiny, "per_head")
    float_logits = None
    by_implementation = {}
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        cache = _cached(model, ids)
        for layer, (_, _, quant) in zip(cache.layers, kv_quantized(model)):
            for cached, scale in ((layer.keys, quant.k_scale), (layer.values, quant.v_scale)):
                on_grid = cached / scale
                assert on_grid.abs().max() <= E4M3_MAX
                torch.testing.assert_close(on_grid.to(E4M3).float(), on_grid, rtol=1e-6, atol=0)
        by_implementation[implementation] = _logits(model, ids)
        # one token at a time through the cache gives the one-forward logits: every read sees the rounded cache
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            steps = [model(ids[:, i:i + 1], cache=cache, use_cache=True).logits for i in range(ids.shape[1])]
        torch.testing.assert_close(torch.cat(steps, dim=1), by_implementation[implementation], rtol=0, atol=1e-5)
    torch.testing.assert_close(by_implementation["eager"], by_implementation["sdpa"], rtol=0, atol=1e-5)
    for _, attention, _ in kv_quantized(model):
        remove(attention)
    float_logits = _logits(model, ids)
    assert not torch.equal(float_logits, by_implementation["sdpa"])  # the cache did get rounded


def _stock_with_reference_cache(folder, ids):
    """Stock transformers' logits with compressed-tensors' own fake_quantize applied to the keys and values written
    to the cache, with the folder's scales and kv_cache_scheme: the reference the quantized cache must match."""
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    scheme = QuantizationArgs.model_validate(config["kv_cache_scheme"])
    with safe_open(folder / "model.safetensors", "pt") as f:
        scales = {key: f.get_tensor(key) for key in f.keys() if key.endswith(("k_scale", "v_scale"))}

    class RoundingCache(DynamicCache):
        def update(self, keys, values, layer_idx, **kwargs):
            prefix = f"model.layers.{layer_idx}.self_attn"
            keys = fake_quantize(keys, scales[f"{prefix}.k_scale"], None, scheme)
            values = fake_quantize(values, scales[f"{prefix}.v_scale"], None, scheme)
            return super().update(keys, values, layer_idx, **kwargs)

    stock = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        plain = stock(ids).logits
        reference = stock(ids, cache=RoundingCache(config=stock.config), use_cache=True).logits
    return stock, plain, reference


@pytest.mark.parametrize("scales, weights", [("per_tensor", None), ("per_head", compress.FP8())])
def test_checkpoint_reloads_and_matches_compressed_tensors(tiny, tmp_path, scales, weights):
    _, tokenizer, _, ids = tiny
    model = _quantized(tiny, scales, weights)
    in_memory = _logits(model, ids)
    folder = tmp_path / "kv"
    compress.save_model(model, tokenizer, folder)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(config)  # compressed-tensors' own parser
    assert parsed.kv_cache_scheme.type == "float" and parsed.kv_cache_scheme.num_bits == 8
    assert parsed.kv_cache_scheme.strategy == {"per_tensor": "tensor", "per_head": "attn_head"}[scales]
    assert not parsed.kv_cache_scheme.dynamic
    assert config["format"] == ("dense" if weights is None else "float-quantized")
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.1.self_attn.v_scale").shape == ((1,) if scales == "per_tensor" else (2, 1, 1))

    reloaded, _ = compress.load(folder)
    assert len(kv_quantized(reloaded)) == 2
    torch.testing.assert_close(_logits(reloaded, ids), in_memory, rtol=0, atol=1e-5)
    packed, _ = compress.load(folder, runtime="packed")  # FP8 weights: built packed from the checkpoint
    assert len(kv_quantized(packed)) == 2 and is_packed(packed) == (weights is not None)
    torch.testing.assert_close(_logits(packed, ids), in_memory, rtol=0, atol=1e-4)

    stock, plain, reference = _stock_with_reference_cache(folder, ids)
    torch.testing.assert_close(reference, in_memory, rtol=0, atol=1e-5)
    # what stock transformers (5.25, compressed-tensors 0.20.1) does itself: it reads the kv_cache_scheme but finds
    # no attention to hook (it looks for a `past_key_values` argument, which transformers renamed `cache`), so it
    # drops k_scale / v_scale and runs a float cache: compress.load's model without its cache quantization
    assert not any(hasattr(m, "k_scale") for m in stock.modules())
    for _, attention, _ in kv_quantized(reloaded):
        remove(attention)
    torch.testing.assert_close(plain, _logits(reloaded, ids), rtol=0, atol=1e-5)


def test_kv_cache_recipe_after_a_weight_step(tiny_recipe):
    recipe = tiny_recipe("  - quantize: {method: fp8}\n  - kv_cache: {scales: per_tensor, calibration: "
                         "{samples: 4, seq_len: 64}}", max_tokens=1024)
    report = compress.run(recipe, show_progress=False)
    rows = {row["step"]: row for row in report["steps"]}
    assert rows["00-base"]["kv_cache"] == "float32" and rows["02-kv_cache"]["kv_cache"] == "fp8 e4m3 per-tensor"
    assert rows["02-kv_cache"]["wikitext2_perplexity"] != rows["01-quantize"]["wikitext2_perplexity"]
    run = recipe.parent / "runs" / "tiny"
    assert "| fp8 e4m3 per-tensor |" in (run / "report.md").read_text()
    assert [folder.name for folder in step_folders(run)] == ["00-base", "01-quantize", "02-kv_cache"]


def test_a_step_after_kv_cache_is_refused(tiny_recipe):
    with pytest.raises(RecipeError, match="put the kv_cache step last"):
        compress.load_recipe(tiny_recipe("  - kv_cache: {}\n  - quantize: {method: rtn, bits: 4, group_size: 32}"))


def test_attention_without_a_cache_argument_is_refused_before_any_work(tiny):
    model, _, calibration, _ = tiny

    class NoCache(torch.nn.Module):  # an attention whose forward takes no cache: nothing to round
        head_dim = 16

        def forward(self, hidden_states, **kwargs):
            return hidden_states, None

    model, _ = compress.load_model(str(model.name_or_path))
    model.model.layers[1].self_attn = NoCache()
    with pytest.raises(CompressError, match=r"model\.layers\.1\.self_attn \(NoCache\).*remove the kv_cache step"):
        compress.quantize_kv_cache(model, compress.KVCache(), calibration=calibration[:, :0], show_progress=False)
    check_kv_cache(compress.load_model(str(tiny[0].name_or_path))[0])  # a stock Llama passes


def test_gptq_format_has_no_place_for_kv_scales(tiny, tmp_path):
    model = _quantized(tiny)
    with pytest.raises(CompressError, match="format compressed-tensors"):
        compress.save_model(model, tiny[1], tmp_path / "gptq", format="gptq")


def test_estimate_and_bench_count_half_the_cache_bytes(tiny, tmp_path):
    from compress.bench import kv_cache_bytes
    from compress.estimate import EstimateConfig, estimate

    model = _quantized(tiny)
    layers, kv_width = 2, 2 * 16  # tiny: 2 KV heads of 16
    assert kv_cache_bytes(model)["bytes_per_token"] == layers * 2 * kv_width * 1
    assert kv_cache_bytes(tiny[0])["bytes_per_token"] == layers * 2 * kv_width * 4  # float32
    assert kv_cache_bytes(model)["bytes_at_context"] == 8192 * layers * 2 * kv_width
    compress.save_model(model, tiny[1], tmp_path / "kv")
    settings = EstimateConfig(context=8192, ratios=())
    counted = estimate(str(tmp_path / "kv"), settings)  # auto: the folder's kv_cache_scheme says fp8
    plain = estimate(str(tiny[0].name_or_path), settings)
    assert counted["kv_cache"]["counted"] == "fp8" and plain["kv_cache"]["counted"] == "bfloat16"
    kv = plain["precisions"]["bf16"]["inference"]["kv_cache"]
    assert kv == 2 * layers * kv_width * 8192 * 2
    assert counted["precisions"]["bf16"]["inference"]["kv_cache"] * 2 == kv


def test_a_recipe_that_would_change_a_quantized_cache_model_stops_before_any_work(tiny, tmp_path):
    compress.save_model(_quantized(tiny), tiny[1], tmp_path / "kv")
    recipe = tmp_path / "after-kv.yaml"
    recipe.write_text(f"name: after-kv\nmodel: {tmp_path / 'kv'}\nsteps:\n  - quantize: {{method: rtn, bits: 8}}\n"
                      f"eval: {{tasks: []}}\noutput_dir: {tmp_path / 'run'}\n")
    with pytest.raises(CompressError, match="runs a quantized KV cache.*quantize \\(rtn\\) would change"):
        compress.run(recipe, show_progress=False)
    assert not any((tmp_path / "run").glob("0*"))


def _qwen2_with_a_key_offset():
    """A random Qwen2 whose first layer's keys carry a large constant on the RoPE pair that barely turns (pair 7 of
    head_dim 16 at rope_theta 1e6 turns 0.18 rad over 32768 positions), as Qwen2.5's k_proj bias makes them."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
                                         max_position_embeddings=32768)).eval()
    with torch.no_grad():
        bias = model.model.layers[0].self_attn.k_proj.bias.view(2, 16)
        bias.normal_(0, 0.5)
        bias[:, 7], bias[:, 15] = 200.0, -150.0
        query_bias = model.model.layers[0].self_attn.q_proj.bias.view(4, 16)
        query_bias[:, 7], query_bias[:, 15] = 10.0, 10.0  # queries that read the pair: its rounding moves the scores
    return model, torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(0))


def test_centred_keys_keep_the_float_model_and_make_the_fp8_cache_exact_again():
    """The offset moves out of the still pair's bias only (the others keep theirs), the float model's logits stay
    but for the pair's small turn (a constant in every key drops out of each query's softmax), and the FP8 cache's
    error, which the offset made large (e4m3 rounds 200 + a small variation to a step of 16), shrinks to what the
    cache costs elsewhere."""
    import copy

    from compress.quantize.kv_cache import centre_keys, centred_key_layers

    model, calibration = _qwen2_with_a_key_offset()
    ids = calibration[:1]
    reference = _logits(model, ids)
    centred = copy.deepcopy(model)
    assert centre_keys(centred, calibration) == [0, 1]
    before = model.model.layers[0].self_attn.k_proj.bias.view(2, 16)
    after = centred.model.layers[0].self_attn.k_proj.bias.view(2, 16)
    moved = (after - before).abs() > 0
    assert moved[:, [7, 15]].all() and not moved[:, [c for c in range(16) if c not in (7, 15)]].any()
    assert after[:, 7].abs().max() < 5 and after[:, 15].abs().max() < 5  # what is left: the mean's variation
    float_change = (_logits(centred, ids) - reference).abs().max().item()

    def fp8_error(centre: bool) -> float:
        quantized = compress.quantize_kv_cache(copy.deepcopy(model), compress.KVCache(centre_keys=centre),
                                               calibration, show_progress=False)
        assert centred_key_layers(quantized) == ({"kv_cache_keys_centred_layers": [0, 1]} if centre else {})
        return (_logits(quantized, ids) - reference).abs().max().item()

    plain, with_centring = fp8_error(False), fp8_error(True)
    assert with_centring < plain / 5, (plain, with_centring)  # here 0.016 against 0.117
    assert float_change < plain / 10  # the pair's small turn over 64 positions: 0.009


def test_centring_leaves_a_model_without_key_bias_alone(tiny):
    from compress.quantize.kv_cache import centre_keys

    model, _, calibration, _ = tiny
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert centre_keys(model, calibration) == []
    assert all(torch.equal(tensor, state[name]) for name, tensor in model.state_dict().items())


def test_centring_under_partial_rope_moves_the_channels_rope_leaves_alone():
    """Phi's RoPE turns only the first partial_rotary_factor of each head's channels: the rest never turn, so their
    offset moves too, and the model's logits stay."""
    import copy

    from transformers import PhiConfig, PhiForCausalLM

    from compress.quantize.kv_cache import centre_keys

    torch.manual_seed(0)
    model = PhiForCausalLM(PhiConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4, partial_rotary_factor=0.5,
                                     max_position_embeddings=2048)).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.bias.view(4, 16)[:, 8:] += 50.0  # the unrotated half of each head
    calibration = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    reference = _logits(model, calibration[:1])
    centred = copy.deepcopy(model)
    assert centre_keys(centred, calibration) == [0]
    moved = (centred.model.layers[0].self_attn.k_proj.bias - model.model.layers[0].self_attn.k_proj.bias).view(4, 16)
    assert (moved[:, 8:].abs() > 40).all()  # the offset left the channels RoPE does not turn
    torch.testing.assert_close(_logits(centred, calibration[:1]), reference, rtol=0,
                               atol=1e-3 * reference.abs().max().item())

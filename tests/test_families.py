"""Model families beyond Llama (compress.architectures): Qwen3, Gemma 3 and Phi-3 (fused projections) prune, recover,
quantize and reload like Llama; MoE models (Mixtral, Qwen3-MoE, Qwen2-MoE) prune whole experts and channels inside
them, quantize every expert, and reload; unknown families stop before any work with the list of what is supported.
Tiny random models whose configs have each family's features (q/k norms, sliding-window layers, soft-capping, fused
projections, experts); only mechanics matter here."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import compress
from compress.architectures import FAMILIES, family
from compress.data import token_stream
from compress.errors import CompressError
from compress.prune import TaylorPrune, prune
from compress.prune.structure import LayerWidths, layer_widths, shrink_attention, shrink_mlp

IDS = torch.randint(0, 500, (4, 32), generator=torch.Generator().manual_seed(1))
COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
FEATURES = {
    "qwen3": dict(),  # q_norm / k_norm over head_dim
    "gemma3_text": dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                        final_logit_softcapping=30.0, query_pre_attn_scalar=16),
    "phi3": dict(pad_token_id=0, eos_token_id=1, bos_token_id=1),  # fused qkv_proj and gate_up_proj
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64),
}
DENSE = ["qwen3", "gemma3_text", "phi3"]


def tiny(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(kind, **COMMON, **FEATURES.get(kind, {}))
    return AutoModelForCausalLM.from_config(config).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_every_family_of_the_table_has_the_layout_it_declares(kind):
    """What the table says of each family is what its model is: pruning's layout check (from the table's attention
    and MLP layouts) accepts a tiny model of it, the table's config fields name the widths the layers have, and q/k
    norms are declared exactly where there are some."""
    from compress.prune.structure import check_supported

    model = tiny(kind)
    known, config = family(model), model.config
    check_supported(model)
    for layer in model.model.layers:
        experts = getattr(config, known.experts_field) if known.experts_field else 0
        width = getattr(config, known.expert_width_field or "intermediate_size")
        shared = getattr(config, known.shared_expert_width_field) if known.shared_expert_width_field else 0
        assert layer_widths(layer, known) == LayerWidths(4, 2, width, experts, shared)
        assert hasattr(layer.self_attn, "q_norm") == hasattr(layer.self_attn, "k_norm") == known.head_norms


@pytest.mark.parametrize("kind", DENSE)
def test_surgery_keeps_the_function_of_what_it_keeps(kind):
    """Silence the heads and channels to be removed (zero their o_proj / down_proj columns): removing them must then
    leave the logits unchanged, with the q/k norms untouched (Phi-3: rows cut out of its fused projections)."""
    from compress.prune.structure import record_widths

    model = tiny(kind)
    query, kv = torch.tensor([1, 2]), torch.tensor([0, 1])  # one query head kept in each KV group
    with torch.no_grad():
        for layer in model.model.layers:
            for head in (0, 3):
                layer.self_attn.o_proj.weight[:, head * 16 : (head + 1) * 16] = 0
            layer.mlp.down_proj.weight[:, 1::2] = 0
    before = logits(model)
    known = family(model)
    for layer in model.model.layers:
        shrink_attention(layer.self_attn, query, kv, fused=known.fused_qkv)
        shrink_mlp(layer.mlp, torch.arange(0, 128, 2), fused=known.fused_gate_up)
    record_widths(model)  # Phi-3 reads its head count from the config
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)
    assert layer_widths(model.model.layers[1], known) == LayerWidths(2, 2, 64)


@pytest.mark.parametrize("kind", DENSE)
def test_uniform_pruning_loads_in_stock_transformers_without_compress(tmp_path, kind):
    model = tiny(kind)
    prune(model, TaylorPrune(ratio=0.5, multiple=16, uniform=True), IDS, show_progress=False)
    assert layer_widths(model.model.layers[0], family(model)) == LayerWidths(2, 2, 64)
    _assert_stock_transformers_reproduces(model, tmp_path)


def _assert_stock_transformers_reproduces(model, tmp_path):
    """Saved with save_pretrained, the model loads in a process where compress cannot be imported, with the same
    logits."""
    model.save_pretrained(tmp_path)
    _assert_stock_transformers_loads(tmp_path, logits(model))


# One process per test process where compress cannot be imported, started on first use: each folder given on its
# stdin is loaded with stock transformers and its logits on the folder's ids.pt saved beside it. (A process per
# folder paid transformers' import, about 5 s of a core, a dozen times in this file.) It ends when its stdin closes.
STOCK_PROCESS = """import sys, torch
sys.modules['compress'] = None  # any import of compress now fails
from transformers import AutoModelForCausalLM
for line in sys.stdin:
    folder = line.rstrip('\\n')
    try:
        m = AutoModelForCausalLM.from_pretrained(folder).eval()
        ids = torch.load(folder + '/ids.pt')
        with torch.no_grad(): torch.save(m(input_ids=ids).logits, folder + '/stock.pt')
        print('@@ok', flush=True)
    except Exception:
        import traceback
        print('@@' + repr(traceback.format_exc()), flush=True)
"""
_stock = {}


def _stock_process() -> subprocess.Popen:
    import atexit
    import tempfile

    process = _stock.get("process")
    if process is None or process.poll() is not None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        _stock["stderr"] = tempfile.TemporaryFile(mode="w+")
        process = _stock["process"] = subprocess.Popen(
            [sys.executable, "-c", STOCK_PROCESS], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=_stock["stderr"], text=True, env=env, cwd=tempfile.gettempdir())
        atexit.register(process.stdin.close)
    return process


def _assert_stock_transformers_loads(tmp_path, expected):
    """The folder loads in a process where compress cannot be imported, and computes `expected` on IDS."""
    torch.save(IDS, tmp_path / "ids.pt")
    process = _stock_process()
    process.stdin.write(f"{tmp_path}\n")
    process.stdin.flush()
    reply = process.stdout.readline()
    while reply and not reply.startswith("@@"):  # anything else the loading printed
        reply = process.stdout.readline()
    reply = reply.strip().removeprefix("@@")
    if not reply:  # the process died: its error output says why
        _stock["stderr"].seek(0)
        reply = _stock["stderr"].read()[-2000:]
    assert reply == "ok", reply
    torch.testing.assert_close(torch.load(tmp_path / "stock.pt"), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", DENSE)
def test_prune_recover_quantize_and_reload(tmp_path, tiny_model_dir, kind):
    """Each family through the steps (Phi-3's fused projections pruned by row ranges and quantized whole)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = tiny(kind)
    prune(model, TaylorPrune(ratio=0.5, multiple=16, uniform=True), IDS, show_progress=False)
    before = logits(model)
    compress.finetune(model, compress.LoRARecovery(steps=2, batch_size=2, lr=1e-3), IDS, show_progress=False)
    assert not torch.equal(logits(model), before)  # the LoRA update was merged back
    compress.quantize(model, compress.GPTQ(bits=4, group_size=16), IDS, show_progress=False)
    compress.save_model(model, tokenizer, tmp_path / "q")
    loaded, _ = compress.load(tmp_path / "q")
    assert type(loaded) is type(model)
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-4, rtol=1e-4)


MOE = ["mixtral", "qwen3_moe", "qwen2_moe"]


def _moe_blocks(model):
    return [layer.mlp for layer in model.model.layers]


@pytest.mark.parametrize("kind", MOE)
def test_expert_pruning_keeps_routing_valid_and_loads_in_stock_transformers(tmp_path, kind):
    model = tiny(kind)
    width = model.model.layers[0].mlp.experts.down_proj.shape[-1] // 2  # ratio 0.5 of each expert's channels
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[1] = 0  # expert 1 of layer 0 contributes nothing: REAP 0
    prune(model, TaylorPrune(ratio=0.5, multiple=16, uniform=True, experts=0.5), IDS, show_progress=False)
    known = family(model)
    for block in _moe_blocks(model):
        assert block.gate.weight.shape[0] == block.experts.gate_up_proj.shape[0] == 2  # router size == experts
        assert block.experts.gate_up_proj.shape[1] == 2 * width and block.experts.down_proj.shape[-1] == width
    assert getattr(model.config, known.experts_field) == 2
    assert getattr(model.config, known.expert_width_field) == width
    assert model.config.num_attention_heads == 2
    if kind == "qwen2_moe":  # the shared expert (64 channels) loses the same share, into its own config field
        assert all(block.shared_expert.down_proj.in_features == 32 for block in _moe_blocks(model))
        assert model.config.shared_expert_intermediate_size == 32
    _assert_stock_transformers_reproduces(model, tmp_path)


@pytest.mark.parametrize("kind", MOE)
def test_the_least_salient_expert_goes_first(kind):
    from compress.prune.experts import expert_saliency

    model = tiny(kind)
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[2] = 0
    saliency = expert_saliency(model, _moe_blocks(model), IDS, show_progress=False)
    assert saliency[0][2] == 0 and (saliency[0][[0, 1, 3]] > 0).all()
    kept = []
    original = model.model.layers[0].mlp.experts.down_proj.detach().clone()
    prune(model, TaylorPrune(importance="l2", ratio=0.01, targets=("attention",), multiple=16, uniform=True,
                             experts=0.25), IDS, show_progress=False)
    for expert in model.model.layers[0].mlp.experts.down_proj:
        kept += [next(e for e in range(4) if torch.equal(original[e], expert))]
    assert kept == [0, 1, 3]  # expert 2 removed, the others in their order


@pytest.mark.parametrize("kind", MOE[:2])
def test_reap_saliency_equals_a_token_by_token_computation(kind):
    """S_j = mean over the tokens routed to j of g_j(x)·‖f_j(x)‖, computed here one token at a time."""
    from compress.prune.experts import expert_saliency

    model = tiny(kind)
    block = model.model.layers[1].mlp
    inputs = {}
    handle = block.register_forward_pre_hook(lambda module, args: inputs.setdefault("x", []).append(args[0]))
    got = expert_saliency(model, [block], IDS, show_progress=False)[0]
    handle.remove()
    totals, counts = torch.zeros(4), torch.zeros(4)
    with torch.no_grad():
        for hidden in inputs["x"]:
            for x in hidden.reshape(-1, hidden.shape[-1]):
                _, weights, experts = block.gate(x[None])
                for weight, expert in zip(weights[0].tolist(), experts[0].tolist()):
                    w_gate, w_up = block.experts.gate_up_proj[expert].chunk(2, dim=0)
                    out = block.experts.down_proj[expert] @ (block.experts.act_fn(w_gate @ x) * (w_up @ x))
                    totals[expert] += weight * out.norm()
                    counts[expert] += 1
    torch.testing.assert_close(got, totals / counts.clamp(min=1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", MOE)
def test_expert_channel_surgery_keeps_the_function_of_what_it_keeps(kind):
    from compress.prune.structure import shrink_experts

    model = tiny(kind)
    block = model.model.layers[1].mlp
    with torch.no_grad():
        block.experts.down_proj[:, :, 1::2] = 0  # the odd channels of every expert are silent
    before = logits(model)
    width = block.experts.down_proj.shape[-1]
    shrink_experts(block, torch.arange(4), torch.arange(0, width, 2).expand(4, -1))
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", MOE)
def test_pruning_the_silent_channels_of_experts_and_shared_expert_keeps_the_logits(kind):
    """Every expert's odd channels (and the shared expert's) have zero weights: l2 importance scores them 0, so
    pruning half the channels removes exactly them, through prune() itself, and the function is unchanged."""
    model = tiny(kind)
    with torch.no_grad():
        for block in _moe_blocks(model):
            width = block.experts.down_proj.shape[-1]
            block.experts.gate_up_proj[:, 1:width:2] = 0
            block.experts.gate_up_proj[:, width + 1::2] = 0
            block.experts.down_proj[:, :, 1::2] = 0
            if kind == "qwen2_moe":
                for linear in (block.shared_expert.gate_proj, block.shared_expert.up_proj):
                    linear.weight[1::2] = 0
                block.shared_expert.down_proj.weight[:, 1::2] = 0
    before = logits(model)
    prune(model, TaylorPrune(importance="l2", ratio=0.5, targets=("mlp",), multiple=8, uniform=True),
          show_progress=False)
    assert all(block.experts.down_proj.shape[-1] == width // 2 for block in _moe_blocks(model))
    if kind == "qwen2_moe":
        assert all(block.shared_expert.down_proj.in_features == 32 for block in _moe_blocks(model))
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", MOE)
def test_estimate_counts_what_moe_pruning_keeps(kind):
    """compress estimate plans the pruned shapes (experts, their channels, a shared expert) without weights: its
    parameter count is the pruned model's."""
    from compress.estimate import shapes

    model = tiny(kind)
    pruning = TaylorPrune(importance="l2", ratio=0.5, multiple=16, uniform=True, experts=0.5)
    planned = shapes(model.config, pruning).params
    prune(model, pruning, IDS, show_progress=False)
    assert planned == sum(p.numel() for p in model.parameters())
    assert shapes(model.config).params == planned  # and the pruned model's own (stock) config counts the same


@pytest.mark.parametrize("kind", MOE)
def test_moe_models_refuse_awq_and_non_uniform_pruning_before_any_work(kind):
    model = tiny(kind)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CompressError, match="prune it with uniform: true"):
        prune(model, TaylorPrune(importance="l2", multiple=16), show_progress=False)
    with pytest.raises(CompressError, match="keeps 1 of 4 experts .*fewer than the 2"):
        prune(model, TaylorPrune(importance="l2", multiple=16, uniform=True, experts=0.75), IDS, show_progress=False)
    with pytest.raises(CompressError, match="norm feeds the router and every expert; AWQ for .* use method: gptq"):
        compress.quantize(model, compress.AWQ(bits=4, group_size=16), IDS, show_progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # nothing was touched
    with pytest.raises(CompressError, match="has none; remove `experts`"):
        prune(tiny("qwen3"), TaylorPrune(importance="l2", multiple=16, uniform=True, experts=0.5), IDS)


def test_phi3_pruning_is_uniform_and_unknown_families_are_clear_errors():
    with pytest.raises(CompressError, match="splits its fused qkv_proj by the config's head count.*uniform: true"):
        prune(tiny("phi3"), TaylorPrune(importance="l2", multiple=16), show_progress=False)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(CompressError, match=f"knows the model families {', '.join(FAMILIES)}.*'gpt2'"):
        compress.quantize(gpt2, compress.RTN(bits=4, group_size=16), show_progress=False)
    # a multimodal wrapper around a known language model says so (Gemma 3 4B and up ship as `gemma3`)
    for config in (_gemma3_multimodal_config(), _gemma3_multimodal_config().to_dict()):
        with pytest.raises(CompressError, match="'gemma3'; it is a multimodal checkpoint whose language model is "
                                                "'gemma3_text': load its folder through compress"):
            family(config)


def _gemma3_multimodal_config():
    return AutoConfig.for_model("gemma3", text_config=dict(COMMON, **FEATURES["gemma3_text"]), mm_tokens_per_image=4,
                                vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=28, patch_size=14),
                                image_token_index=511, boi_token_index=509, eoi_token_index=510)


@pytest.mark.parametrize("layout", ["language_model.model.", "model.language_model."])
def test_a_multimodal_gemma3_folder_loads_its_language_model_which_prunes_to_a_stock_text_model(
        tmp_path, tiny_model_dir, layout):
    """Gemma 3 4B and up ship as `gemma3` (vision tower + language model). compress loads the language model alone:
    on text its logits are the multimodal model's own; it prunes and saves as a stock gemma3_text checkpoint. Both
    key layouts: transformers 5's files (the first) and its module names (the second)."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    multimodal = AutoModelForCausalLM.from_config(_gemma3_multimodal_config()).eval()
    folder = tmp_path / "gemma3"
    multimodal.save_pretrained(folder)
    for file in tiny_model_dir.iterdir():
        if "token" in file.name:
            (folder / file.name).write_bytes(file.read_bytes())
    state = load_file(folder / "model.safetensors")
    save_file({key.replace("language_model.model.", layout): value for key, value in state.items()},
              folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="gemma3 is multimodal: compress loads its language model alone"):
        model, _ = compress.load_model(str(folder))
    assert type(model).__name__ == "Gemma3ForCausalLM" and family(model).name == "Gemma 3 (text)"
    # 1e-3: the multimodal model builds its attention mask itself (a different SDPA path), so the sums differ in
    # the last bits; any wrong tensor would differ by the size of the logits
    torch.testing.assert_close(logits(model), logits(multimodal), atol=1e-3, rtol=1e-3)
    prune(model, TaylorPrune(ratio=0.5, multiple=16, uniform=True), IDS, show_progress=False)
    assert model.config.model_type == "gemma3_text" and model.config.num_attention_heads == 2
    _assert_stock_transformers_reproduces(model, tmp_path / "pruned")


def _count_quantized(model):
    from compress.modules import quantized_linears

    return sum(1 for _ in quantized_linears(model))


@pytest.mark.parametrize("kind", MOE)
def test_experts_as_linears_compute_what_the_fused_block_computes(kind):
    from compress.moe import calibrating_all_experts, unfuse_experts

    model = tiny(kind)
    before = logits(model)
    assert unfuse_experts(model) == 2
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)
    with calibrating_all_experts(model):  # every token through every expert, mixed with weight 0 where not routed
        torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", MOE)
def test_moe_gptq_quantizes_every_expert_keeps_routers_float_and_reloads(tmp_path, tiny_model_dir, kind):
    """GPTQ on per-expert Linears, each calibrated on every token; saved in the family's per-expert layout, which
    compress.load and stock transformers both read back."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = tiny(kind)
    before = logits(model)
    compress.quantize(model, compress.GPTQ(bits=4, group_size=16), IDS, show_progress=False)
    shared = 3 if kind == "qwen2_moe" else 0  # Qwen2-MoE's shared expert is a dense MLP: quantized too
    assert _count_quantized(model) == 2 * (4 + 4 * 3 + shared)  # 2 layers: attention + 4 experts x 3 (+ shared)
    after = logits(model)
    assert (after - before).abs().mean() < 0.1 * before.abs().mean()  # a 4-bit model, not a broken one
    compress.save_model(model, tokenizer, tmp_path / "q")
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as saved:
        keys = set(saved.keys())
    block = "block_sparse_moe" if kind == "mixtral" else "mlp"  # the family's own checkpoint spelling (vLLM reads it)
    assert {f"model.layers.0.{block}.experts.3.{name}.weight_packed" for name in family(model).expert_names} <= keys
    assert f"model.layers.0.{block}.gate.weight" in keys  # the router: float, as it was
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert r"re:.*\.gate$" in config["ignore"]  # vLLM builds routers as Linears: they must be named
    loaded, _ = compress.load(tmp_path / "q")
    assert _count_quantized(loaded) == _count_quantized(model)
    torch.testing.assert_close(logits(loaded), after, atol=1e-4, rtol=1e-4)
    _assert_stock_transformers_loads(tmp_path / "q", after)  # transformers (+ compressed-tensors) fuses them back


@pytest.mark.parametrize("kind", ["qwen3", "gemma3_text", "qwen3_moe"])
def test_distillation_and_qat_train_each_family(kind):
    """A pruned student distilled from its teacher, then QAT with the teacher: both steps move the weights, and the
    QAT result lies on its grid (every expert Linear too)."""
    import copy

    teacher = tiny(kind)
    student = copy.deepcopy(teacher)
    experts = 0.25 if family(student).mlp == "experts" else 0.0
    prune(student, TaylorPrune(ratio=0.5, multiple=16, uniform=True, experts=experts), IDS, show_progress=False)
    before = logits(student)
    compress.distill(student, compress.Distill(steps=2, batch_size=2, lr=1e-3), IDS, teacher, show_progress=False)
    assert not torch.equal(logits(student), before)
    compress.quantize(student, compress.QAT(bits=4, group_size=16, steps=2, batch_size=2, kd=compress.KD()),
                      train_data=IDS, teacher=teacher, show_progress=False)
    expected = sum(1 for name, m in student.named_modules() if isinstance(m, torch.nn.Linear)
                   and name.split(".")[-1] not in ("lm_head", "gate", "shared_expert_gate"))
    assert _count_quantized(student) == expected > 0


@pytest.mark.parametrize("kind", ["qwen3", "mixtral"])
def test_a_recipe_runs_each_family_end_to_end(tmp_path, tiny_model_dir, kind):
    """prune (experts too for MoE) → LoRA recovery → GPTQ → WikiText-2 on each step, through `compress run`; the
    step folders reload, and the last is a 4-bit model of the family."""
    import shutil

    from rich.console import Console
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = AutoConfig.for_model(kind, **{**COMMON, "vocab_size": len(tokenizer)}, **FEATURES[kind])
    torch.manual_seed(0)
    folder = tmp_path / kind
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for file in tiny_model_dir.iterdir():
        if "token" in file.name:
            shutil.copy(file, folder / file.name)
    experts = ", experts: 0.5" if kind == "mixtral" else ""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: {kind}\nmodel: {folder}\nsteps:\n"
        f"  - prune: {{ratio: 0.5, multiple: 16, uniform: true{experts}, calibration: {{samples: 4, seq_len: 64}}}}\n"
        f"  - finetune: {{steps: 2, batch_size: 2, seq_len: 64}}\n"
        f"  - quantize: {{method: gptq, bits: 4, group_size: 16, calibration: {{samples: 8, seq_len: 64}}}}\n"
        f"eval:\n  tasks: [wikitext2]\n  wikitext2: {{seq_len: 64, stride: 64, max_tokens: 1024}}\n"
        f"output_dir: {tmp_path / 'runs'}\n")
    report = compress.run(recipe, console=Console(file=open(os.devnull, "w")), show_progress=False)  # noqa: SIM115
    steps = report["steps"]
    assert [s["step"] for s in steps] == ["00-base", "01-prune", "02-finetune", "03-quantize"]
    assert steps[1]["params"] < steps[0]["params"] and steps[3]["size_bytes"] < steps[2]["size_bytes"]
    # each step's perplexity is its saved model's own loss on the protocol's 16 windows of 64 tokens
    stream = token_stream(tokenizer, "wikitext2-test")[:1024].reshape(16, 64)
    for step in steps:
        saved, _ = compress.load(tmp_path / "runs" / step["step"])
        with torch.no_grad():
            losses = [saved(window[None], labels=window[None]).loss.item() for window in stream]
        assert step["wikitext2_perplexity"] == pytest.approx(math.exp(sum(losses) / 16), rel=1e-4), step["step"]
    assert type(saved).__name__ == type(AutoModelForCausalLM.from_config(config)).__name__
    mlp_linears = 2 * 3 if kind == "mixtral" else 3  # Mixtral: 2 of its 4 experts kept, 3 Linears each
    assert _count_quantized(saved) == 2 * (4 + mlp_linears)  # every Linear of the 2 layers is 4-bit


@pytest.mark.parametrize("name,params", [("qwen3-8b", 8.19e9), ("mixtral-8x7b", 46.70e9), ("phi3-mini", 3.82e9),
                                         ("gemma3-1b", 1.00e9)])
def test_named_shapes_of_the_new_families_have_their_published_sizes(name, params):
    """`{config: NAME, init: random}` and `compress estimate NAME` build these shapes; their parameter counts are the
    published ones (Qwen3-8B 8.19 B, Mixtral-8x7B 46.7 B, Phi-3-mini 3.82 B, Gemma 3 1B 1.00 B)."""
    from compress.estimate import shapes
    from compress.models import architecture_config

    assert shapes(architecture_config(name)).params == pytest.approx(params, rel=0.01)


@pytest.mark.parametrize("save_format", ["compressed-tensors", "gptq"])
def test_a_quantized_moe_folder_runs_packed_and_reloads_from_either_format(tmp_path, tiny_model_dir, save_format):
    from transformers import AutoTokenizer

    from compress.quantize.packed import packed_kernels

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = tiny("mixtral")
    compress.quantize(model, compress.GPTQ(bits=4, group_size=32, format=save_format), IDS, show_progress=False)
    expected = logits(model)
    compress.save_model(model, tokenizer, tmp_path / "q", format=save_format)
    loaded, _ = compress.load(tmp_path / "q")
    torch.testing.assert_close(logits(loaded), expected, atol=1e-4, rtol=1e-4)
    packed, _ = compress.load(tmp_path / "q", dtype="bfloat16", runtime="packed")
    assert packed_kernels(packed) == {"int4 tinygemm": 2 * (4 + 4 * 3)}  # every expert Linear runs packed
    got = logits(packed).float()
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()  # bf16 kernels


def test_moe_gptq_offload_and_chunked_calibration_give_the_resident_result():
    """The MoE path through the layer-by-layer modes (what Mixtral-8x7B needs on one GPU): the same grid points."""
    resident, offloaded = tiny("qwen3_moe"), tiny("qwen3_moe")
    compress.quantize(resident, compress.GPTQ(bits=4, group_size=16), IDS, show_progress=False)
    compress.quantize(offloaded, compress.GPTQ(bits=4, group_size=16, offload=True, batch_tokens=32), IDS,
                      show_progress=False)
    for (name, a), b in zip(resident.named_parameters(), offloaded.parameters()):
        same = (a == b).float().mean().item()
        assert same > 0.99, f"{name}: {same:.3f} of the weights on the same grid point"


def test_a_quantized_moe_dequantizes_to_fused_experts_that_prune():
    model = tiny("mixtral")
    compress.quantize(model, compress.RTN(bits=4, group_size=16), show_progress=False)
    expected = logits(model)
    compress.dequantize(model, compress.Dequantize())
    assert _count_quantized(model) == 0 and model.model.layers[0].mlp.experts.gate_up_proj.dim() == 3
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)
    prune(model, TaylorPrune(importance="l2", ratio=0.5, multiple=16, uniform=True, experts=0.5), IDS,
          show_progress=False)
    assert model.model.layers[0].mlp.gate.weight.shape[0] == 2

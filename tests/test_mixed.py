"""Mixed precision inside one quantize step: overrides give their Linears the grid a uniform run on that grid gives
them, GPTQ solves Linears of one Hessian on different grids as separate solves would, the `keep` budget raises the
Linears a hand-computed probe ranks highest, the checkpoint's config groups load in stock transformers and
compress.load alike with the bytes counted as saved, and bad overrides or budgets are refused before any work."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig
from rich.console import Console
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import compress
from compress.errors import CompressError, RecipeError
from compress.estimate import EstimateConfig, estimate, linear_bytes
from compress.pipeline import run
from compress.quantize.formats import compressed_tensors_state_dict
from compress.quantize.gptq import _solve_group, gptq_solve
from compress.quantize.grid import quantized_linears, weight_args
from compress.recipe import load_recipe

LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")
# the tiny Llama's groups of Linears that read one input, written out by hand
UNITS = [[f"model.layers.{i}.{name}" for name in unit] for i in range(2)
         for unit in (LAYER[:3], LAYER[3:4], LAYER[4:6], LAYER[6:])]


def _grids(model) -> dict[str, tuple]:
    return {name: (q.args.num_bits, q.args.group_size, q.args.symmetric) for name, _, q in quantized_linears(model)}


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: linear.weight.detach().clone() for name, linear, _ in quantized_linears(model)}


def _calibration(tokenizer, samples=4, seq_len=64):
    return torch.randint(0, len(tokenizer), (samples, seq_len), generator=torch.Generator().manual_seed(0))


def test_rtn_overrides_give_each_linear_the_grid_a_uniform_run_gives_it(tiny_model_dir):
    config = compress.RTN(bits=4, group_size=32, overrides=[
        {"match": "*.mlp.down_proj", "bits": 8, "group_size": 64},
        {"match": "model.layers.1.self_attn.[qkv]_proj", "sym": False}])
    uniform = {}
    for key, grid in (("base", compress.RTN(bits=4, group_size=32)), ("down", compress.RTN(bits=8, group_size=64)),
                      ("asym", compress.RTN(bits=4, group_size=32, sym=False))):
        model, _ = compress.load_model(str(tiny_model_dir))
        compress.quantize(model, grid, show_progress=False)
        uniform[key] = _weights(model)
    model, _ = compress.load_model(str(tiny_model_dir))
    compress.quantize(model, config, show_progress=False)
    grids, mixed = _grids(model), _weights(model)
    assert len(grids) == 14
    for name, weight in mixed.items():
        key = ("down" if name.endswith("down_proj") else
               "asym" if name.startswith("model.layers.1.self_attn.") and name[-6] in "qkv" else "base")
        assert torch.equal(weight, uniform[key][name]), name
        assert grids[name] == {"base": (4, 32, True), "down": (8, 64, True), "asym": (4, 32, False)}[key]
    # the bytes counted per Linear are those compressed-tensors' compressor writes (asymmetric: packed zero points)
    state, _ = compressed_tensors_state_dict(model)
    for name, linear, quant in quantized_linears(model):
        written = sum(t.numel() * t.element_size() for k, t in state.items() if k.rsplit(".", 1)[0] == name)
        assert written == linear_bytes(linear.out_features, linear.in_features, *grids[name], 4), name


def test_gptq_solves_linears_of_one_hessian_on_their_own_grids(tiny_model_dir):
    torch.manual_seed(0)
    linears = {name: torch.nn.Linear(64, rows, bias=False) for name, rows in (("q", 64), ("k", 32), ("v", 32))}
    x = torch.randn(512, 64)
    hessian = 2 * x.T @ x / len(x)
    w8, w4 = weight_args(8, 32, True, "weight"), weight_args(4, 32, True, "weight")
    config = compress.GPTQ(bits=4, group_size=32)
    originals = {name: linear.weight.detach().clone() for name, linear in linears.items()}
    with torch.no_grad():
        _solve_group(linears, ["q", "k", "v"], hessian, {"q": w8, "k": w4, "v": w4}, config, "test")
    apart = gptq_solve(originals["q"], hessian, w8, True, 0.01, 128, "q")[0]
    together = gptq_solve(torch.cat([originals["k"], originals["v"]]), hessian, w4, True, 0.01, 128, "kv")[0]
    torch.testing.assert_close(linears["q"].weight.detach(), apart, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.cat([linears["k"].weight, linears["v"].weight]).detach(), together, rtol=0,
                               atol=1e-6)
    # in a model: layer 0's q/k/v see the float inputs whatever the other grids, so W8 there is the uniform W8 run's
    model, tokenizer = compress.load_model(str(tiny_model_dir))
    ids = _calibration(tokenizer)
    compress.quantize(model, compress.GPTQ(bits=4, group_size=32, overrides=[
        {"match": "model.layers.0.self_attn.[qkv]_proj", "bits": 8}]), ids, show_progress=False)
    uniform, _ = compress.load_model(str(tiny_model_dir))
    compress.quantize(uniform, compress.GPTQ(bits=8, group_size=32), ids, show_progress=False)
    mixed, reference, grids = _weights(model), _weights(uniform), _grids(model)
    for name in UNITS[0]:
        torch.testing.assert_close(mixed[name], reference[name], rtol=0, atol=1e-6)
    assert [name for name, grid in grids.items() if grid[0] == 8] == UNITS[0]


def _hand_errors(tiny_model_dir, ids) -> list[float]:
    """Each unit's ||(Q − W) X||² / ||W X||² summed over its Linears: X every Linear's input in a float forward
    (hooks), Q the Linear as a uniform RTN W3 g32 run rounds it."""
    model, _ = compress.load_model(str(tiny_model_dir))
    inputs = {}
    hooks = [module.register_forward_pre_hook(lambda m, a, n=name: inputs.__setitem__(n, a[0].reshape(-1, 64 if
                                                                                          "down" not in n else 128)))
             for name, module in model.named_modules() if any(name.endswith(p) for p in LAYER)]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    float_weights = {name: m.weight.detach().clone() for name, m in model.named_modules() if name in inputs}
    compress.quantize(model, compress.RTN(bits=3, group_size=32), show_progress=False)
    rounded = _weights(model)
    errors = []
    for unit in UNITS:
        changed = sum(((inputs[n] @ (rounded[n] - float_weights[n]).T) ** 2).sum() for n in unit)
        kept = sum(((inputs[n] @ float_weights[n].T) ** 2).sum() for n in unit)
        errors.append((changed / kept).item())
    return errors


def _hand_gains(tiny_model_dir, ids) -> list[float]:
    """Each unit's loss saved by W4 g32 over W3 g32, summed over its Linears: ½ Σ g² ((Q − W) x)² over tokens and
    output channels for each grid, x every Linear's input and g the summed next-token loss's gradient with respect to
    its output in one float forward and backward (hooks, every parameter trainable), Q the Linear as a uniform RTN
    run rounds it."""
    model, _ = compress.load_model(str(tiny_model_dir))
    inputs, outputs = {}, {}

    def keep(module, args, output, name):
        inputs[name] = args[0].detach()
        output.retain_grad()
        outputs[name] = output

    hooks = [module.register_forward_hook(lambda m, a, o, n=name: keep(m, a, o, n))
             for name, module in model.named_modules() if any(name.endswith(p) for p in LAYER)]
    (model(ids, labels=ids).loss * ids.numel()).backward()
    for hook in hooks:
        hook.remove()
    float_weights = {name: m.weight.detach().clone() for name, m in model.named_modules() if name in inputs}
    rounded = {}
    for bits in (3, 4):
        quantized, _ = compress.load_model(str(tiny_model_dir))
        compress.quantize(quantized, compress.RTN(bits=bits, group_size=32), show_progress=False)
        rounded[bits] = _weights(quantized)

    def loss(name, bits):
        change = inputs[name] @ (rounded[bits][name] - float_weights[name]).T
        return 0.5 * (outputs[name].grad.pow(2) * change.pow(2)).sum().item() / ids.numel()

    return [sum(loss(n, 3) - loss(n, 4) for n in unit) for unit in UNITS]


@pytest.mark.parametrize("rank", ["loss", "output"])
def test_budget_keeps_the_linears_a_hand_probe_ranks_highest(tiny_model_dir, rank):
    _, tokenizer = compress.load_model(str(tiny_model_dir))
    ids = _calibration(tokenizer)
    scores = (_hand_gains if rank == "loss" else _hand_errors)(tiny_model_dir, ids)
    model, _ = compress.load_model(str(tiny_model_dir))
    shapes = {name: (m.out_features, m.in_features) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    w3 = {n: linear_bytes(*shapes[n], 3, 32, True, 4) for n in shapes}
    w4 = {n: linear_bytes(*shapes[n], 4, 32, True, 4) for n in shapes}
    extra = {i: sum(w4[n] - w3[n] for n in unit) for i, unit in enumerate(UNITS)}
    order = sorted(range(len(UNITS)), key=lambda i: -scores[i])
    # a byte budget ranked by loss fills by the loss saved per extra byte
    per_byte = sorted(range(len(UNITS)), key=lambda i: -scores[i] / extra[i]) if rank == "loss" else order

    def fill(order, cost, budget):  # best first; a unit that does not fit is passed over
        chosen = []
        for i in order:
            if cost(i) <= budget:
                chosen.append(i)
                budget -= cost(i)
        return chosen

    # with rank loss, a byte budget under which filling by score alone would keep other Linears
    total = sum(w3.values())
    fraction = next(f for f in (0.05, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25) if rank == "output" or
                    set(fill(per_byte, extra.get, f * total)) != set(fill(order, extra.get, f * total)))
    threshold = (scores[order[1]] + scores[order[2]]) / 2
    budgets = {"count": (4, fill(order, lambda i: len(UNITS[i]), 4)),
               "extra_bytes": (fraction, fill(per_byte, extra.get, fraction * total)),
               "above": (threshold, order[:2])}
    for key, (value, expected) in budgets.items():
        model, _ = compress.load_model(str(tiny_model_dir))
        before = {name: p.requires_grad for name, p in model.named_parameters()}
        config = compress.GPTQ(bits=3, group_size=32, keep={key: value, "bits": 4, "rank": rank})
        # the description names a ranking other than the default, so two budgets that rank apart read apart
        assert ("output error" in config.describe()) == (rank == "output"), key
        compress.quantize(model, config, ids, show_progress=False)
        kept = {name for name, grid in _grids(model).items() if grid[0] == 4}
        assert kept == {n for i in expected for n in UNITS[i]}, key
        recorded = model.__dict__["mixed_grids"]["kept"]
        for i in expected:
            assert recorded[", ".join(UNITS[i])] == pytest.approx(scores[i], rel=1e-3)
        assert {name: p.requires_grad for name, p in model.named_parameters()} == before  # the probe restores them


def test_the_loss_probe_reads_only_its_first_sequences(tiny_model_dir):
    """probe_samples: the ranking is the hand probe's on the first sequences alone, not on the whole set."""
    _, tokenizer = compress.load_model(str(tiny_model_dir))
    ids = _calibration(tokenizer, samples=6)
    first, whole = _hand_gains(tiny_model_dir, ids[:2]), _hand_gains(tiny_model_dir, ids)
    assert first != pytest.approx(whole, rel=1e-3)
    model, _ = compress.load_model(str(tiny_model_dir))
    compress.quantize(model, compress.GPTQ(bits=3, group_size=32, keep={"count": 4, "bits": 4, "probe_samples": 2}),
                      ids, show_progress=False)
    for unit, gain in model.__dict__["mixed_grids"]["kept"].items():
        assert gain == pytest.approx(first[[", ".join(u) for u in UNITS].index(unit)], rel=1e-3)


def _quiet_run(recipe):
    return run(recipe, console=Console(quiet=True), show_progress=False)


CALIBRATION = "calibration: {dataset: wikitext2-valid, samples: 4, seq_len: 64}"


def test_mixed_checkpoint_loads_in_stock_transformers_with_its_bytes_counted(tiny_recipe, tmp_path):
    recipe = tiny_recipe("  - quantize: {method: gptq, bits: 3, group_size: 32, keep: {count: 2, bits: 4},\n"
                         "               overrides: [{match: 'model.layers.1.mlp.down_proj', bits: 8}],\n"
                         f"               {CALIBRATION}}}", max_tokens=1024)
    report = _quiet_run(recipe)
    folder = tmp_path / "runs" / "tiny" / "01-quantize"
    step = json.loads((folder / "step.json").read_text())
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    groups = QuantizationConfig.model_validate(config).config_groups  # compressed-tensors' own parser
    saved = {(g.weights.num_bits, g.weights.group_size, g.weights.symmetric): set(g.targets) for g in groups.values()}
    assert saved[(8, 32, True)] == {"model.layers.1.mlp.down_proj"}
    assert len(saved) == 3 and sum(map(len, saved.values())) == 14
    assert set(step["grids"]["W4 g32 sym"]["names"]) == saved[(4, 32, True)]
    assert len(step["kept_by_budget"]["kept"]) >= 1
    # the bytes the step records per grid are those of the saved tensors of its Linears
    with safe_open(folder / "model.safetensors", "pt") as tensors:
        nbytes = {key: tensors.get_slice(key).get_shape() for key in tensors.keys()}
        dtypes = {key: tensors.get_slice(key).get_dtype() for key in tensors.keys()}
    size = {"I32": 4, "F32": 4, "I64": 8, "I8": 1}
    for (bits, group, sym), names in saved.items():
        on_disk = sum(size[dtypes[key]] * torch.Size(shape).numel() for key, shape in nbytes.items()
                      if key.rsplit(".", 1)[0] in names)
        assert step["grids"][f"W{bits} g{group} {'sym' if sym else 'asym'}"]["bytes"] == on_disk
    # compress estimate of the checkpoint counts each grid's Linears as saved
    saved_estimate = estimate(str(folder), EstimateConfig(dtype="float32"))["as_saved"]
    assert saved_estimate["grids"] == {grid: entry["bytes"] for grid, entry in step["grids"].items()}
    file_size = (folder / "model.safetensors").stat().st_size
    assert 0.95 * file_size < saved_estimate["disk"] <= file_size  # the safetensors header is not counted
    markdown = (tmp_path / "runs" / "tiny" / "report.md").read_text()
    assert "## Mixed precision" in markdown and "`model.layers.1.mlp.down_proj`" in markdown
    # the report names the default probe (the model's loss) and what it cost
    assert f"the model's loss saved (nats, 8 calibration sequences), {step['kept_by_budget']['probe_seconds']:g} s" \
        in markdown
    assert report["steps"][1]["grids"] == step["grids"]

    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    ours, _ = compress.load(folder)
    stock = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, ours(ids).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("change,problem", [
    (dict(overrides=[{"match": "*.dense", "bits": 8}]), r"overrides\[0\] \(match '\*.dense'\): matches no Linear"),
    (dict(overrides=[{"match": "*.mlp.*", "bits": 8}, {"match": "*.down_proj", "bits": 4, "sym": False}]),
     r"overrides\[1\] .* model.layers.0.mlp.down_proj is also matched by overrides\[0\]"),
    (dict(overrides=[{"match": "*.v_proj", "bits": 8}]), r"another grid than .*k_proj.*read the same input"),
    (dict(overrides=[{"match": "*.down_proj", "group_size": 96}]), r"group_size 96 does not divide .* 128"),
    (dict(keep={"count": 14, "bits": 4}), r"keeping 14 of the 14 Linears .* keeps them all at W4 g32"),
    (dict(keep={"fraction": 0.01, "bits": 4}), r"fraction 0.01 of 14 Linears keeps none"),
    (dict(keep={"extra_bytes": 0.001, "bits": 4}), r"extra_bytes 0.001 .* less than raising the cheapest"),
    (dict(keep={"extra_bytes": 5, "bits": 8}), r"extra_bytes 5 holds every Linear"),
    (dict(keep={"above": 100.0, "bits": 4}), r"above 100 keeps no Linear \(the probe's loss gains \(nats\) run from"),
    (dict(keep={"above": 100.0, "bits": 4, "rank": "output"}),
     r"above 100 keeps no Linear \(the probe's output errors run from"),
])
def test_bad_overrides_and_budgets_are_refused_naming_them(tiny_model_dir, change, problem):
    model, tokenizer = compress.load_model(str(tiny_model_dir))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(CompressError, match=problem):
        compress.quantize(model, compress.GPTQ(bits=3, group_size=32, **change), _calibration(tokenizer, 2, 32),
                          show_progress=False)
    assert not list(quantized_linears(model))
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_a_recipe_names_the_line_of_a_bad_override_or_budget(tiny_recipe, tmp_path):
    recipe = tiny_recipe("  - quantize: {method: rtn, bits: 4, group_size: 32,\n"
                         "               overrides: [{match: '*.down_proj', bits: 8},\n"
                         "                           {match: '*.typo_proj', bits: 8}]}")
    with pytest.raises(CompressError, match=rf"^{recipe}:6: steps\[0\].quantize.overrides\[1\].match: quantize "
                                            rf"\(rtn\) overrides\[1\] \(match '\*.typo_proj'\): matches no Linear"):
        _quiet_run(recipe)
    assert not (tmp_path / "runs" / "tiny" / "00-base").exists()  # refused before any work
    for step, problem in [
        ("{method: gptq, bits: 3,\n               keep: {bits: 4}}",
         r":5: steps\[0\].quantize.keep: give exactly one budget .*got none"),
        ("{method: rtn, bits: 3,\n               keep: {count: 3, bits: 4}}", r":4: .*rtn does not read"),
        ("{method: gptq, bits: 3, keep: {count: 3, bits: 2}}", r":4: .*keep.s bits 2 are fewer than the step's 3"),
        ("{method: gptq, format: gptq, bits: 4,\n               overrides: [{match: x, bits: 8}]}",
         r"format gptq holds one grid"),
        ("{method: gptq, grid: nvfp4, overrides: [{match: x, bits: 8}]}", r"grid nvfp4 fixes bits"),
    ]:
        with pytest.raises(RecipeError, match=problem):
            load_recipe(tiny_recipe(f"  - quantize: {step}"))

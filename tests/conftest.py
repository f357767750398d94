"""Shared fixtures: a tiny random Llama (GQA) with a small byte-level BPE tokenizer, built offline, for the tests
where only mechanics matter; SmolLM2 (the embedded real model) for the tests where quality matters."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    # Under pytest-xdist (`-n 2`, as CI runs) each worker gets one core's worth of threads: two workers of two
    # threads each on a 2-core machine would oversubscribe it. Subprocesses a test starts inherit the setting.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    elif getattr(config.option, "dist", "no") == "load" and getattr(config.option, "maxschedchunk", 0) is None:
        # `--dist load` first hands each worker a block of consecutive tests, a quarter of its share (60 of ~480
        # tests here): with the long tests first, ONE worker got every real-weights test and ran them alone for 30
        # minutes while the other ran the rest. One test at a time (xdist keeps two queued per worker) makes it
        # greedy longest-first: a worker that finishes a test takes the longest one left.
        config.option.maxschedchunk = 1


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the slow (real-weights) tests")


# Seconds the longest tests take on one worker of two, roughly (the real-weights ones from `pytest --slow -m slow
# --durations=40` on 2 cores, 2026-11-30; the others estimated from a run on a loaded machine): a scheduling hint
# only. Every test here runs before the rest, longest first; with one test handed out at a time (above), each worker
# takes the longest test left when it finishes one, and the short tests fill the ends.
SECONDS = {
    "test_awq_beats_rtn_and_qat_recovery_beats_both_on_smollm2": 300, "test_task_adaptation_on_smollm2": 208,
    "test_distill_and_qat_recipe_on_smollm2": 203, "test_shipped_recipe_runs_end_to_end": 161,
    "test_gptq_recipe_on_smollm2_beats_rtn_and_loads_in_stock_transformers": 145,
    "test_prune_and_recover_recipe_on_smollm2": 124, "test_the_main_job_runs_with_no_data_directory": 121,
    "test_quantize_then_push_example_pushes_to_the_hub": 81, "test_examples_run": 60,
    "test_taylor_pruning_beats_the_baselines_on_smollm2": 60,
    "test_two_processes_give_the_one_process_results_and_resume": 60,
    "test_fp8_on_smollm2_costs_little": 42, "test_fp8_kv_cache_on_smollm2_costs_under_one_percent": 45,
    "test_smoothquant_w8a8_int8_on_smollm2_costs_little": 45,
    "test_eval_change_reevaluates_without_recomputing": 40,
    "test_prune_finetune_quantize_recipe": 40, "test_crash_during_gptq_keeps_earlier_steps_and_resumes": 35,
    "test_a_rank_killed_mid_step_stops_the_run_and_a_rerun_resumes": 35,
    "test_report_marks_significant_changes_and_plots": 30,
    "test_calibrated_quantizers_split_over_processes_give_the_one_process_weights": 25,
    "test_a_recipe_runs_each_family_end_to_end": 25, "test_gptq_step_runs_in_a_recipe_and_saves_its_format": 25,
    "test_rerun_skips_complete_steps_and_change_invalidates_later_ones": 25,
    "test_sigkill_during_second_step_then_resume": 20,
    "test_ranks_with_different_recipes_stop_before_any_work": 15,
    "test_a_rank_that_hangs_is_named_as_a_timeout_not_waited_on_forever": 15,
    "test_a_failure_on_rank_1_inside_gptq_stops_every_rank_with_its_error": 15,
}


def pytest_collection_modifyitems(config, items):
    # the long tests first, longest first (a stable sort: the rest keep their file order, so module fixtures are
    # built once per worker): under xdist the workers start on them and the short tests fill the gaps, instead of one
    # worker finishing a long test alone at the end
    items.sort(key=lambda item: -SECONDS.get(item.originalname, 0))
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from compress.data import load_text

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([load_text("wikitext2-valid")[:200_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama with GQA (4 query heads, 2 KV heads), widths 64 and 128, random weights, saved as a folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = _train_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_recipe(tmp_path, tiny_model_dir):
    """Write a recipe for the tiny model; returns a function (extra YAML lines for steps / eval) -> path."""

    def write(steps: str = "  - quantize: {method: rtn, bits: 4, group_size: 32}", name: str = "tiny",
              max_tokens: int | None = 4096, output_dir: Path | None = None) -> Path:
        out = output_dir or tmp_path / "runs" / name
        limit = f", max_tokens: {max_tokens}" if max_tokens else ""
        text = (f"name: {name}\nmodel: {tiny_model_dir}\nsteps:\n{steps}\n"
                f"eval:\n  tasks: [wikitext2]\n  wikitext2: {{seq_len: 128, stride: 128{limit}}}\n"
                f"output_dir: {out}\n")
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        return path

    return write

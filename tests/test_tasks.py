"""RTE and politeness through lm-eval on the tiny model: answer scoring equals lm-eval's own and a direct
computation, per-label metrics, prompted training examples, the report's paired tests and plot, `compress eval`, and
bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from compress import data
from compress.cli import app
from compress.errors import CompressError
from compress.evaluate import evaluate
from compress.models import load_model
from compress.report import _paired_changes, render_markdown
from compress.stats import mcnemar
from compress.tasks import ChoiceEval, _scorer_class, prompted_examples, score_choice_tasks, task_definition
from compress.training import LabelledPositionsTrainer, pad_right, train, training_examples


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def direct_answer_logprob(model, tokenizer, context: str, answer: str) -> float:
    """Sum of log p(answer tokens | context) from one plain forward pass over the whole sequence."""
    whole = tokenizer(context + answer).input_ids
    n_context = len(tokenizer(context).input_ids)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(n_context, len(whole)))


def test_answer_scorer_equals_lm_eval_hflm(tiny):
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = tiny
    stock = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3)
    ours = _scorer_class()(pretrained=model, tokenizer=tokenizer, batch_size=2)
    ours.show_progress = False
    pairs = [("Request: thanks a lot\nAnswer:", " polite"), ("Request: thanks a lot\nAnswer:", " impolite"),
             ("The cat sat.\nQuestion: A cat sat. True or False?\nAnswer:", " True"),
             ("The cat sat.\nQuestion: A cat sat. True or False?\nAnswer:", " False"),
             ("A longer context with several words in it", " and a continuation of many tokens")]
    requests = [((c, a), *stock._encode_pair(c, a)) for c, a in pairs]
    expected = stock._loglikelihood_tokens(requests)
    got = ours._loglikelihood_tokens(requests)
    for (e_value, e_greedy), (g_value, g_greedy) in zip(expected, got):
        assert g_value == pytest.approx(e_value, abs=1e-4) and g_greedy == e_greedy


def test_politeness_scores_match_a_direct_computation(tiny):
    model, tokenizer = tiny
    limit = 12
    result = score_choice_tasks(model, tokenizer, ["politeness"], ChoiceEval(limit=limit), show_progress=False)
    result = result["politeness"]
    rows = data.load_records("politeness-test")[:limit]
    predicted = []
    for row in rows:
        context = f"Request: {row['text']}\nQuestion: Is this request polite or impolite?\nAnswer:"
        scores = [direct_answer_logprob(model, tokenizer, context, answer) for answer in (" polite", " impolite")]
        predicted.append(["polite", "impolite"][scores.index(max(scores))])
    correct = [p == row["label"] for p, row in zip(predicted, rows)]
    assert result["correct"] == "".join("1" if c else "0" for c in correct)
    assert result["n"] == limit and result["accuracy"] == pytest.approx(sum(correct) / limit)
    assert result["stderr"] == pytest.approx(math.sqrt(result["accuracy"] * (1 - result["accuracy"]) / (limit - 1)))
    golds = [row["label"] for row in rows]
    assert result["majority_baseline"] == max(golds.count("polite"), golds.count("impolite")) / limit
    for label in ("polite", "impolite"):
        tp = sum(p == label and g == label for p, g in zip(predicted, golds))
        per_label = result["per_label"][label]
        assert per_label["support"] == golds.count(label)
        assert per_label["recall"] == pytest.approx(tp / golds.count(label))
        assert per_label["precision"] == pytest.approx(tp / predicted.count(label) if predicted.count(label) else 0)
    assert result["protocol"]["dataset"] == "politeness-test" and result["protocol"]["num_fewshot"] == 0


def test_rte_few_shot_and_a_tokenizer_without_pad_token(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    assert tokenizer.pad_token is None  # the tiny tokenizer has only an end-of-text token
    results = evaluate(model, tokenizer, ["rte"], choice=ChoiceEval(num_fewshot=2, limit=6), show_progress=False)
    rte = results["rte"]
    assert rte["n"] == 6 and len(rte["correct"]) == 6
    assert rte["protocol"]["fewshot_from"] == "rte-train" and rte["protocol"]["num_fewshot"] == 2
    assert sum(v["support"] for v in rte["per_label"].values()) == 6
    assert tokenizer.pad_token is None  # lm-eval's padding token was set for the eval only


def test_unknown_task_lists_the_known_ones(tiny):
    model, tokenizer = tiny
    with pytest.raises(CompressError, match="unknown eval tasks 'mmlu', 'hellaswag'; known: wikitext2, rte, "
                                            "politeness"):
        evaluate(model, tokenizer, ["rte", "mmlu", "hellaswag"])


def test_missing_task_data_names_the_directory(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    data._load.cache_clear()
    try:
        with pytest.raises(CompressError, match=f"politeness-(train|test).*looked in: {tmp_path}.*COMPRESS_DATA_DIR"):
            evaluate(model, tokenizer, ["politeness"], choice=ChoiceEval(limit=2), show_progress=False)
    finally:
        data._load.cache_clear()


def test_prompted_examples_train_only_on_the_answer(tiny):
    _, tokenizer = tiny
    examples = prompted_examples(tokenizer, "politeness-train", seq_len=512)
    rows = data.load_records("politeness-train")
    assert len(examples) == len(rows)
    for example, row in list(zip(examples, rows))[:20]:
        ids, labels = example["input_ids"], example["labels"]
        answer = tokenizer.decode(ids[labels != -100])
        assert answer == f" {row['label']}"
        assert tokenizer.decode(ids) == (f"Request: {row['text']}\nQuestion: Is this request polite or impolite?"
                                         f"\nAnswer: {row['label']}")
    short = prompted_examples(tokenizer, "rte-train", seq_len=16)
    assert max(len(e["input_ids"]) for e in short) == 16  # long prompts lose their first tokens, never the answer
    assert all((e["labels"] != -100).sum() >= 1 for e in short)


def test_training_examples_mix_text_windows_and_task_rows(tiny):
    _, tokenizer = tiny
    examples = training_examples(tokenizer, ("politeness-train", "wikitext2-valid"), seq_len=64)
    prompted = [e for e in examples if (e["labels"] == -100).any()]
    windows = [e for e in examples if not (e["labels"] == -100).any()]
    assert len(prompted) == len(data.load_records("politeness-train"))
    assert windows and all(len(e["input_ids"]) == 64 for e in windows)
    batch = pad_right(examples[:3] + windows[:1])
    assert batch["input_ids"].shape == (4, 64) and (batch["labels"][0, len(examples[0]["input_ids"]):] == -100).all()


def answer_loss(model, examples) -> float:
    from compress.training import labelled_logits

    batch = pad_right(examples)
    with torch.no_grad():
        logits, targets, _ = labelled_logits(model, batch["input_ids"], batch["labels"])
    return torch.nn.functional.cross_entropy(logits.float(), targets).item()


def test_training_on_prompted_rows_learns_the_answers(tiny_model_dir):
    from compress.training import TrainingBudget

    model, tokenizer = load_model(str(tiny_model_dir))
    examples = prompted_examples(tokenizer, "politeness-train", seq_len=128)
    held_out = prompted_examples(tokenizer, "politeness-test", seq_len=128)[:64]
    before = answer_loss(model, held_out)
    model.train()
    train(model, TrainingBudget(steps=60, lr=1e-2, batch_size=8), examples, show_progress=False,
          trainer_class=LabelledPositionsTrainer)
    model.eval()
    after = answer_loss(model, held_out)
    assert before > 4 and after < 1.0, (before, after)  # from ~uniform over 512 tokens to the two answers


def test_report_marks_significant_changes_and_plots(tmp_path):
    from compress.report import plot_tradeoff

    def record(step, correct, size):
        accuracy = correct.count("1") / len(correct)
        return {"step": step, "kind": "quantize", "config": {}, "params": 100, "size_bytes": size,
                "seconds": 1.0, "eval_seconds": 1.0, "peak_rss_bytes": 2**20,
                "metrics": {"rte": {"accuracy": accuracy, "stderr": 0.01, "n": len(correct), "correct": correct,
                                    "majority_baseline": 0.5, "per_label": {}, "seconds": 1.0,
                                    "protocol": {}}}}

    records = [record("00-base", "1" * 90 + "0" * 10, 400 * 2**20),
               record("01-quantize", "1" * 88 + "0" * 12, 200 * 2**20),
               record("02-quantize", "1" * 50 + "0" * 50, 100 * 2**20)]
    changes = _paired_changes(records)
    assert ("00-base", "rte") not in changes
    assert changes["01-quantize", "rte"]["p_value"] == mcnemar([True] * 90 + [False] * 10,
                                                               [True] * 88 + [False] * 12)["p_value"]
    assert changes["02-quantize", "rte"]["against"] == "01-quantize"
    assert changes["02-quantize", "rte"]["lost"] == 38 and changes["02-quantize", "rte"]["p_value"] < 1e-6
    from compress.report import _final_against_earlier, _row

    report = {"recipe": "r", "model": "m", "steps": [_row(r, changes) for r in records], "protocol": {},
              "task_adapted_from": {}, "machine": {"cuda": None, "cpu_threads": 2, "torch": "x", "platform": "y"},
              "final_against_earlier": _final_against_earlier(records)}
    markdown = render_markdown(report, "tradeoff.png")
    assert "(-2.0, p 0.5)" in markdown and "(**-38.0, p " in markdown  # only the large drop is significant
    # the final step against each earlier one: 50 of 90 kept against 00-base (55.6 %), significant
    assert "## 02-quantize against each earlier step" in markdown
    assert "| 00-base | rte | 90.0 | 50.0 | -40.0 | 55.6 % | **" in markdown
    assert plot_tradeoff(report, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recipe_with_task_adaptation_reports_every_task(tiny_recipe, tmp_path):
    from rich.console import Console

    import compress

    recipe = tiny_recipe(steps="  - finetune: {method: lora, lora: {r: 4}, steps: 4, batch_size: 4, seq_len: 96, "
                               "lr: 1.0e-3, data: [politeness-train, rte-train]}\n  - quantize: {method: rtn, bits: 4, "
                               "group_size: 32}")
    text = recipe.read_text().replace("  tasks: [wikitext2]\n", "  tasks: [wikitext2, rte, politeness]\n"
                                      "  choice: {limit: 8}\n")
    recipe.write_text(text)
    report = compress.run(recipe, console=Console(file=open("/dev/null", "w")), show_progress=False)
    out = tmp_path / "runs" / "tiny"
    assert (out / "tradeoff.png").is_file()
    rows = report["steps"]
    assert [set(row["metrics"]) for row in rows] == [{"wikitext2", "rte", "politeness"}] * 3
    assert rows[1]["metrics"]["rte"]["vs_previous"]["against"] == "00-base"
    assert report["task_adapted_from"] == {"politeness": "01-finetune (trained on politeness-train)",
                                           "rte": "01-finetune (trained on rte-train)"}
    markdown = (out / "report.md").read_text()
    assert "| 02-quantize |" in markdown and "![size against every metric" in markdown
    assert "task-adapted from step 01-finetune (trained on rte-train) onward" in markdown
    assert "Majority class" in markdown and "politeness-test" in markdown
    step = json.loads((out / "01-finetune" / "step.json").read_text())
    assert len(step["metrics"]["politeness"]["correct"]) == 8
    # `compress eval` on the saved step folder reproduces the step's own per-row results
    saved = tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["eval", str(out / "02-quantize"), "--tasks", "politeness", "--limit", "8",
                                      "--json", str(saved)])
    assert result.exit_code == 0, result.output
    step = json.loads((out / "02-quantize" / "step.json").read_text())
    assert json.loads(saved.read_text())["politeness"]["correct"] == step["metrics"]["politeness"]["correct"]


def test_compress_eval_command(tiny_model_dir, tmp_path):
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["eval", str(tiny_model_dir), "--tasks", "rte,wikitext2", "--limit", "4",
                                      "--wikitext2-max-tokens", "512", "--json", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert set(saved) == {"rte", "wikitext2"} and saved["rte"]["n"] == 4
    # the folder's model: WikiText-2 is one window of 512 tokens, its perplexity the exp of the model's own loss; RTE's
    # rows are those scored in this process with the same settings
    model, tokenizer = load_model(str(tiny_model_dir))
    ids = data.token_stream(tokenizer, "wikitext2-test")[None, :512]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert saved["wikitext2"]["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert saved["wikitext2"]["protocol"]["tokens_scored"] == 511
    rte = score_choice_tasks(model, tokenizer, ["rte"], ChoiceEval(limit=4), show_progress=False)["rte"]
    assert saved["rte"]["correct"] == rte["correct"] and saved["rte"]["accuracy"] == rte["accuracy"]
    assert "RTE acc %" in result.output and "WikiText-2 ppl" in result.output


@pytest.mark.parametrize("args, message", [
    (["--tasks", "rte,mmlu"], "unknown eval task 'mmlu'; known: wikitext2, rte, politeness"),
    (["--dtype", "float64"], "unknown dtype 'float64'"),
])
def test_compress_eval_bad_input(tiny_model_dir, args, message):
    result = CliRunner().invoke(app, ["eval", str(tiny_model_dir), *args])
    assert result.exit_code == 2 and message in result.output


def test_compress_eval_on_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "notes"), "--tasks", "rte"])
    assert result.exit_code == 2 and "is not a model folder (no config.json)" in result.output


def test_task_definitions_are_lm_eval_yaml_with_our_section():
    for name in ("rte", "politeness"):
        definition = task_definition(name)
        assert definition["task"] == name and definition["output_type"] == "multiple_choice"
        assert set(definition["compress"]) == {"splits", "labels"}

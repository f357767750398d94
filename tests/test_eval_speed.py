"""The evaluators' speed work keeps their numbers: length batches cap the padding and keep every input once and in
order, zero-shot scoring reads no train split and scores the same answers, and the scorer gives the same answers with
the padding cap as with fixed batches."""

from __future__ import annotations

import random

import pytest
import torch

import compress.tasks as tasks
from compress.models import load_model
from compress.tasks import ChoiceEval, _length_batches, _scorer_class, score_choice_tasks


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def test_length_batches_cap_padding_and_batch_size():
    draw = random.Random(0)
    ordered = sorted((tuple(range(draw.randint(1, 300))) for _ in range(500)), key=len, reverse=True)
    for batch_size in (1, 3, 16):
        batches = _length_batches(ordered, batch_size)
        assert [seq for batch in batches for seq in batch] == ordered  # every input once, in order
        for batch in batches:
            assert 1 <= len(batch) <= batch_size
            padded = len(batch[0]) * len(batch)
            # within 2 %, or the batch was under 256 tokens when it took its last input
            assert padded - sum(map(len, batch)) <= 0.02 * padded or len(batch[0]) * (len(batch) - 1) < 256
    # equal lengths fill whole batches; a cap of 1.0 gives the fixed batches of before
    assert [len(b) for b in _length_batches([(1, 2)] * 10, 4)] == [4, 4, 2]
    assert _length_batches(ordered, 16, max_padding=1.0) == [ordered[i : i + 16] for i in range(0, 500, 16)]
    assert [len(b) for b in _length_batches([(1,) * 100, (1,) * 10, (1,) * 10], 4)] == [3]  # 100 tokens: too few
    assert [len(b) for b in _length_batches([(1,) * 300, (1,) * 10], 4)] == [1, 1]


def test_scorer_answers_do_not_depend_on_the_padding_cap(tiny, monkeypatch):
    model, tokenizer = tiny
    scorer = _scorer_class()(pretrained=model, tokenizer=tokenizer, batch_size=8)
    scorer.show_progress = False
    draw = torch.Generator().manual_seed(0)
    requests = []
    for n in (3, 40, 41, 7, 90, 12, 12, 60, 33, 5, 88, 20):
        context = torch.randint(1, len(tokenizer), (n,), generator=draw).tolist()
        requests += [(("c", "a"), context, [5]), (("c", "b"), context, [6, 7])]
    capped = scorer._loglikelihood_tokens(requests)
    monkeypatch.setattr(tasks._length_batches, "__defaults__", (1.0, 0))  # fixed batches of 8, as before
    fixed = scorer._loglikelihood_tokens(requests)
    for (a, greedy_a), (b, greedy_b) in zip(capped, fixed):
        assert a == pytest.approx(b, abs=1e-5) and greedy_a == greedy_b


def _answers(model, tokenizer, store):
    """A scorer class that records every answer it gives under its tokens."""
    base = _scorer_class()

    class Recording(base):
        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            out = super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            store.update({(tuple(r[1]), tuple(r[2])): answer for r, answer in zip(requests, out)})
            return out

    return lambda: Recording


def test_zero_shot_reads_no_train_split_and_scores_the_same(tiny, monkeypatch):
    model, tokenizer = tiny
    assert tasks._lm_eval_config("politeness", None)["training_split"] == "train"  # few-shot still gets it
    assert "training_split" not in tasks._lm_eval_config("politeness", None, fewshot=False)
    read, zero_shot, with_train = [], {}, {}
    load_records = tasks.load_records
    monkeypatch.setattr(tasks, "load_records", lambda name, data_dir=None: read.append(name) or load_records(name,
                                                                                                           data_dir))
    monkeypatch.setattr(tasks, "_scorer_class", _answers(model, tokenizer, zero_shot))
    zero = score_choice_tasks(model, tokenizer, ["rte", "politeness"], ChoiceEval(limit=6), show_progress=False)
    assert sorted(read) == ["politeness-test", "rte-validation"]
    # the train split handed to lm-eval, as before: the same requests, answers and results
    config = tasks._lm_eval_config
    monkeypatch.setattr(tasks, "_lm_eval_config", lambda name, data_dir, fewshot=True: config(name, data_dir))
    monkeypatch.setattr(tasks, "_scorer_class", _answers(model, tokenizer, with_train))
    full = score_choice_tasks(model, tokenizer, ["rte", "politeness"], ChoiceEval(limit=6), show_progress=False)
    assert "politeness-train" in read and "rte-train" in read
    assert zero_shot == with_train and len(zero_shot) == 2 * 6 + 2 * 6
    for name in ("rte", "politeness"):
        assert {k: v for k, v in zero[name].items() if k != "seconds"} == \
            {k: v for k, v in full[name].items() if k != "seconds"}

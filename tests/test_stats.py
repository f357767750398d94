"""Accuracy standard errors and McNemar's exact test against hand-computed values."""

from __future__ import annotations

import math

import pytest

from compress.stats import accuracy, mcnemar


def test_accuracy_and_its_standard_error():
    result = accuracy([True] * 155 + [False] * 122)  # RTE-sized: 277 rows
    p = 155 / 277
    assert result["accuracy"] == pytest.approx(p)
    assert result["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 276))  # about 3 points
    assert 0.029 < result["stderr"] < 0.031
    with pytest.raises(ValueError, match="empty"):
        accuracy([])


def test_mcnemar_exact_p_values():
    before = [True] * 10 + [False] * 2 + [True] * 50
    after = [False] * 10 + [True] * 2 + [True] * 50
    result = mcnemar(before, after)
    assert (result["lost"], result["gained"]) == (10, 2)
    assert result["p_value"] == pytest.approx(2 * (1 + 12 + 66) / 4096)  # 0.0386: a significant drop
    assert mcnemar(before, before)["p_value"] == 1.0  # no discordant samples
    assert mcnemar([True, False], [False, True])["p_value"] == 1.0  # one each way: capped at 1
    with pytest.raises(ValueError, match="same samples"):
        mcnemar([True], [True, False])


def test_final_step_against_each_earlier_step_by_hand():
    from compress.report import _final_against_earlier

    def record(step, correct):
        return {"step": step, "metrics": {"rte": {"accuracy": correct.count("1") / len(correct), "correct": correct},
                                          "wikitext2": {"perplexity": 30.0}}}

    rows = _final_against_earlier([record("00-base", "1111100000"), record("01-finetune", "1111111111"),
                                   record("02-quantize", "1111111100")])
    assert [(r["step"], r["task"]) for r in rows] == [("00-base", "rte"), ("01-finetune", "rte")]
    adapted = rows[1]
    # against 01: 2 lost, 0 gained: p = 2 · (1/2)² = 0.5; 80 % of its accuracy kept
    assert (adapted["lost"], adapted["gained"], adapted["p_value"]) == (2, 0, 0.5)
    assert adapted["kept"] == pytest.approx(0.8) and adapted["delta"] == pytest.approx(-0.2)
    # against 00: rows 5-7 gained, rows 8-9 neither: 0 lost, 3 gained, p = 2 · (1/2)³ = 0.25
    assert (rows[0]["lost"], rows[0]["gained"], rows[0]["p_value"]) == (0, 3, 0.25)

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

"""Statistics for accuracy evals: the standard error of an accuracy, and McNemar's exact test between two models
scored on the same samples (is the drop between two steps larger than chance?)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def accuracy(correct: Sequence[bool]) -> dict:
    """Accuracy and its standard error (the sample standard deviation over sqrt(n), lm-eval's convention)."""
    n = len(correct)
    if n == 0:
        raise ValueError("accuracy of an empty set of samples")
    p = sum(map(bool, correct)) / n
    stderr = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")
    return {"accuracy": p, "stderr": stderr, "n": n}


def mcnemar(before: Sequence[bool], after: Sequence[bool]) -> dict:
    """McNemar's exact test on paired per-sample correctness: only the discordant samples count — `lost` (right
    before, wrong after) and `gained` (wrong before, right after). Under "no change" each discordant sample is a fair
    coin, so the two-sided p-value is twice the binomial tail of the smaller count, capped at 1."""
    if len(before) != len(after):
        raise ValueError(f"paired test needs the same samples: {len(before)} vs {len(after)} results")
    lost = sum(1 for b, a in zip(before, after) if b and not a)
    gained = sum(1 for b, a in zip(before, after) if a and not b)
    discordant = lost + gained
    tail = sum(math.comb(discordant, k) for k in range(min(lost, gained) + 1)) / 2**discordant
    return {"lost": lost, "gained": gained, "p_value": min(1.0, 2 * tail)}

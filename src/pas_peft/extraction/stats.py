"""Accuracy intervals and the paired test between unsteered and steered answers."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from scipy.stats import binomtest

Z_95 = 1.959963984540054


@dataclass(frozen=True)
class Accuracy:
    """An accuracy with its 95% Wilson score interval."""

    correct: int
    total: int
    value: float
    low: float
    high: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PairedComparison:
    """Baseline versus steered answers on the same items, with an exact McNemar test."""

    baseline: Accuracy
    steered: Accuracy
    wrong_to_right: int
    right_to_wrong: int
    mcnemar_p_value: float

    def to_dict(self) -> dict:
        return {
            "baseline": self.baseline.to_dict(),
            "steered": self.steered.to_dict(),
            "gain": self.steered.value - self.baseline.value,
            "wrong_to_right": self.wrong_to_right,
            "right_to_wrong": self.right_to_wrong,
            "mcnemar_p_value": self.mcnemar_p_value,
        }


def accuracy(correct: torch.Tensor) -> Accuracy:
    """Return the accuracy of a boolean vector with its 95% Wilson interval."""
    total = int(correct.numel())
    hits = int(correct.sum())
    low, high = wilson_interval(hits, total)
    return Accuracy(hits, total, hits / total if total else float("nan"), low, high)


def wilson_interval(successes: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """Return the Wilson score interval of a binomial proportion (NaNs when `total` is 0)."""
    if total == 0:
        return float("nan"), float("nan")
    proportion = successes / total
    denominator = 1 + z**2 / total
    centre = (proportion + z**2 / (2 * total)) / denominator
    half_width = z * math.sqrt(proportion * (1 - proportion) / total + z**2 / (4 * total**2)) / denominator
    # At 0 or `total` successes the bound is exactly 0 or 1; the formula leaves a rounding residue there.
    low = 0.0 if successes == 0 else max(0.0, centre - half_width)
    high = 1.0 if successes == total else min(1.0, centre + half_width)
    return low, high


def compare_paired(baseline_correct: torch.Tensor, steered_correct: torch.Tensor) -> PairedComparison:
    """
    Compare two answer sets on the same items.

    The exact McNemar test is a two-sided binomial test on the discordant items: under the null hypothesis
    an item that changes is equally likely to change in either direction.
    """
    if baseline_correct.shape != steered_correct.shape:
        raise ValueError(
            f"Paired answers must cover the same items: got {tuple(baseline_correct.shape)} and "
            f"{tuple(steered_correct.shape)}."
        )
    wrong_to_right = int((~baseline_correct & steered_correct).sum())
    right_to_wrong = int((baseline_correct & ~steered_correct).sum())
    discordant = wrong_to_right + right_to_wrong
    p_value = 1.0 if discordant == 0 else float(binomtest(wrong_to_right, discordant, 0.5).pvalue)
    return PairedComparison(accuracy(baseline_correct), accuracy(steered_correct), wrong_to_right, right_to_wrong, p_value)

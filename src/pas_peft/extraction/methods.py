"""
The three PAS methods, as pure functions from the model's answers to contrast sets.

Each method names the activations whose mean forms the positive side and the negative side of the vector;
the steering vector at a layer is mean(positive) - mean(negative). An activation is identified by a key:

- `("prompt", i)`: the last prompt token of item i, as the model answered it;
- `("answer", i, c)`: the last token of item i's question followed by the text of choice c.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

METHODS = ("pasf", "ipas_all", "ipas_wrong_only")

ActivationKey = tuple


@dataclass(frozen=True)
class ContrastSet:
    positive: tuple[ActivationKey, ...]
    negative: tuple[ActivationKey, ...]


def pasf(labels: Sequence[int], predictions: Sequence[int]) -> ContrastSet:
    """PASf: full prompts the model answered correctly minus full prompts it answered wrongly."""
    correct = [i for i, (label, prediction) in enumerate(zip(labels, predictions)) if label == prediction]
    wrong = [i for i, (label, prediction) in enumerate(zip(labels, predictions)) if label != prediction]
    return ContrastSet(tuple(("prompt", i) for i in correct), tuple(("prompt", i) for i in wrong))


def ipas_all(labels: Sequence[int], predictions: Sequence[int]) -> ContrastSet:
    """iPAS-all: question + correct answer over correct items minus question + chosen wrong answer over wrong items."""
    correct = [i for i, (label, prediction) in enumerate(zip(labels, predictions)) if label == prediction]
    wrong = [i for i, (label, prediction) in enumerate(zip(labels, predictions)) if label != prediction]
    return ContrastSet(
        tuple(("answer", i, labels[i]) for i in correct),
        tuple(("answer", i, predictions[i]) for i in wrong),
    )


def ipas_wrong_only(labels: Sequence[int], predictions: Sequence[int]) -> ContrastSet:
    """iPAS-wrong-only: on wrongly answered items only, question + correct answer minus question + chosen answer."""
    wrong = [i for i, (label, prediction) in enumerate(zip(labels, predictions)) if label != prediction]
    return ContrastSet(
        tuple(("answer", i, labels[i]) for i in wrong),
        tuple(("answer", i, predictions[i]) for i in wrong),
    )


CONTRAST_FUNCTIONS = {"pasf": pasf, "ipas_all": ipas_all, "ipas_wrong_only": ipas_wrong_only}


def contrast_set(method: str, labels: Sequence[int], predictions: Sequence[int]) -> ContrastSet:
    if method not in CONTRAST_FUNCTIONS:
        raise ValueError(f"Unknown method {method!r}: use one of {', '.join(map(repr, METHODS))}.")
    return CONTRAST_FUNCTIONS[method](labels, predictions)


def missing_requirement(method: str, num_correct: int, num_wrong: int) -> str:
    """Return why `method` cannot be fitted from these answer counts, or an empty string if it can."""
    if method == "ipas_wrong_only":
        return "" if num_wrong else "iPAS-wrong-only needs at least one wrongly answered training item"
    needs = []
    if not num_correct:
        needs.append("one correctly answered")
    if not num_wrong:
        needs.append("one wrongly answered")
    if not needs:
        return ""
    name = "PASf" if method == "pasf" else "iPAS-all"
    return f"{name} needs at least {' and '.join(needs)} training item"

"""Steering vectors from contrast sets: mean(positive activations) - mean(negative activations), per layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .methods import ContrastSet


@dataclass
class Activations:
    """
    The activations PAS reads on the training split, per layer.

    `prompt[layer][i]` is item i's last prompt token; `answer[layer][answer_rows[(i, c)]]` is the last token
    of item i's question followed by choice c.
    """

    prompt: dict[int, torch.Tensor]
    answer: dict[int, torch.Tensor] = field(default_factory=dict)
    answer_rows: dict[tuple[int, int], int] = field(default_factory=dict)

    def rows(self, keys: Sequence[tuple]) -> tuple[str, list[int]]:
        """Return which table `keys` live in and their row indices there."""
        kinds = {key[0] for key in keys}
        if len(kinds) != 1:
            raise ValueError(f"A contrast side mixes activation kinds {sorted(kinds)}.")
        kind = kinds.pop()
        if kind == "prompt":
            return kind, [key[1] for key in keys]
        return kind, [self.answer_rows[(key[1], key[2])] for key in keys]


@dataclass
class ContrastSums:
    """Per-layer sums and counts of both sides; sums add up across processes before the division."""

    positive: dict[int, torch.Tensor]
    negative: dict[int, torch.Tensor]
    positive_count: int
    negative_count: int

    def reduced(self, all_sum: Callable[[torch.Tensor], torch.Tensor]) -> "ContrastSums":
        counts = all_sum(torch.tensor([self.positive_count, self.negative_count], dtype=torch.float64))
        return ContrastSums(
            {layer: all_sum(value) for layer, value in self.positive.items()},
            {layer: all_sum(value) for layer, value in self.negative.items()},
            int(counts[0]),
            int(counts[1]),
        )

    def vectors(self) -> dict[int, torch.Tensor]:
        """Return mean(positive) - mean(negative) per layer, in fp32."""
        return {
            layer: (self.positive[layer] / self.positive_count - self.negative[layer] / self.negative_count).float()
            for layer in self.positive
        }


def contrast_sums(contrast: ContrastSet, activations: Activations, layers: Sequence[int]) -> ContrastSums:
    """Sum each side's activations per layer (in float64, so that sums from several processes add exactly)."""
    return ContrastSums(
        _side_sums(contrast.positive, activations, layers),
        _side_sums(contrast.negative, activations, layers),
        len(contrast.positive),
        len(contrast.negative),
    )


def _side_sums(keys: Sequence[tuple], activations: Activations, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    if not keys:
        hidden = next(iter(activations.prompt.values())).shape[-1]
        return {layer: torch.zeros(hidden, dtype=torch.float64) for layer in layers}
    kind, rows = activations.rows(keys)
    table = activations.prompt if kind == "prompt" else activations.answer
    index = torch.tensor(rows)
    return {layer: table[layer].index_select(0, index.to(table[layer].device)).double().sum(0).cpu() for layer in layers}

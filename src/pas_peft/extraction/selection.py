"""The validation sweep table and the choice of layer x strength x method."""

from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import numpy as np
import torch

from .passes import SweepConfig

logger = logging.getLogger(__name__)

# The strengths of the PAS reference grid. They are raw multipliers of the mean-difference vector.
PAPER_STRENGTHS = (0.25, 0.5, 1.0, 4.0, 7.0, 10.0, 13.0, 16.0, 19.0, 22.0, 25.0, 32.0)
DEFAULT_LAYER_COUNT = 10


def default_candidate_layers(num_layers: int, count: int = DEFAULT_LAYER_COUNT) -> list[int]:
    """Spread `count` layers evenly over the middle of the network (from 20% to 80% of its depth)."""
    first = int(math.floor(0.2 * num_layers))
    last = max(int(math.ceil(0.8 * num_layers)) - 1, first)
    count = min(count, last - first + 1)
    return sorted({int(round(value)) for value in np.linspace(first, last, count)})


def sweep_rows(
    configs: Sequence[SweepConfig], config_predictions: torch.Tensor, labels: torch.Tensor
) -> list[dict]:
    """Return one row per configuration with its validation accuracy."""
    correct = (config_predictions == labels[:, None]).sum(dim=0)
    total = int(labels.numel())
    return [
        {
            "method": config.method,
            "layer": config.layer,
            "strength": config.strength,
            "validation_correct": int(correct[index]),
            "validation_total": total,
            "validation_accuracy": int(correct[index]) / total,
        }
        for index, config in enumerate(configs)
    ]


def select_best(rows: Sequence[dict], method: Optional[str] = None) -> dict:
    """
    Return the row with the highest validation accuracy (of `method`, if given).

    Ties go to the smallest absolute strength, then the earliest layer, then the order of `rows`: the weakest
    intervention that reaches the best score.
    """
    candidates = [(index, row) for index, row in enumerate(rows) if method is None or row["method"] == method]
    if not candidates:
        raise ValueError(f"No sweep results for method {method!r}.")
    _, best = min(candidates, key=lambda pair: (-pair[1]["validation_correct"], abs(pair[1]["strength"]), pair[1]["layer"], pair[0]))
    return best


def choose_configuration(rows: Sequence[dict], methods: Sequence[str], baseline_accuracy: float) -> tuple[dict, dict]:
    """
    Return the overall best row and the best row of each method.

    Logs a warning when even the best row does not beat the unsteered validation accuracy; the caller still
    gets it, and the report records `improves_validation: false`.
    """
    best_by_method = {method: select_best(rows, method) for method in methods}
    best = select_best([best_by_method[method] for method in methods])
    if best["validation_accuracy"] <= baseline_accuracy:
        logger.warning(
            "No configuration beat the unsteered validation accuracy (%.3f); the best one (%s, layer %d, strength "
            "%g) reaches %.3f. The adapter is still written, and the report records improves_validation=false.",
            baseline_accuracy, best["method"], best["layer"], best["strength"], best["validation_accuracy"],
        )
    return best, best_by_method

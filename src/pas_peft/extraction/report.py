"""The report of a fit: what `pas_report.json` contains."""

from __future__ import annotations

from typing import Optional

import torch

from ..data import LoadedItems
from .passes import SplitEvaluation
from .stats import accuracy, compare_paired


def build_report(
    *,
    dataset_name: str,
    loaded: Optional[LoadedItems],
    settings: dict,
    split_sizes: dict[str, int],
    dropped: dict[str, int],
    train: dict,
    validation: SplitEvaluation,
    test: SplitEvaluation,
    best: dict,
    best_by_method: dict[str, dict],
    skipped: dict[str, str],
    vectors: dict[str, dict[int, torch.Tensor]],
    wall_time_seconds: dict[str, float],
    processes: int,
    activation_norms: dict[str, float],
    test_letter_shares: Optional[dict] = None,
) -> dict:
    """Assemble the report: data, settings, chosen configuration, per-split accuracies, tests, norms, timing."""
    import peft
    import transformers

    from .. import __version__

    test_by_method = {}
    for index, config in enumerate(test.configs):
        steered = test.config_predictions[:, index] == test.labels
        test_by_method[config.method] = {
            "layer": config.layer,
            "strength": config.strength,
            "validation_accuracy": best_by_method[config.method]["validation_accuracy"],
            **compare_paired(test.correct, steered).to_dict(),
        }
        if test_letter_shares:
            test_by_method[config.method]["letter_shares"] = test_letter_shares["by_method"][config.method]
    validation_baseline = accuracy(validation.correct)
    return {
        "dataset": {
            "name": dataset_name,
            "schema": loaded.schema if loaded is not None else "items",
            "target_behavior": loaded.target_behavior if loaded is not None else None,
            "split_sizes": split_sizes,
            "dropped_too_long": dropped,
        },
        "settings": settings,
        "chosen": {
            "method": best["method"],
            "layer": best["layer"],
            "strength": best["strength"],
            "validation_accuracy": best["validation_accuracy"],
            "improves_validation": best["validation_accuracy"] > validation_baseline.value,
        },
        "train": {"accuracy": train["accuracy"].to_dict(), "letter_shares": train["letter_shares"]},
        "validation": {"baseline": validation_baseline.to_dict(), "best_by_method": best_by_method},
        "test": {
            "by_method": test_by_method,
            "chosen": test_by_method[best["method"]],
            "unsteered_letter_shares": (test_letter_shares or {}).get("unsteered", {}),
        },
        "skipped_methods": skipped,
        "vector_norms": {
            method: {str(layer): float(vector.norm()) for layer, vector in by_layer.items()}
            for method, by_layer in vectors.items()
        },
        "activation_norms": activation_norms,
        "wall_time_seconds": wall_time_seconds,
        "processes": processes,
        "versions": {
            "pas_peft": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
    }

"""
The reference sweep: one example at a time, one full forward pass per example and configuration.

This re-implements the loop of the PAS reference code (batch size 1, a full forward per validation example
for every layer x strength x method) on top of the PAS tuner itself: each configuration is loaded into a
PAS adapter, whose prompt boundary makes it steer the same tokens the fast sweep steers. It is the baseline
of `benchmarks/sweep_speed.py` and the ground truth of the equivalence tests; it is far too slow for real use.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from peft import get_peft_model

from ..config import PASConfig
from ..model import remove_steering
from .passes import SweepConfig
from .scoring import EncodedItem, predict_from_logits


@torch.no_grad()
def reference_sweep(
    model,
    encoded: Sequence[EncodedItem],
    configs: Sequence[SweepConfig],
    vectors: dict[str, dict[int, torch.Tensor]],
    *,
    layers_module: Optional[str] = None,
    activation: str = "residual",
    progress: Optional[Callable[[int], None]] = None,
) -> torch.Tensor:
    """
    Return the (items, configs) predictions of every configuration, computed one example at a time.

    `model` is a plain transformers model; a temporary PAS adapter is added and removed again.
    """
    predictions = torch.empty((len(encoded), len(configs)), dtype=torch.long)
    layers = sorted({config.layer for config in configs})
    peft_model = get_peft_model(
        model, PASConfig(layers=layers, layers_module=layers_module, activation=activation, positions="generated")
    )
    device = model.get_input_embeddings().weight.device
    try:
        for column, config in enumerate(configs):
            # Only the configuration's layer gets a vector; adding exact zeros elsewhere changes nothing.
            vector = vectors[config.method][config.layer]
            peft_model.set_steering_vectors(
                {layer: vector if layer == config.layer else torch.zeros_like(vector) for layer in layers}
            )
            peft_model.set_strength(config.strength)
            for index, item in enumerate(encoded):
                logits = [_row_logits(peft_model, item, row, device) for row in range(len(item.continuations))]
                predictions[index, column] = predict_from_logits(item, logits)[0]
                if progress is not None:
                    progress(1)
    finally:
        remove_steering(model)
        if hasattr(model, "peft_config"):
            del model.peft_config
    return predictions


def _row_logits(peft_model, item: EncodedItem, row: int, device) -> torch.Tensor:
    """Full forward of prefix + continuation `row`; returns the logits at the row's scored positions."""
    tokens = item.prefix + item.continuations[row]
    with peft_model.base_model.prompt_boundary(len(item.prefix) + item.steered_from(row) + 1):
        logits = peft_model(input_ids=torch.tensor([tokens], device=device)).logits[0]
    positions = torch.tensor(item.scored_positions(row), device=logits.device) + len(item.prefix)
    return logits.index_select(0, positions)

"""Scoring a saved PAS adapter on a dataset: unsteered versus steered accuracy on the same items."""

from __future__ import annotations

import logging
from typing import Optional

from ..api import find_pas_tuner
from ..data import load_items
from .batching import default_memory_budget
from .engine import BatchRunner
from .passes import SweepConfig, evaluate_split
from .scoring import ItemEncoder
from .stats import compare_paired

logger = logging.getLogger(__name__)


def evaluate_adapter(
    peft_model,
    tokenizer,
    data,
    *,
    adapter_name: Optional[str] = None,
    strength: Optional[float] = None,
    scoring: Optional[str] = None,
    use_chat_template: Optional[bool] = None,
    seed: int = 0,
    max_samples: Optional[int] = None,
    schema: str = "auto",
    columns=None,
    target_behavior: Optional[str] = None,
    skip_invalid: bool = False,
    batch_size: Optional[int] = None,
) -> dict:
    """
    Score a single-layer PAS adapter on every item of `data` and compare with the unsteered model.

    Scoring mode, chat template and strength default to what the adapter's fit recorded, and so does the A/B
    target when `data` is the dataset the adapter was fitted on.
    """
    tuner = find_pas_tuner(peft_model)
    if tuner is None:
        raise ValueError(f"{type(peft_model).__name__} carries no PAS adapter; load one with pas_peft.from_pretrained.")
    name = tuner._adapter_names(adapter_name)[0]
    config = tuner.peft_config[name]
    summary = config.fit_summary or {}
    scoring = scoring or summary.get("scoring", "likelihood")
    use_chat_template = summary.get("use_chat_template", False) if use_chat_template is None else use_chat_template
    strength = config.strength if strength is None else float(strength)

    vectors = tuner.get_steering_vectors(name)
    if len(vectors) != 1:
        raise ValueError(
            f"Adapter {name!r} steers {len(vectors)} layers; evaluation supports single-layer adapters, as fit_pas "
            "produces."
        )
    layer, vector = next(iter(vectors.items()))

    if target_behavior is None and data == summary.get("dataset_source"):
        target_behavior = summary.get("target_behavior")
    loaded = load_items(
        data, schema=schema, columns=columns, target_behavior=target_behavior, skip_invalid=skip_invalid
    )
    items = list(loaded.items)[:max_samples] if max_samples else list(loaded.items)
    encoder = ItemEncoder(tokenizer, scoring, seed, use_chat_template)
    encoded = [encoder.encode(item) for item in items]

    runner = BatchRunner(peft_model, activation=config.activation, layers_module=config.layers_module)
    if tokenizer.pad_token_id is not None:
        runner.pad_token_id = tokenizer.pad_token_id
    sweep = [SweepConfig("adapter", layer, strength)]
    evaluation = evaluate_split(
        runner,
        encoded,
        configs=sweep,
        vectors={"adapter": {layer: vector}},
        budget_bytes=default_memory_budget(runner.device),
        batch_size=batch_size,
    )
    steered = evaluation.config_predictions[:, 0] == evaluation.labels
    comparison = compare_paired(evaluation.correct, steered)
    logger.info(
        "%s: unsteered %.3f, steered %.3f (%d wrong to right, %d right to wrong, McNemar p=%.3g)",
        loaded.name, comparison.baseline.value, comparison.steered.value, comparison.wrong_to_right,
        comparison.right_to_wrong, comparison.mcnemar_p_value,
    )
    return {
        "dataset": loaded.name,
        "schema": loaded.schema,
        "items": len(items),
        "adapter": name,
        "layer": layer,
        "strength": strength,
        "scoring": scoring,
        **comparison.to_dict(),
    }

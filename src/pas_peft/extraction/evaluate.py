"""Scoring a saved PAS adapter on a dataset: unsteered versus steered accuracy on the same items."""

from __future__ import annotations

import logging
from typing import Optional

from ..api import find_pas_tuner
from ..data import load_items, split_items
from ..data.loading import source_of
from .batching import default_memory_budget
from .engine import BatchRunner
from .passes import SweepConfig, evaluate_split
from .scoring import ItemEncoder, drop_too_long, max_positions
from .stats import compare_paired

logger = logging.getLogger(__name__)


def evaluate_adapter(
    peft_model,
    tokenizer,
    data=None,
    *,
    adapter_name: Optional[str] = None,
    strength: Optional[float] = None,
    scoring: Optional[str] = None,
    use_chat_template: Optional[bool] = None,
    split: Optional[str] = None,
    max_samples: Optional[int] = None,
    schema: str = "auto",
    columns=None,
    target_behavior: Optional[str] = None,
    skip_invalid: bool = False,
    batch_size: Optional[int] = None,
) -> dict:
    """
    Score a single-layer PAS adapter on a dataset and compare with the unsteered model on the same items.

    Scoring mode, chat template, system prompt and strength default to what the adapter's fit recorded. With
    no `data`, the dataset the adapter was fitted on is used. On that dataset, `split="test"` (the default
    there) rebuilds the fit's test split from its recorded seed and proportions, and `split="all"` scores
    every item, training and validation items included. On any other dataset every item is scored.
    """
    tuner = find_pas_tuner(peft_model)
    if tuner is None:
        raise ValueError(f"{type(peft_model).__name__} carries no PAS adapter; load one with pas_peft.from_pretrained.")
    name = tuner._adapter_names(adapter_name)[0]
    config = tuner.peft_config[name]
    summary = config.fit_summary or {}
    scoring = scoring or summary.get("scoring", "likelihood")
    _check_scoring_matches_positions(scoring, config.positions)
    use_chat_template = summary.get("use_chat_template", False) if use_chat_template is None else use_chat_template
    strength = config.strength if strength is None else float(strength)
    layer, vector = _single_layer_vector(tuner, name)
    if summary.get("fitted_on_lora") and not _has_lora(peft_model):
        logger.warning(
            "Adapter %r was fitted on a LoRA model, but this model has no LoRA layers; load the LoRA first "
            "(pas_peft.attach_pas) to score the combination it was fitted for.", name,
        )

    items, loaded, split = _evaluation_items(
        data, summary, split, schema, columns, target_behavior, skip_invalid, max_samples
    )
    seed = summary.get("seed", 0)
    encoder = ItemEncoder(tokenizer, scoring, seed, use_chat_template, summary.get("system_prompt"))
    runner = BatchRunner(peft_model, activation=config.activation, layers_module=config.layers_module)
    encoded, dropped = drop_too_long([encoder.encode(item) for item in items], max_positions(runner.model), "evaluation")
    if tokenizer.pad_token_id is not None:
        runner.pad_token_id = tokenizer.pad_token_id
    evaluation = evaluate_split(
        runner,
        encoded,
        configs=[SweepConfig("adapter", layer, strength)],
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
        "split": split,
        "items": len(encoded),
        "dropped_too_long": dropped,
        "adapter": name,
        "layer": layer,
        "strength": strength,
        "scoring": scoring,
        **comparison.to_dict(),
    }


# Which positions each scoring mode steers, as fit_pas records them in the adapter.
POSITIONS_OF_SCORING = {"letter": "last_prompt", "likelihood": "generated", "likelihood_norm": "generated"}


def _check_scoring_matches_positions(scoring: str, positions: str) -> None:
    """Raise unless the scoring mode steers exactly the tokens the adapter steers."""
    expected = POSITIONS_OF_SCORING.get(scoring)
    if expected is None:
        raise ValueError(f"Invalid scoring {scoring!r}: use one of {', '.join(map(repr, POSITIONS_OF_SCORING))}.")
    if positions != expected:
        compatible = [mode for mode, steered in POSITIONS_OF_SCORING.items() if steered == positions]
        hint = f"use scoring {' or '.join(map(repr, compatible))}" if compatible else "set positions to 'last_prompt' or 'generated'"
        raise ValueError(
            f"The adapter steers positions={positions!r}, but scoring {scoring!r} measures steering of "
            f"positions={expected!r}; {hint}."
        )


def _single_layer_vector(tuner, name: str):
    vectors = tuner.get_steering_vectors(name)
    if len(vectors) != 1:
        raise ValueError(
            f"Adapter {name!r} steers {len(vectors)} layers; evaluation supports single-layer adapters, as fit_pas "
            "produces."
        )
    return next(iter(vectors.items()))


def _evaluation_items(data, summary, split, schema, columns, target_behavior, skip_invalid, max_samples):
    """Load the items to score; rebuild the fit's test split when scoring the fit's own dataset."""
    fitted_source = summary.get("dataset_source")
    if data is None:
        if fitted_source is None:
            raise ValueError("The adapter does not record its dataset; pass the data to score (--data).")
        data = fitted_source
    same_data = fitted_source is not None and source_of(data) == fitted_source
    if split is None:
        split = "test" if same_data else "all"
    if split not in ("test", "all"):
        raise ValueError(f"Invalid split {split!r}: use 'test' or 'all'.")
    if split == "test" and not same_data:
        raise ValueError("split='test' rebuilds the fit's test split, so it needs the dataset the adapter was fitted on.")
    if target_behavior is None and same_data:
        target_behavior = summary.get("target_behavior")

    loaded = load_items(data, schema=schema, columns=columns, target_behavior=target_behavior, skip_invalid=skip_invalid)
    items = list(loaded.items)
    if split == "test":
        items = list(
            split_items(
                items,
                seed=summary.get("seed", 0),
                proportions=summary.get("proportions", (0.6, 0.2, 0.2)),
                max_samples=summary.get("max_samples"),
            ).test
        )
    elif same_data:
        logger.warning("Scoring every item of the fit's dataset, including the items the vector was fitted on.")
    if max_samples:
        items = items[:max_samples]
    return items, loaded, split


def _has_lora(model) -> bool:
    model = model.model if hasattr(model, "pas_model") else model
    return any(type(module).__name__.startswith("Lora") or "lora_A" in dict(module.named_children()) for module in model.modules())

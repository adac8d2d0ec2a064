"""Train / validation / test splits of multiple-choice items: seeded random splits and user-provided ones."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

from .items import MultipleChoiceItem

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "validation", "test")

# Other names datasets use for the validation split.
_VALIDATION_ALIASES = ("validation", "valid", "val", "dev")


@dataclass(frozen=True)
class DatasetSplits:
    """
    Items split into train (fit the steering vector), validation (choose layers and strength) and test (report).

    Args:
        train (`tuple[MultipleChoiceItem, ...]`): Items to fit the steering vector on.
        validation (`tuple[MultipleChoiceItem, ...]`): Items to choose hyperparameters on.
        test (`tuple[MultipleChoiceItem, ...]`): Held-out items for the final score.
    """

    train: tuple[MultipleChoiceItem, ...]
    validation: tuple[MultipleChoiceItem, ...]
    test: tuple[MultipleChoiceItem, ...]

    def sizes(self) -> dict[str, int]:
        """Return the number of items in each split, by split name."""
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def split_items(
    items: Sequence[MultipleChoiceItem],
    *,
    seed: int = 0,
    proportions: Sequence[float] = (0.6, 0.2, 0.2),
    max_samples: Optional[int] = None,
) -> DatasetSplits:
    """
    Shuffle items with a seed and cut them into train, validation and test.

    The items are shuffled with ``random.Random(seed)``, so the same items and seed give the same splits. With
    `max_samples`, only the first `max_samples` shuffled items are kept, before the cut. Split sizes follow
    `proportions` with largest-remainder rounding, so they always add up to the number of items kept.

    Args:
        items: The items to split.
        seed: Seed of the shuffle.
        proportions: Fractions for train, validation and test; three positive numbers that sum to 1.
        max_samples: Maximum number of items kept in total, or `None` to keep all.

    Raises:
        ValueError: if the proportions are invalid, or if there are too few items to give every split at least
            one item.

    Example:

        ```py
        >>> splits = split_items(loaded.items, seed=0, proportions=(0.6, 0.2, 0.2))
        >>> splits.sizes()
        {'train': 370, 'validation': 123, 'test': 123}
        ```
    """
    weights = _checked_proportions(proportions)
    if max_samples is not None:
        _check_max_samples(max_samples)

    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    if max_samples is not None and max_samples < len(shuffled):
        logger.info("Keeping %d of %d items (max_samples=%d, seed=%d)", max_samples, len(shuffled), max_samples, seed)
        shuffled = shuffled[:max_samples]

    sizes = allocate(len(shuffled), weights)
    if min(sizes) == 0:
        named = ", ".join(f"{name} {size}" for name, size in zip(SPLIT_NAMES, sizes))
        raise ValueError(
            f"{len(shuffled)} items are too few for proportions {tuple(proportions)}: the splits would get "
            f"{named} items; use more items (or a larger max_samples) or change the proportions"
        )

    train_end = sizes[0]
    validation_end = sizes[0] + sizes[1]
    splits = DatasetSplits(
        train=tuple(shuffled[:train_end]),
        validation=tuple(shuffled[train_end:validation_end]),
        test=tuple(shuffled[validation_end:]),
    )
    logger.info("Split %d items with seed %d: %s", len(shuffled), seed, splits.sizes())
    return splits


def _checked_proportions(proportions: Sequence[float]) -> tuple[float, float, float]:
    if len(proportions) != 3:
        raise ValueError(
            f"proportions must have 3 entries (train, validation, test), got {len(proportions)}: {tuple(proportions)}"
        )
    if any(not isinstance(value, (int, float)) or math.isnan(value) or value <= 0 for value in proportions):
        raise ValueError(
            f"proportions must be positive numbers, got {tuple(proportions)}; every split needs a share, "
            "for example (0.6, 0.2, 0.2)"
        )
    if not math.isclose(sum(proportions), 1.0, abs_tol=1e-6):
        raise ValueError(
            f"proportions must sum to 1, got {tuple(proportions)} (sum {sum(proportions):g}); "
            "for example (0.6, 0.2, 0.2)"
        )
    return (float(proportions[0]), float(proportions[1]), float(proportions[2]))


def _check_max_samples(max_samples: object) -> None:
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ValueError(f"max_samples must be a positive int or None, got {max_samples!r}")


def allocate(total: int, weights: Sequence[float]) -> list[int]:
    """
    Divide `total` into whole parts proportional to `weights`, by the largest-remainder method.

    The parts sum to `total`. Ties in the remainder go to the earlier part.
    """
    weight_sum = sum(weights)
    exact = [total * weight / weight_sum for weight in weights]
    parts = [math.floor(value) for value in exact]

    by_remainder = sorted(range(len(weights)), key=lambda index: (-(exact[index] - parts[index]), index))
    for index in by_remainder[: total - sum(parts)]:
        parts[index] += 1
    return parts


def splits_from_mapping(
    splits: Mapping[str, Sequence[MultipleChoiceItem]],
    *,
    seed: int = 0,
    max_samples: Optional[int] = None,
) -> DatasetSplits:
    """
    Check user-provided splits and return them as `DatasetSplits`.

    The mapping needs the keys ``"train"``, ``"validation"`` (or ``"valid"``, ``"val"``, ``"dev"``) and
    ``"test"``; other keys are ignored with a log message. Every split must be non-empty and contain only
    `MultipleChoiceItem` objects.

    With `max_samples`, the total is capped by giving each split a share of `max_samples` proportional to its
    size (largest-remainder rounding). Each split keeps that many items, chosen by a shuffle with `seed`, in
    their original order.

    Raises:
        ValueError: if a split is missing or empty, or contains something other than items.
    """
    validation_key = next((key for key in _VALIDATION_ALIASES if key in splits), None)
    keys = {"train": "train", "validation": validation_key, "test": "test"}
    missing = [name for name, key in keys.items() if key not in splits]
    if missing:
        raise ValueError(
            f"the provided splits {sorted(splits)!r} lack {missing!r}; provide train, validation and test, or pass "
            "all items to split_items to cut them with a seed"
        )

    extra = sorted(set(splits) - {"train", validation_key, "test"})
    if extra:
        logger.info("Ignoring the splits %s; only train, %s and test are used", extra, validation_key)

    chosen = {"train": splits["train"], "validation": splits[validation_key], "test": splits["test"]}
    for name, split in chosen.items():
        if len(split) == 0:
            raise ValueError(f"the provided {name} split is empty; every split needs at least one item")
        for position, item in enumerate(split):
            if not isinstance(item, MultipleChoiceItem):
                raise ValueError(
                    f"the provided {name} split contains {type(item).__name__} at position {position}; convert rows "
                    "to MultipleChoiceItem with load_items first"
                )

    if max_samples is not None:
        chosen = _capped(chosen, seed=seed, max_samples=max_samples)

    result = DatasetSplits(**{name: tuple(split) for name, split in chosen.items()})
    logger.info("Using the provided splits: %s", result.sizes())
    return result


def _capped(
    splits: dict[str, Sequence[MultipleChoiceItem]], *, seed: int, max_samples: int
) -> dict[str, Sequence[MultipleChoiceItem]]:
    _check_max_samples(max_samples)

    total = sum(len(split) for split in splits.values())
    if max_samples >= total:
        return splits

    shares = allocate(max_samples, [len(split) for split in splits.values()])
    if min(shares) == 0:
        named = ", ".join(f"{name} {share}" for name, share in zip(splits, shares))
        raise ValueError(
            f"max_samples={max_samples} is too small for splits of sizes "
            f"{[len(split) for split in splits.values()]}: the splits would keep {named} items; raise max_samples"
        )

    capped = {}
    for (name, split), share in zip(splits.items(), shares):
        kept = sorted(random.Random(seed).sample(range(len(split)), share))
        capped[name] = [split[index] for index in kept]
    logger.info("Keeping %d of %d provided items (max_samples=%d, seed=%d)", max_samples, total, max_samples, seed)
    return capped

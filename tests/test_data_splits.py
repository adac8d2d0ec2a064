"""Tests for seeded train / validation / test splits and for user-provided splits."""

from __future__ import annotations

import random
from pathlib import Path

import datasets
import pytest

from pas_peft.data import MultipleChoiceItem, load_items, split_items, splits_from_mapping
from pas_peft.data.splits import allocate

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def make_items(count: int, prefix: str = "q") -> list[MultipleChoiceItem]:
    return [
        MultipleChoiceItem(f"{prefix} {index}?", ("no", "yes"), index % 2, f"{prefix} row {index}")
        for index in range(count)
    ]


@pytest.mark.parametrize(
    ("count", "expected"),
    [
        (10, {"train": 6, "validation": 2, "test": 2}),
        # 4.2 / 1.4 / 1.4: floors 4 / 1 / 1, the leftover item goes to the first largest remainder (validation).
        (7, {"train": 4, "validation": 2, "test": 1}),
        (616, {"train": 370, "validation": 123, "test": 123}),
    ],
)
def test_split_sizes(count, expected):
    assert split_items(make_items(count)).sizes() == expected


def test_split_is_seeded_shuffle():
    items = make_items(20)
    expected = list(items)
    random.Random(5).shuffle(expected)

    splits = split_items(items, seed=5, proportions=(0.5, 0.25, 0.25))

    assert list(splits.train) == expected[:10]
    assert list(splits.validation) == expected[10:15]
    assert list(splits.test) == expected[15:]


def test_split_is_partition():
    items = make_items(50)

    splits = split_items(items, seed=3)
    together = splits.train + splits.validation + splits.test

    assert len(together) == 50
    assert set(together) == set(items)


def test_split_deterministic_per_seed():
    items = make_items(50)

    assert split_items(items, seed=1) == split_items(items, seed=1)
    assert split_items(items, seed=1).train != split_items(items, seed=2).train


def test_split_max_samples_caps_before_cut():
    items = make_items(100)
    expected = list(items)
    random.Random(0).shuffle(expected)

    splits = split_items(items, seed=0, max_samples=10)

    assert splits.sizes() == {"train": 6, "validation": 2, "test": 2}
    assert splits.train + splits.validation + splits.test == tuple(expected[:10])


def test_split_max_samples_above_count_keeps_all():
    assert sum(split_items(make_items(10), max_samples=1000).sizes().values()) == 10


def test_split_too_few_items():
    with pytest.raises(ValueError) as error:
        split_items(make_items(2))

    message = str(error.value)
    assert "2 items are too few for proportions (0.6, 0.2, 0.2)" in message
    assert "train 1, validation 1, test 0" in message
    assert "use more items" in message


def test_split_max_samples_too_small():
    with pytest.raises(ValueError, match="2 items are too few"):
        split_items(make_items(100), max_samples=2)


@pytest.mark.parametrize(
    ("proportions", "message"),
    [
        ((0.6, 0.3, 0.2), "must sum to 1"),
        ((0.8, 0.4, -0.2), "must be positive"),
        ((1.0, 0.0, 0.0), "must be positive"),
        ((0.5, 0.5), "must have 3 entries"),
    ],
)
def test_split_rejects_bad_proportions(proportions, message):
    with pytest.raises(ValueError, match=message):
        split_items(make_items(100), proportions=proportions)


@pytest.mark.parametrize("max_samples", [0, -3, 2.5, True])
def test_split_rejects_bad_max_samples(max_samples):
    with pytest.raises(ValueError, match="max_samples must be a positive int"):
        split_items(make_items(100), max_samples=max_samples)


def test_allocate_sums_to_total():
    # 0.29 * 100 is 28.999999999999996 in floating point; largest-remainder rounding still gives 29.
    assert allocate(100, [0.29, 0.36, 0.35]) == [29, 36, 35]
    assert allocate(3, [1, 1, 1]) == [1, 1, 1]


def test_provided_splits_accepted():
    train, validation, test = make_items(4, "t"), make_items(2, "v"), make_items(3, "s")

    splits = splits_from_mapping({"train": train, "dev": validation, "test": test, "extra": make_items(1, "x")})

    assert splits.train == tuple(train)
    assert splits.validation == tuple(validation)
    assert splits.test == tuple(test)


def test_provided_splits_missing_one():
    with pytest.raises(ValueError, match=r"the provided splits \['test', 'train'\] lack \['validation'\]"):
        splits_from_mapping({"train": make_items(2), "test": make_items(2)})


def test_provided_splits_empty_one():
    with pytest.raises(ValueError, match="the provided test split is empty"):
        splits_from_mapping({"train": make_items(2), "validation": make_items(2), "test": []})


def test_provided_splits_need_items():
    with pytest.raises(ValueError, match="train split contains dict at position 0.*load_items"):
        splits_from_mapping({"train": [{"question": "Q?"}], "validation": make_items(1), "test": make_items(1)})


def test_provided_splits_max_samples():
    train, validation, test = make_items(6, "t"), make_items(2, "v"), make_items(2, "s")

    splits = splits_from_mapping({"train": train, "validation": validation, "test": test}, max_samples=5, seed=0)

    # 5 items shared 6:2:2 is 3 / 1 / 1; each split keeps a subset in its original order.
    assert splits.sizes() == {"train": 3, "validation": 1, "test": 1}
    positions = [train.index(item) for item in splits.train]
    assert positions == sorted(positions)
    assert set(splits.validation) <= set(validation)


def test_dataset_dict_splits_round_trip():
    rows = [
        {"question": f"Question {index}?", "choices": ["no", "yes"], "label": index % 2} for index in range(6)
    ]
    dataset_dict = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:3]),
            "validation": datasets.Dataset.from_list(rows[3:5]),
            "test": datasets.Dataset.from_list(rows[5:]),
        }
    )

    loaded = load_items(dataset_dict, name="toy")
    splits = splits_from_mapping(loaded.splits)

    assert [item.question for item in splits.train] == ["Question 0?", "Question 1?", "Question 2?"]
    assert [item.question for item in splits.validation] == ["Question 3?", "Question 4?"]
    assert [item.question for item in splits.test] == ["Question 5?"]


def test_bundled_set_splits():
    loaded = load_items("bbq_age")

    splits = split_items(loaded.items, seed=0, max_samples=100)

    assert splits.sizes() == {"train": 60, "validation": 20, "test": 20}

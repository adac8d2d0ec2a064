"""
`fit_pas` end to end on a tiny Llama and a tokenizer trained in-test.

The three PAS methods, the sweep and the test-split report are checked against a hand computation: full
forward passes at batch size 1 with `output_hidden_states=True`, and a forward hook for steering. The token
ids of each scored sequence come from `ItemEncoder`, which defines what the model is shown.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import peft
import pytest
import scipy.stats
import torch
import transformers
from peft import PeftModel

import pas_peft
from conftest import reference_steering
from pas_peft import fit_pas
from pas_peft.data import ColumnMapping, MultipleChoiceItem, split_items
from pas_peft.extraction.scoring import ItemEncoder
from tiny import make_items, make_tiny_model, make_tokenizer, relabel

METHODS = ("pasf", "ipas_all", "ipas_wrong_only")
# transformers 5.25 puts the final-norm output in the last entry of `hidden_states`, so hidden_states[L + 1] is
# decoder layer L's output only below the last layer. The output-side checks therefore use layers 0 and 1 of 3.
LAYERS = (0, 1)
STRENGTHS = (4.0, 32.0)
SIZES = {"train": 10, "validation": 5, "test": 6}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


# -- the hand computation ----------------------------------------------------------------------------------


@torch.no_grad()
def forward(model, ids, steering=None):
    """Run one sequence at batch size 1, adding `steering` = (layer, delta, first steered position) if given."""
    context = contextlib.nullcontext()
    if steering is not None:
        layer, delta, start = steering
        context = reference_steering(
            model.model.layers[layer], delta, lambda hidden: torch.arange(hidden.shape[1]) >= start
        )
    with context:
        output = model(torch.tensor([ids]), output_hidden_states=True)
    return output.logits[0].double(), output.hidden_states


def scored_sequences(encoder, item):
    """Return each sequence the model scores for `item`, as (ids, first answer position, last prompt position)."""
    encoded = encoder.encode(item)
    if encoded.letter_token_ids is not None:
        ids = encoded.prefix + encoded.continuations[0]
        return [(ids, None, len(ids) - 1)]
    sequences = []
    for row, continuation in enumerate(encoded.continuations):
        answer_start = len(encoded.prefix) + encoded.answer_starts[row]
        sequences.append((encoded.prefix + continuation, answer_start, answer_start - 1))
    return sequences


def hand_answer(model, encoder, item, steering=None) -> int:
    """Return the chosen index: the best letter logit, or the choice whose tokens have the highest log-likelihood."""
    scores = []
    for ids, answer_start, prompt_end in scored_sequences(encoder, item):
        step = None if steering is None else (*steering, prompt_end)
        logits, _ = forward(model, ids, step)
        if answer_start is None:
            scores = logits[-1, encoder.encode(item).letter_token_ids].tolist()
            continue
        log_probs = torch.log_softmax(logits, dim=-1)
        scores.append(sum(float(log_probs[position - 1, ids[position]]) for position in range(answer_start, len(ids))))
    return max(range(len(scores)), key=lambda choice: (scores[choice], -choice))


def hand_activations(model, encoder, item, layers, source):
    """Return the hidden states at the last prompt token and at the last token of "question + choice c", per c."""

    def read(ids):
        _, hidden_states = forward(model, ids)
        return {layer: hidden_states[layer + 1 if source == "output" else layer][0, -1].double() for layer in layers}

    sequences = scored_sequences(encoder, item)
    ids, _, prompt_end = sequences[0]
    prompt = read(ids[: prompt_end + 1])
    if encoder.scoring == "letter":
        answered = [read(encoder.encode_answered(item, choice)) for choice in range(item.num_choices)]
    else:
        answered = [read(ids) for ids, _, _ in sequences]
    return prompt, answered


def mean_difference(positive, negative, layer):
    return torch.stack([reading[layer] for reading in positive]).mean(0) - torch.stack(
        [reading[layer] for reading in negative]
    ).mean(0)


def hand_vectors(model, encoder, items, answers, layers, source="output"):
    """Compute the three methods' mean differences straight from their definitions."""
    readings = [hand_activations(model, encoder, item, layers, source) for item in items]
    right = [index for index, item in enumerate(items) if answers[index] == item.label]
    wrong = [index for index, item in enumerate(items) if answers[index] != item.label]
    prompt = [reading[0] for reading in readings]
    answered = [reading[1] for reading in readings]

    def with_choice(indices, choice_of):
        return [answered[index][choice_of(index)] for index in indices]

    def label(index):
        return items[index].label

    def answer(index):
        return answers[index]

    return {
        "pasf": {
            layer: mean_difference([prompt[i] for i in right], [prompt[i] for i in wrong], layer) for layer in layers
        },
        "ipas_all": {
            layer: mean_difference(with_choice(right, label), with_choice(wrong, answer), layer) for layer in layers
        },
        "ipas_wrong_only": {
            layer: mean_difference(with_choice(wrong, label), with_choice(wrong, answer), layer) for layer in layers
        },
    }


def hand_accuracy(model, encoder, items, layer, delta) -> int:
    """Count the items answered correctly with `delta` added from the last prompt token on."""
    return sum(hand_answer(model, encoder, item, (layer, delta)) == item.label for item in items)


def mixed_splits(model, encoder):
    """Build synthetic splits labeled from the model's own choices, so that each split has right and wrong items."""
    splits, answers = {}, {}
    for seed, (name, size) in enumerate(SIZES.items()):
        items = make_items(size, seed=seed, prefix=name)
        predicted = [hand_answer(model, encoder, item) for item in items]
        labels = [
            answer if index % 2 == 0 else (answer + 1) % item.num_choices
            for index, (item, answer) in enumerate(zip(items, predicted))
        ]
        splits[name] = relabel(items, labels)
        answers[name] = predicted
    return splits, answers


def wilson(successes: int, total: int) -> tuple[float, float]:
    z = scipy.stats.norm.ppf(0.975)
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z / (1 + z * z / total) * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return max(centre - half, 0.0), min(centre + half, 1.0)


def exact_mcnemar(wrong_to_right: int, right_to_wrong: int) -> float:
    discordant = wrong_to_right + right_to_wrong
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, k) for k in range(min(wrong_to_right, right_to_wrong) + 1)) / 2**discordant
    return min(1.0, 2 * tail)


def is_untouched(model) -> bool:
    return not hasattr(model, "peft_config") and not any(name.endswith("steering") for name, _ in model.named_modules())


# -- one fit per scoring mode, shared by the checks below --------------------------------------------------


@dataclass
class FittedCase:
    scoring: str
    model: torch.nn.Module
    encoder: ItemEncoder
    splits: dict
    answers: dict
    result: pas_peft.FitResult
    output_dir: Path
    expected: dict


@pytest.fixture(scope="module", params=["likelihood", "letter"])
def fitted(request, tokenizer, tmp_path_factory):
    scoring = request.param
    reference = make_tiny_model(tokenizer)
    encoder = ItemEncoder(tokenizer, scoring)
    splits, answers = mixed_splits(reference, encoder)
    output_dir = tmp_path_factory.mktemp(scoring) / "fit"

    result = fit_pas(
        make_tiny_model(tokenizer),
        tokenizer,
        None,
        splits=splits,
        output_dir=output_dir,
        scoring=scoring,
        layers=LAYERS,
        strengths=STRENGTHS,
        show_progress=False,
    )
    expected = hand_vectors(reference, encoder, splits["train"], answers["train"], LAYERS)
    return FittedCase(scoring, reference, encoder, splits, answers, result, output_dir, expected)


@pytest.mark.parametrize("method", METHODS)
def test_vectors_match_hand_computation(fitted, method):
    for layer in LAYERS:
        fitted_vector = fitted.result.vectors[method][layer]
        assert torch.allclose(fitted_vector.double(), fitted.expected[method][layer], atol=1e-6, rtol=0), (method, layer)


def test_train_accuracy_matches_hand_answers(fitted):
    train = fitted.splits["train"]
    correct = sum(answer == item.label for answer, item in zip(fitted.answers["train"], train))

    assert fitted.result.report["train"]["accuracy"]["correct"] == correct
    assert fitted.result.report["train"]["accuracy"]["total"] == len(train)


def test_sweep_matches_hand_steering(fitted):
    validation = fitted.splits["validation"]
    rows = list(csv.DictReader((fitted.output_dir / "sweep.csv").open()))

    assert len(rows) == len(METHODS) * len(LAYERS) * len(STRENGTHS)
    for row in rows:
        method, layer, strength = row["method"], int(row["layer"]), float(row["strength"])
        delta = strength * fitted.result.vectors[method][layer]
        expected = hand_accuracy(fitted.model, fitted.encoder, validation, layer, delta) / len(validation)
        assert float(row["validation_accuracy"]) == pytest.approx(expected), (method, layer, strength)


def test_sweep_covers_the_grid(fitted):
    rows = list(csv.DictReader((fitted.output_dir / "sweep.csv").open()))
    grid = {(row["method"], int(row["layer"]), float(row["strength"])) for row in rows}

    assert grid == {(method, layer, strength) for method in METHODS for layer in LAYERS for strength in STRENGTHS}


def test_chosen_config_is_best_on_validation(fitted):
    chosen = fitted.result.report["chosen"]
    best = max(row["validation_accuracy"] for row in fitted.result.sweep)

    assert chosen["validation_accuracy"] == best


def test_report_test_split_matches_hand_steering(fitted):
    test_items = fitted.splits["test"]
    baseline = [answer == item.label for answer, item in zip(fitted.answers["test"], test_items)]

    for method, row in fitted.result.report["test"]["by_method"].items():
        delta = row["strength"] * fitted.result.vectors[method][row["layer"]]
        steered = [hand_answer(fitted.model, fitted.encoder, item, (row["layer"], delta)) == item.label for item in test_items]
        assert row["baseline"]["correct"] == sum(baseline), method
        assert row["steered"]["correct"] == sum(steered), method
        assert row["wrong_to_right"] == sum(not before and after for before, after in zip(baseline, steered)), method
        assert row["right_to_wrong"] == sum(before and not after for before, after in zip(baseline, steered)), method


def shares_of(letters: list[str]) -> dict[str, float]:
    return {letter: letters.count(letter) / len(letters) for letter in sorted(set(letters))}


def test_report_test_letter_shares(fitted):
    test_items = fitted.splits["test"]
    report = fitted.result.report["test"]
    if fitted.scoring != "letter":
        assert report["unsteered_letter_shares"] == {}
        assert all("letter_shares" not in row for row in report["by_method"].values())
        return
    letters = [fitted.encoder.encode(item).choice_letters for item in test_items]

    unsteered = [letters[index][answer] for index, answer in enumerate(fitted.answers["test"])]
    assert report["unsteered_letter_shares"] == pytest.approx(shares_of(unsteered))
    for method, row in report["by_method"].items():
        delta = row["strength"] * fitted.result.vectors[method][row["layer"]]
        steered = [
            letters[index][hand_answer(fitted.model, fitted.encoder, item, (row["layer"], delta))]
            for index, item in enumerate(test_items)
        ]
        assert row["letter_shares"] == pytest.approx(shares_of(steered)), method


def test_wilson_interval_exact_at_ends():
    from pas_peft.extraction.stats import wilson_interval

    assert wilson_interval(0, 6)[0] == 0.0
    assert wilson_interval(6, 6)[1] == 1.0
    low, high = wilson_interval(3, 6)
    assert 0.0 < low < 0.5 < high < 1.0


def test_report_statistics_match_formulas(fitted):
    for method, row in fitted.result.report["test"]["by_method"].items():
        for side in ("baseline", "steered"):
            low, high = wilson(row[side]["correct"], row[side]["total"])
            assert row[side]["low"] == pytest.approx(low, abs=1e-12), (method, side)
            assert row[side]["high"] == pytest.approx(high, abs=1e-12), (method, side)
        expected_p = exact_mcnemar(row["wrong_to_right"], row["right_to_wrong"])
        assert row["mcnemar_p_value"] == pytest.approx(expected_p, abs=1e-12), method


def test_report_sections(fitted):
    report = json.loads((fitted.output_dir / "pas_report.json").read_text())

    assert report["dataset"]["split_sizes"] == SIZES
    assert report["dataset"]["dropped_too_long"] == {"train": 0, "validation": 0, "test": 0}
    assert set(report["chosen"]) >= {"method", "layer", "strength", "validation_accuracy"}
    assert set(report["test"]["by_method"]) == set(METHODS)
    assert report["test"]["chosen"] == report["test"]["by_method"][report["chosen"]["method"]]
    assert set(report["wall_time_seconds"]) >= {"load_data", "encode", "train", "validation", "test"}
    assert all(seconds >= 0 for seconds in report["wall_time_seconds"].values())
    assert report["skipped_methods"] == {}
    assert report["settings"]["scoring"] == fitted.scoring


def test_report_versions(fitted):
    versions = fitted.result.report["versions"]

    assert versions == {
        "pas_peft": pas_peft.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def test_heatmap_is_png(fitted):
    assert (fitted.output_dir / "sweep_heatmap.png").read_bytes()[:8] == PNG_SIGNATURE


def test_saved_adapter_reproduces_fitted_model(fitted, tokenizer):
    loaded = PeftModel.from_pretrained(make_tiny_model(tokenizer), str(fitted.output_dir))
    input_ids = torch.tensor([fitted.encoder.encode_answered(fitted.splits["test"][0], 0)])

    with torch.no_grad():
        expected = fitted.result.model(input_ids=input_ids).logits
        logits = loaded(input_ids=input_ids).logits
        unsteered = fitted.model(input_ids=input_ids).logits
    assert torch.allclose(logits, expected, atol=1e-6)
    assert not torch.allclose(logits, unsteered, atol=1e-6)


def test_saved_adapter_is_chosen_config(fitted, tokenizer):
    loaded = PeftModel.from_pretrained(make_tiny_model(tokenizer), str(fitted.output_dir))
    chosen = fitted.result.report["chosen"]
    vectors = loaded.base_model.get_steering_vectors("default")

    assert list(vectors) == [chosen["layer"]]
    assert torch.equal(vectors[chosen["layer"]], fitted.result.vectors[chosen["method"]][chosen["layer"]])
    assert loaded.peft_config["default"].strength == chosen["strength"]


def test_input_source_reads_layer_input(tokenizer):
    reference = make_tiny_model(tokenizer)
    encoder = ItemEncoder(tokenizer, "likelihood")
    splits, answers = mixed_splits(reference, encoder)
    layers = (1, 2)

    result = fit_pas(
        make_tiny_model(tokenizer), tokenizer, None, splits=splits, vector_source="input", layers=layers,
        strengths=(4.0,), show_progress=False,
    )

    expected = hand_vectors(reference, encoder, splits["train"], answers["train"], layers, source="input")
    for method in METHODS:
        for layer in layers:
            assert torch.allclose(result.vectors[method][layer].double(), expected[method][layer], atol=1e-6, rtol=0)
    assert result.model.peft_config["default"].vector_source == "input"


# -- splits ------------------------------------------------------------------------------------------------


def fit_items(tokenizer, items, **settings):
    settings = {"layers": LAYERS, "strengths": STRENGTHS, "show_progress": False, **settings}
    return fit_pas(make_tiny_model(tokenizer), tokenizer, items, **settings)


@pytest.fixture(scope="module")
def alternating_items():
    items = make_items(20, seed=7)
    return relabel(items, [index % item.num_choices for index, item in enumerate(items)])


def test_same_seed_same_fit(tokenizer, alternating_items):
    first = fit_items(tokenizer, alternating_items, seed=3)
    second = fit_items(tokenizer, alternating_items, seed=3)

    assert first.report["dataset"]["split_sizes"] == {"train": 12, "validation": 4, "test": 4}
    assert second.report["dataset"]["split_sizes"] == first.report["dataset"]["split_sizes"]
    assert second.report["chosen"] == first.report["chosen"]
    for method in first.vectors:
        for layer in LAYERS:
            assert torch.equal(second.vectors[method][layer], first.vectors[method][layer]), (method, layer)


def test_other_seed_other_train_items(tokenizer, alternating_items):
    first = fit_items(tokenizer, alternating_items, seed=3, methods=("pasf",))
    other = fit_items(tokenizer, alternating_items, seed=4, methods=("pasf",))

    first_train = split_items(alternating_items, seed=3).train
    other_train = split_items(alternating_items, seed=4).train
    assert {item.source_id for item in first_train} != {item.source_id for item in other_train}
    assert not torch.equal(other.vectors["pasf"][0], first.vectors["pasf"][0])


# -- bad input ---------------------------------------------------------------------------------------------


def count_forwards(model) -> list:
    calls = []
    model.get_input_embeddings().register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


def test_nonempty_output_dir_rejected_first(tokenizer, alternating_items, tmp_path):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("keep")
    model = make_tiny_model(tokenizer)
    calls = count_forwards(model)

    with pytest.raises(FileExistsError, match="overwrite"):
        fit_pas(model, tokenizer, alternating_items, output_dir=output_dir, show_progress=False)

    assert calls == []
    assert is_untouched(model)
    assert [path.name for path in output_dir.iterdir()] == ["notes.txt"]
    assert (output_dir / "notes.txt").read_text() == "keep"


def plain_rows(items, **changes):
    return [{"question": item.question, "choices": list(item.choices), "label": item.label, **changes} for item in items]


BAD_DATA = {
    "unknown_columns": (
        [{"prompt_text": "Is it?", "opts": ["yes", "no"], "gold": 0}] * 10,
        None,
        r"\['prompt_text', 'opts', 'gold'\].*ColumnMapping",
    ),
    "missing_mapped_column": (
        [{"prompt_text": "Is it?", "opts": ["yes", "no"], "gold": 0}] * 10,
        ColumnMapping(question="query", choices="opts", label="gold"),
        r"'query'.*columns found are \['prompt_text', 'opts', 'gold'\]",
    ),
    "label_out_of_range": (
        [{"question": "Is it?", "choices": ["yes", "no", "maybe"], "label": 3}] * 10,
        None,
        "label 3 is out of range for 3 choices",
    ),
    "one_choice": (
        [{"question": "Is it?", "choices": ["yes"], "label": 0}] * 10,
        None,
        "1 choices is out of range: an item needs 2",
    ),
    "too_few_items": (
        [{"question": "Is it?", "choices": ["yes", "no"], "label": 0}] * 2,
        None,
        "2 items are too few for proportions",
    ),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_rejected(tokenizer, tmp_path, case):
    rows, columns, message = BAD_DATA[case]
    model = make_tiny_model(tokenizer)
    output_dir = tmp_path / "run"

    with pytest.raises(ValueError, match=message):
        fit_pas(model, tokenizer, rows, columns=columns, output_dir=output_dir, show_progress=False)

    assert is_untouched(model)
    assert not output_dir.exists()


def test_no_wrong_answers_rejected(tokenizer, tmp_path, caplog):
    model = make_tiny_model(tokenizer)
    encoder = ItemEncoder(tokenizer, "likelihood")
    splits = {}
    for seed, (name, size) in enumerate(SIZES.items()):
        items = make_items(size, seed=seed, prefix=name)
        splits[name] = relabel(items, [hand_answer(model, encoder, item) for item in items])
    output_dir = tmp_path / "run"

    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="No PAS method can be fitted"):
        fit_pas(model, tokenizer, None, splits=splits, output_dir=output_dir, layers=LAYERS, show_progress=False)

    warnings = caplog.text
    assert "Skipping pasf: PASf needs at least one wrongly answered training item" in warnings
    assert "Skipping ipas_all: iPAS-all needs at least one wrongly answered training item" in warnings
    assert "Skipping ipas_wrong_only: iPAS-wrong-only needs at least one wrongly answered training item" in warnings
    assert is_untouched(model)
    assert not output_dir.exists()


def test_all_wrong_fits_wrong_only(tokenizer):
    model = make_tiny_model(tokenizer)
    encoder = ItemEncoder(tokenizer, "likelihood")
    splits = {}
    for seed, (name, size) in enumerate(SIZES.items()):
        items = make_items(size, seed=seed, prefix=name)
        answers = [hand_answer(model, encoder, item) for item in items]
        splits[name] = relabel(items, [(answer + 1) % item.num_choices for answer, item in zip(answers, items)])

    result = fit_pas(model, tokenizer, None, splits=splits, layers=LAYERS, strengths=STRENGTHS, show_progress=False)

    assert set(result.vectors) == {"ipas_wrong_only"}
    assert result.report["chosen"]["method"] == "ipas_wrong_only"
    assert set(result.report["skipped_methods"]) == {"pasf", "ipas_all"}
    assert "one correctly answered" in result.report["skipped_methods"]["pasf"]
    assert "one correctly answered" in result.report["skipped_methods"]["ipas_all"]


def test_too_long_prompts_dropped(tokenizer):
    context = 48
    model = make_tiny_model(tokenizer, max_position_embeddings=context)
    encoder = ItemEncoder(tokenizer, "likelihood")
    long_question = "Which word goes with " + " ".join(["red green blue"] * 12) + "?"
    splits, answers = mixed_splits(model, encoder)
    long_items = [
        MultipleChoiceItem(long_question, ("plum", "pear"), label=index % 2, source_id=f"long {index}") for index in range(3)
    ]
    splits["train"] = splits["train"] + long_items[:2]
    splits["validation"] = splits["validation"] + long_items[2:]
    expected = {
        name: sum(max(len(encoder.encode_answered(item, c)) for c in range(item.num_choices)) > context for item in items)
        for name, items in splits.items()
    }

    result = fit_pas(model, tokenizer, None, splits=splits, layers=LAYERS, strengths=STRENGTHS, show_progress=False)

    assert expected == {"train": 2, "validation": 1, "test": 0}
    assert result.report["dataset"]["dropped_too_long"] == expected
    assert result.report["train"]["accuracy"]["total"] == SIZES["train"]


def crash(*args, **kwargs):
    raise OSError("simulated write failure")


def test_write_crash_leaves_nothing(tokenizer, alternating_items, tmp_path, monkeypatch):
    monkeypatch.setattr("pas_peft.extraction.fit.write_heatmap", crash)
    model = make_tiny_model(tokenizer)
    output_dir = tmp_path / "run"

    with pytest.raises(OSError, match="simulated write failure"):
        fit_pas(model, tokenizer, alternating_items, output_dir=output_dir, layers=LAYERS, strengths=STRENGTHS,
                show_progress=False)

    assert list(tmp_path.iterdir()) == []
    assert is_untouched(model)


def test_overwrite_replaces_only_on_success(tokenizer, alternating_items, tmp_path, monkeypatch):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "old.txt").write_text("previous run")

    with monkeypatch.context() as patch:
        patch.setattr("pas_peft.extraction.fit.write_heatmap", crash)
        with pytest.raises(OSError):
            fit_items(tokenizer, alternating_items, output_dir=output_dir, overwrite=True)
    assert [path.name for path in tmp_path.iterdir()] == ["run"]
    assert [path.name for path in output_dir.iterdir()] == ["old.txt"]

    fit_items(tokenizer, alternating_items, output_dir=output_dir, overwrite=True)
    names = {path.name for path in output_dir.iterdir()}
    assert names == {"adapter_config.json", "adapter_model.safetensors", "README.md", "pas_report.json", "sweep.csv", "sweep_heatmap.png"}
    assert [path.name for path in tmp_path.iterdir()] == ["run"]


# -- fitting on a PAS PeftModel ----------------------------------------------------------------------------


def test_fit_on_pas_model_adds_adapter(tokenizer, alternating_items):
    first = fit_items(tokenizer, alternating_items)
    first_vector = first.model.base_model.get_steering_vectors("default")

    second = fit_pas(first.model, tokenizer, alternating_items, adapter_name="second", layers=LAYERS,
                     strengths=STRENGTHS, show_progress=False)

    assert second.model is first.model
    assert set(second.model.peft_config) == {"default", "second"}
    assert second.model.active_adapter == "second"
    old_vectors = second.model.base_model.get_steering_vectors("default")
    assert old_vectors.keys() == first_vector.keys()
    assert all(torch.equal(old_vectors[layer], first_vector[layer]) for layer in old_vectors)
    # Extraction switches PAS steering off, so the existing adapter must not change the new vectors.
    for method in first.vectors:
        for layer in LAYERS:
            assert torch.equal(second.vectors[method][layer], first.vectors[method][layer]), (method, layer)


def test_fit_on_pas_model_rejects_taken_name(tokenizer, alternating_items):
    first = fit_items(tokenizer, alternating_items)
    calls = count_forwards(first.model)

    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        fit_items_on(first.model, tokenizer, alternating_items)

    assert calls == []
    assert set(first.model.peft_config) == {"default"}


def fit_items_on(model, tokenizer, items, **settings):
    settings = {"layers": LAYERS, "strengths": STRENGTHS, "show_progress": False, **settings}
    return fit_pas(model, tokenizer, items, **settings)


def test_write_crash_keeps_pas_adapters(tokenizer, alternating_items, tmp_path, monkeypatch):
    first = fit_items(tokenizer, alternating_items)
    monkeypatch.setattr("pas_peft.extraction.fit.write_heatmap", crash)

    with pytest.raises(OSError):
        fit_items_on(first.model, tokenizer, alternating_items, adapter_name="second", output_dir=tmp_path / "run")

    assert set(first.model.peft_config) == {"default"}
    assert first.model.active_adapters == ["default"]
    assert not any("second" in name for name, _ in first.model.named_parameters())


def test_write_crash_keeps_lora_model(tokenizer, alternating_items, tmp_path, monkeypatch):
    lora = peft.get_peft_model(make_tiny_model(tokenizer), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    monkeypatch.setattr("pas_peft.extraction.fit.write_heatmap", crash)

    with pytest.raises(OSError):
        fit_items_on(lora, tokenizer, alternating_items, output_dir=tmp_path / "run")

    assert set(lora.peft_config) == {"default"}
    assert isinstance(lora.peft_config["default"], peft.LoraConfig)
    assert not any(isinstance(module, pas_peft.PASLayer) for module in lora.modules())


def test_warns_when_nothing_improves(tokenizer, caplog):
    items = make_items(20, seed=11)
    plain = fit_items(tokenizer, relabel(items, [0] * len(items)), strengths=[0.0])

    with caplog.at_level("WARNING", logger="pas_peft.extraction.selection"):
        result = fit_items(tokenizer, relabel(items, [0] * len(items)), strengths=[0.0])

    assert result.report["chosen"]["improves_validation"] is False
    assert plain.report["chosen"]["strength"] == 0.0
    assert any("No configuration beat the unsteered validation accuracy" in record.message for record in caplog.records)


@pytest.mark.parametrize(("shares", "warns"), [
    ({"A": 0.05, "B": 0.95}, True),
    ({"A": 0.5, "B": 0.5}, False),
    ({"A": 0.9, "B": 0.1}, False),
])
def test_warns_when_steered_answers_one_letter(caplog, shares, warns):
    from pas_peft.extraction.fit import _warn_if_steering_only_moves_letters

    letter_shares = {"unsteered": {"A": 1.0}, "by_method": {"pasf": shares, "ipas_all": {"C": 1.0}}}
    with caplog.at_level("WARNING", logger="pas_peft.extraction.fit"):
        _warn_if_steering_only_moves_letters(letter_shares, "pasf")

    messages = [record.message for record in caplog.records if "moving the preferred letter" in record.message]
    assert len(messages) == (1 if warns else 0)
    if warns:
        assert "answered B to 95%" in messages[0]


@pytest.mark.parametrize("settings", [
    {"vector_source": "Input"},
    {"activation": "mlp_output", "vector_source": "input"},
    {"activation": "attention"},
])
def test_invalid_settings_fail_before_work(tokenizer, alternating_items, settings, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("no model work should start")

    monkeypatch.setattr("pas_peft.extraction.fit.BatchRunner", forbidden)
    with pytest.raises(ValueError):
        fit_items(tokenizer, alternating_items, **settings)


def test_fit_on_pas_model_records_base(tokenizer, alternating_items, tmp_path):
    first = fit_items(tokenizer, alternating_items)
    first.model.get_base_model().name_or_path = str(tmp_path / "base")

    second = fit_pas(first.model, tokenizer, alternating_items, adapter_name="second", layers=LAYERS,
                     strengths=STRENGTHS, show_progress=False, output_dir=tmp_path / "second")

    saved = json.loads((tmp_path / "second" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tmp_path / "base")
    assert second.model.peft_config["second"].base_model_name_or_path == str(tmp_path / "base")


def test_tie_prefers_weakest_strength():
    from pas_peft.extraction.selection import select_best

    rows = [
        {"method": "pasf", "layer": 1, "strength": -4.0, "validation_correct": 5},
        {"method": "pasf", "layer": 1, "strength": 2.0, "validation_correct": 5},
        {"method": "pasf", "layer": 1, "strength": 8.0, "validation_correct": 4},
    ]

    assert select_best(rows)["strength"] == 2.0

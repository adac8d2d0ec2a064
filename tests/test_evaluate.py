"""`evaluate_adapter` reproduces, from a JSONL file, the test-split numbers that `fit_pas` reports."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from pas_peft import fit_pas
from pas_peft.data import MultipleChoiceItem, load_items
from pas_peft.extraction.evaluate import evaluate_adapter
from tiny import WORDS, make_items, make_tiny_model, make_tokenizer, relabel, write_jsonl

LAYERS = (0, 1)
STRENGTHS = (4.0, 32.0)
PAIRED_FIELDS = ("wrong_to_right", "right_to_wrong", "mcnemar_p_value")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def alternating(items):
    return relabel(items, [index % item.num_choices for index, item in enumerate(items)])


@pytest.fixture(scope="module", params=["likelihood", "letter"])
def fitted(request, tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    # The test items are read back from the file, so that their source ids (which seed the letter order)
    # are the same in the fit and in the evaluation.
    test_file = write_jsonl(directory / "test.jsonl", alternating(make_items(8, seed=3, prefix="test")))
    splits = {
        "train": alternating(make_items(10, seed=1, prefix="train")),
        "validation": alternating(make_items(5, seed=2, prefix="validation")),
        "test": load_items(str(test_file)).items,
    }
    result = fit_pas(
        make_tiny_model(tokenizer),
        tokenizer,
        None,
        splits=splits,
        output_dir=directory / "adapter",
        scoring=request.param,
        # On this model and data iPAS-all flips test items in both modes, and PASf flips none.
        methods=("ipas_all",),
        layers=LAYERS,
        strengths=STRENGTHS,
        show_progress=False,
    )
    return request.param, result, test_file, directory / "adapter"


def test_matches_fit_report(fitted, tokenizer):
    scoring, result, test_file, _ = fitted
    chosen = result.report["test"]["chosen"]

    evaluation = evaluate_adapter(result.model, tokenizer, str(test_file))

    assert evaluation["items"] == 8
    assert evaluation["scoring"] == scoring
    assert evaluation["baseline"] == chosen["baseline"]
    assert evaluation["steered"] == chosen["steered"]
    for name in PAIRED_FIELDS:
        assert evaluation[name] == chosen[name], name


def test_chosen_config_flips_items(fitted):
    # Guards the comparison above against a steered model that answers exactly like the unsteered one.
    chosen = fitted[1].report["test"]["chosen"]

    assert chosen["wrong_to_right"] + chosen["right_to_wrong"] > 0


def test_saved_adapter_matches_fit_report(fitted, tokenizer):
    _, result, test_file, adapter_dir = fitted
    loaded = PeftModel.from_pretrained(make_tiny_model(tokenizer), str(adapter_dir))
    chosen = result.report["test"]["chosen"]

    evaluation = evaluate_adapter(loaded, tokenizer, str(test_file))

    assert evaluation["layer"] == chosen["layer"]
    assert evaluation["strength"] == chosen["strength"]
    assert evaluation["baseline"] == chosen["baseline"]
    assert evaluation["steered"] == chosen["steered"]


def test_zero_strength_changes_nothing(fitted, tokenizer):
    _, result, test_file, _ = fitted

    evaluation = evaluate_adapter(result.model, tokenizer, str(test_file), strength=0.0)

    assert evaluation["steered"] == evaluation["baseline"]
    assert evaluation["wrong_to_right"] == 0
    assert evaluation["right_to_wrong"] == 0
    assert result.model.peft_config["default"].strength == result.report["chosen"]["strength"]


def test_max_samples_limits_items(fitted, tokenizer):
    _, result, test_file, _ = fitted

    evaluation = evaluate_adapter(result.model, tokenizer, str(test_file), max_samples=3)

    assert evaluation["items"] == 3
    assert evaluation["baseline"]["total"] == 3


def test_too_long_items_dropped(fitted, tokenizer, tmp_path, caplog):
    _, result, test_file, _ = fitted
    context = result.model.get_base_model().config.max_position_embeddings
    words = " ".join(WORDS[index % len(WORDS)] for index in range(context))
    long_items = [
        MultipleChoiceItem(f"Which word goes with {words}?", (WORDS[0], WORDS[1]), label=0, source_id=f"long {index}")
        for index in range(2)
    ]
    data = write_jsonl(tmp_path / "with_long.jsonl", list(load_items(str(test_file)).items) + long_items)

    with caplog.at_level("WARNING", logger="pas_peft.extraction.scoring"):
        evaluation = evaluate_adapter(result.model, tokenizer, str(data))

    assert evaluation["dropped_too_long"] == 2
    assert evaluation["items"] == 8
    assert "Dropped 2 of 10 evaluation items" in caplog.text


def test_plain_model_rejected(tokenizer, tmp_path):
    test_file = write_jsonl(tmp_path / "test.jsonl", alternating(make_items(4)))

    with pytest.raises(ValueError, match="carries no PAS adapter"):
        evaluate_adapter(make_tiny_model(tokenizer), tokenizer, str(test_file))


def test_evaluation_leaves_steering_on(fitted, tokenizer):
    _, result, test_file, _ = fitted
    input_ids = torch.tensor([tokenizer("Question: Which word goes with red?")["input_ids"]])
    with torch.no_grad():
        before = result.model(input_ids=input_ids).logits

    evaluate_adapter(result.model, tokenizer, str(test_file))

    with torch.no_grad():
        after = result.model(input_ids=input_ids).logits
    assert torch.equal(after, before)


def test_scoring_must_match_positions(fitted, tokenizer):
    scoring, result, test_file, _ = fitted
    other = "letter" if scoring == "likelihood" else "likelihood"

    with pytest.raises(ValueError, match="positions"):
        evaluate_adapter(result.model, tokenizer, str(test_file), scoring=other)


def test_other_data_cannot_use_test_split(fitted, tokenizer):
    _, result, test_file, _ = fitted

    with pytest.raises(ValueError, match="fitted on"):
        evaluate_adapter(result.model, tokenizer, str(test_file), split="test")

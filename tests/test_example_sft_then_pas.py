"""examples/sft_then_pas.py runs its whole flow (trl SFT with LoRA, then PAS) on a tiny model."""

import importlib.util
from pathlib import Path

import pytest
import torch
from peft import PeftModel

import pas_peft
from pas_peft.data import MultipleChoiceItem
from tiny import make_items, make_tiny_model, make_tokenizer

EXAMPLE = Path(__file__).parent.parent / "examples" / "sft_then_pas.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("sft_then_pas", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def alternating(items: list[MultipleChoiceItem]) -> list[MultipleChoiceItem]:
    return [MultipleChoiceItem(item.question, item.choices, index % item.num_choices, item.source_id)
            for index, item in enumerate(items)]


def test_sft_then_pas_flow(example, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tokenizer = make_tokenizer()
    model = make_tiny_model(tokenizer)
    items = alternating(make_items(30, seed=4))
    before = {name: value.clone() for name, value in model.state_dict().items()}

    table = example.run(
        model, tokenizer, items[:14], items[14:22], items[22:], layers=[1, 2], strengths=[1.0, 4.0], max_steps=2
    )

    stack = table["model"]
    assert isinstance(stack, pas_peft.PASStack)
    assert isinstance(stack.lora_model, PeftModel)
    lora_weights = [name for name, _ in stack.lora_model.named_parameters() if "lora_" in name]
    assert lora_weights
    changed = [
        name for name, value in stack.lora_model.get_base_model().state_dict().items()
        if "lora_B" in name and value.abs().sum() > 0
    ]
    assert changed, "two SFT steps should move the LoRA B matrices away from zero"
    assert table["split_sizes"] == (14, 8, 8)
    for key in ("base", "sft", "sft_pas"):
        assert 0.0 <= table[key]["value"] <= 1.0
    assert table["sft"]["total"] == 8
    base_weights = {name: value for name, value in stack.model.state_dict().items() if name in before}
    assert all(torch.equal(base_weights[name], before[name]) for name in base_weights)


def test_score_matches_hand_count(example):
    tokenizer = make_tokenizer()
    model = make_tiny_model(tokenizer)
    items = alternating(make_items(6, seed=5))

    result = example.score(model, tokenizer, items)

    from pas_peft.extraction.scoring import ItemEncoder, predict_from_logits

    encoder = ItemEncoder(tokenizer, "likelihood")
    correct = 0
    with torch.no_grad():
        for item in items:
            encoded = encoder.encode(item)
            logits = []
            for row, continuation in enumerate(encoded.continuations):
                full = model(input_ids=torch.tensor([encoded.prefix + continuation])).logits[0]
                positions = torch.tensor(encoded.scored_positions(row)) + len(encoded.prefix)
                logits.append(full[positions])
            correct += predict_from_logits(encoded, logits)[0] == item.label
    assert result["correct"] == correct


def test_evaluate_stack_matches_fit_report(example, tmp_path, monkeypatch):
    from pas_peft.extraction.evaluate import evaluate_adapter
    from tiny import write_jsonl

    monkeypatch.chdir(tmp_path)
    tokenizer = make_tokenizer()
    items = alternating(make_items(30, seed=4))
    test_file = write_jsonl(tmp_path / "test.jsonl", items[22:])
    from pas_peft.data import load_items

    test_items = list(load_items(str(test_file)).items)
    table = example.run(make_tiny_model(tokenizer), tokenizer, items[:14], items[14:22], test_items,
                        layers=[1, 2], strengths=[1.0, 4.0], max_steps=2)

    evaluation = evaluate_adapter(table["model"], tokenizer, str(test_file))

    assert evaluation["baseline"] == table["sft"]
    assert evaluation["steered"] == table["sft_pas"]

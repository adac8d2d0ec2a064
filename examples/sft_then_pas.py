"""
SFT with a LoRA through trl, then PAS on top, then base / SFT / SFT+PAS on held-out items.

    python examples/sft_then_pas.py                      # embedded SmolLM2-135M-Instruct, bundled BBQ Age slice
    python examples/sft_then_pas.py --data my_items.jsonl --train-items 200

The same items are split once: the SFT run and the PAS fit both learn from the training split, PAS chooses
its layer and strength on the validation split, and the three models are compared on the test split, with
each answer read as the most likely answer text (likelihood scoring).
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Optional, Sequence

import torch

import pas_peft
from pas_peft.data import MultipleChoiceItem, format_likelihood_prompt, load_items, split_items
from pas_peft.extraction.batching import default_memory_budget
from pas_peft.extraction.engine import BatchRunner
from pas_peft.extraction.passes import evaluate_split
from pas_peft.extraction.scoring import ItemEncoder
from pas_peft.extraction.stats import accuracy


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model id or directory (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--data", default="bbq_age", help="dataset file or bundled name (default: bbq_age)")
    parser.add_argument("--train-items", type=int, default=96, help="items for SFT and for the PAS vectors")
    parser.add_argument("--validation-items", type=int, default=32, help="items to choose PAS layer and strength")
    parser.add_argument("--test-items", type=int, default=48, help="held-out items for the comparison")
    parser.add_argument("--epochs", type=float, default=1.0, help="SFT epochs (default: 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    model, tokenizer = pas_peft.load_base_model(args.model)
    total = args.train_items + args.validation_items + args.test_items
    items = list(load_items(args.data).items)
    splits = split_items(
        items,
        seed=args.seed,
        max_samples=total,
        proportions=(args.train_items / total, args.validation_items / total, args.test_items / total),
    )
    table = run(model, tokenizer, splits.train, splits.validation, splits.test, epochs=args.epochs, seed=args.seed)
    print_table(table)


def run(
    model,
    tokenizer,
    train: Sequence[MultipleChoiceItem],
    validation: Sequence[MultipleChoiceItem],
    test: Sequence[MultipleChoiceItem],
    *,
    epochs: float = 1.0,
    seed: int = 0,
    layers: Optional[Sequence[int]] = None,
    strengths: Sequence[float] = (0.5, 1.0, 2.0, 4.0, 8.0),
    max_steps: int = -1,
) -> dict:
    """Train a LoRA with trl's SFTTrainer, fit PAS on the result, and score base, SFT and SFT+PAS on `test`."""
    started = time.perf_counter()
    base_accuracy = score(model, tokenizer, test)

    sft_start = time.perf_counter()
    lora_model = train_lora(model, tokenizer, train, epochs=epochs, seed=seed, max_steps=max_steps)
    sft_seconds = time.perf_counter() - sft_start
    lora_model.eval()

    pas_start = time.perf_counter()
    fitted = pas_peft.fit_pas(
        lora_model,
        tokenizer,
        None,
        splits={"train": list(train), "validation": list(validation), "test": list(test)},
        layers=layers,
        strengths=strengths,
        seed=seed,
        show_progress=False,
    )
    pas_seconds = time.perf_counter() - pas_start
    # The fit's test report compares the model it was given (the SFT model) with that model plus PAS.
    test_report = fitted.report["test"]["chosen"]

    return {
        "model": fitted.model,
        "base": base_accuracy,
        "sft": test_report["baseline"],
        "sft_pas": test_report["steered"],
        "pas_choice": fitted.report["chosen"],
        "pas_test": fitted.report["test"]["chosen"],
        "sft_seconds": sft_seconds,
        "pas_seconds": pas_seconds,
        "total_seconds": time.perf_counter() - started,
        "split_sizes": (len(train), len(validation), len(test)),
    }


def train_lora(model, tokenizer, items: Sequence[MultipleChoiceItem], *, epochs: float, seed: int, max_steps: int = -1):
    """Fine-tune a rank-8 LoRA on "question -> correct answer text" with trl's SFTTrainer; return the PeftModel."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    rows = []
    for item in items:
        prompt = format_likelihood_prompt(item)
        rows.append({"prompt": prompt.context, "completion": prompt.continuations[item.label]})
    config = SFTConfig(
        output_dir="runs/sft_then_pas/sft",
        num_train_epochs=epochs,
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=2e-4,
        max_length=512,
        completion_only_loss=True,
        bf16=False,
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        seed=seed,
    )
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(rows), peft_config=lora, processing_class=tokenizer
    )
    trainer.train()
    return trainer.model


def score(model, tokenizer, items: Sequence[MultipleChoiceItem]) -> dict:
    """Return the accuracy (with its 95% interval) of `model`'s most likely answer texts on `items`."""
    runner = BatchRunner(model)
    runner.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoder = ItemEncoder(tokenizer, "likelihood")
    evaluation = evaluate_split(
        runner, [encoder.encode(item) for item in items], budget_bytes=default_memory_budget(runner.device)
    )
    return accuracy(evaluation.correct).to_dict()


def print_table(table: dict) -> None:
    train, validation, test = table["split_sizes"]
    print(f"\nItems: train {train} (SFT and PAS vectors), validation {validation} (PAS choice), test {test}")
    print(f"PAS choice: {table['pas_choice']['method']}, layer {table['pas_choice']['layer']}, "
          f"strength {table['pas_choice']['strength']:g}")
    print(f"\n{'model':<10} {'test accuracy':>14} {'95% interval':>16}")
    for name, key in (("base", "base"), ("SFT", "sft"), ("SFT+PAS", "sft_pas")):
        row = table[key]
        print(f"{name:<10} {row['value']:>14.3f} {'[' + format(row['low'], '.2f') + ', ' + format(row['high'], '.2f') + ']':>16}")
    pas_test = table["pas_test"]
    print(f"\nSFT -> SFT+PAS on test: {pas_test['wrong_to_right']} wrong to right, {pas_test['right_to_wrong']} "
          f"right to wrong, McNemar p = {pas_test['mcnemar_p_value']:.3g}")
    print(f"Wall time: SFT {table['sft_seconds']:.0f} s, PAS fit {table['pas_seconds']:.0f} s, "
          f"total {table['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()

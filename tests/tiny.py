"""
A tiny trained tokenizer, synthetic multiple-choice items and a tiny Llama sized for them.

The tokenizer is a byte-level BPE trained in-process on the words the items use, so that prompts tokenize
the way a real tokenizer would (a BOS token in front, " A" after "Answer:" as one token) without any download.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Sequence

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from conftest import make_model
from pas_peft.data import MultipleChoiceItem

WORDS = (
    "red green blue yellow black white apple pear plum grape river hill stone cloud tiger horse eagle otter "
    "north south east west small large quick slow bright dark early late winter summer"
).split()
LETTER_CUES = [f"Answer: {letter}. " for letter in "ABCD"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
VOCAB_SIZE = 400


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with BOS `<s>`, EOS `</s>` and pad `<pad>` on the item vocabulary."""
    corpus = [" ".join(WORDS)] * 20 + ["Question: Which word fits?\n" + "".join(LETTER_CUES)] * 20
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def make_tiny_model(tokenizer, seed: int = 0, **overrides):
    """Build the conftest tiny Llama (3 decoder layers) with the vocabulary and special tokens of `tokenizer`."""
    return make_model(
        "llama",
        seed=seed,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **overrides,
    )


def make_items(count: int, seed: int = 0, prefix: str = "item") -> list[MultipleChoiceItem]:
    """Build `count` items with 2 to 4 one-word choices, all with label 0 until `relabel` sets real labels."""
    generator = random.Random(seed)
    items = []
    for index in range(count):
        num_choices = 2 + index % 3
        question = f"Which word goes with {' '.join(generator.sample(WORDS, 3))}?"
        choices = tuple(generator.sample(WORDS, num_choices))
        items.append(MultipleChoiceItem(question, choices, label=0, source_id=f"{prefix} {index}"))
    return items


def relabel(items: Sequence[MultipleChoiceItem], labels: Sequence[int]) -> list[MultipleChoiceItem]:
    return [dataclasses.replace(item, label=label) for item, label in zip(items, labels)]


def write_jsonl(path: Path, items: Sequence[MultipleChoiceItem]) -> Path:
    """Write items in the plain multiple-choice schema: question, choices, label."""
    lines = [json.dumps({"question": item.question, "choices": list(item.choices), "label": item.label}) for item in items]
    path.write_text("\n".join(lines) + "\n")
    return path

"""
How the model answers an item, written as a shared prefix plus short continuations.

Two scoring modes:

- `letter`: the item is a lettered prompt; the model's answer is the argmax of the next-token logits over the
  valid letter tokens. Prefix: the prompt without its last token. One continuation: the last prompt token.
- `likelihood` / `likelihood_norm`: the item is a question context without letters; each choice is scored by
  the log-likelihood of its answer text after the context (summed, or divided by the answer's length in
  UTF-8 bytes for `likelihood_norm`), as lm-evaluation-harness scores multiple choice. Prefix: the context
  without its last token. One continuation per choice: the last context token and the answer tokens.

In both modes steering applies from the last prompt token on, which is the first token of every continuation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..data import (
    MultipleChoiceItem,
    format_answered_prompt,
    format_letter_prompt,
    format_likelihood_prompt,
    resolve_letter_token_ids,
    split_continuation_tokens,
)

SCORING_MODES = ("letter", "likelihood", "likelihood_norm")

logger = logging.getLogger(__name__)


@dataclass
class EncodedItem:
    """Token ids of one item, split into a shared prefix and one continuation per scored row."""

    item: MultipleChoiceItem
    prefix: list[int]
    continuations: list[list[int]]
    choice_of_row: list[int]
    """Choice index each continuation scores (letter mode: -1, the single row scores every letter)."""
    prompt_position: int
    """Position of the last prompt token (where PASf reads) inside the first continuation; see `steered_from`."""
    letter_token_ids: Optional[list[int]] = None
    """Letter mode: the token id of each choice (indexed like `item.choices`)."""
    choice_letters: Optional[str] = None
    """Letter mode: the letter each choice was shown with (indexed like `item.choices`)."""
    answer_starts: Optional[list[int]] = None
    """Likelihood modes: per row, the position of the first answer token inside the continuation."""
    normalisers: Optional[list[float]] = None
    """Likelihood modes: per row, the divisor of the summed log-probability."""

    @property
    def num_tokens(self) -> int:
        return len(self.prefix) + max(len(row) for row in self.continuations)

    def scored_positions(self, row: int) -> list[int]:
        """Positions of continuation `row` whose logits the answer needs."""
        if self.answer_starts is None:
            return [self.prompt_position]
        return list(range(self.answer_starts[row] - 1, len(self.continuations[row]) - 1))

    def steered_from(self, row: int) -> int:
        """First steered position of continuation `row`: its last prompt token."""
        if self.answer_starts is None:
            return self.prompt_position
        return self.answer_starts[row] - 1


class ItemEncoder:
    """
    Turns items into token ids for one scoring mode.

    Args:
        tokenizer: the model's tokenizer.
        scoring: `"letter"`, `"likelihood"` or `"likelihood_norm"`.
        seed: seed of the per-item choice shuffle in letter prompts.
        use_chat_template: wrap prompts in the tokenizer's chat template.
        system_prompt: optional system message for the chat template.
    """

    def __init__(
        self,
        tokenizer: Any,
        scoring: str = "likelihood",
        seed: int = 0,
        use_chat_template: bool = False,
        system_prompt: Optional[str] = None,
    ) -> None:
        if scoring not in SCORING_MODES:
            raise ValueError(f"Invalid scoring {scoring!r}: use one of {', '.join(map(repr, SCORING_MODES))}.")
        self.tokenizer = tokenizer
        self.scoring = scoring
        self.seed = seed
        self.use_chat_template = use_chat_template
        self.system_prompt = system_prompt
        self._special_prefix = [] if use_chat_template else _special_prefix_ids(tokenizer)
        self._letter_ids_by_ending: dict[tuple[str, int], tuple[int, ...]] = {}

    def encode(self, item: MultipleChoiceItem) -> EncodedItem:
        if self.scoring == "letter":
            return self._encode_letter(item)
        return self._encode_likelihood(item)

    def encode_answered(self, item: MultipleChoiceItem, choice_index: int) -> list[int]:
        """Token ids of "prompt + the answer `choice_index`" (iPAS reads the activation of its last token)."""
        if self.scoring == "letter":
            prompt = self._letter_prompt(item)
            return self._special_prefix + self._encode_text(format_answered_prompt(prompt, choice_index))
        prompt = self._likelihood_prompt(item)
        context, answer = split_continuation_tokens(self.tokenizer, prompt.context, prompt.continuations[choice_index])
        return self._special_prefix + context + answer

    # -- letter mode -----------------------------------------------------------------------------------

    def _letter_prompt(self, item: MultipleChoiceItem):
        return format_letter_prompt(
            item,
            seed=self.seed,
            tokenizer=self.tokenizer,
            use_chat_template=self.use_chat_template,
            system_prompt=self.system_prompt,
        )

    def _encode_letter(self, item: MultipleChoiceItem) -> EncodedItem:
        prompt = self._letter_prompt(item)
        tokens = self._special_prefix + self._encode_text(prompt.text)
        ids_by_position = self._letter_ids(prompt.text, item.num_choices)
        ids_by_choice = [0] * item.num_choices
        for position, choice_index in enumerate(prompt.order):
            ids_by_choice[choice_index] = ids_by_position[position]
        return EncodedItem(
            item=item,
            prefix=tokens[:-1],
            continuations=[tokens[-1:]],
            choice_of_row=[-1],
            prompt_position=0,
            letter_token_ids=ids_by_choice,
            choice_letters="".join(prompt.letter_of(index) for index in range(item.num_choices)),
        )

    def _letter_ids(self, prompt_text: str, num_choices: int) -> tuple[int, ...]:
        # Only the end of the prompt decides how a letter is tokenized after it; the full chat header can be long.
        key = (prompt_text[-200:], num_choices)
        if key not in self._letter_ids_by_ending:
            self._letter_ids_by_ending[key] = resolve_letter_token_ids(self.tokenizer, prompt_text, num_choices)
        return self._letter_ids_by_ending[key]

    # -- likelihood modes ------------------------------------------------------------------------------

    def _likelihood_prompt(self, item: MultipleChoiceItem):
        return format_likelihood_prompt(
            item, tokenizer=self.tokenizer, use_chat_template=self.use_chat_template, system_prompt=self.system_prompt
        )

    def _encode_likelihood(self, item: MultipleChoiceItem) -> EncodedItem:
        prompt = self._likelihood_prompt(item)
        sequences = []
        for continuation in prompt.continuations:
            context, answer = split_continuation_tokens(self.tokenizer, prompt.context, continuation)
            sequences.append((self._special_prefix + context, answer))

        # The prefix is what every choice shares, minus the last context token, which is steered.
        shared = min(len(context) for context, _ in sequences) - 1
        shared = min(shared, _common_prefix_length([context + answer for context, answer in sequences]))
        prefix = sequences[0][0][:shared]
        continuations = [(context + answer)[shared:] for context, answer in sequences]
        answer_starts = [len(context) - shared for context, _ in sequences]
        if self.scoring == "likelihood_norm":
            normalisers = [float(max(len(text.encode("utf-8")), 1)) for text in prompt.continuations]
        else:
            normalisers = [1.0] * len(sequences)
        return EncodedItem(
            item=item,
            prefix=prefix,
            continuations=continuations,
            choice_of_row=list(range(item.num_choices)),
            prompt_position=answer_starts[0] - 1,
            answer_starts=answer_starts,
            normalisers=normalisers,
        )

    def _encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def predict_from_logits(encoded: EncodedItem, logits: Sequence[torch.Tensor]) -> tuple[int, torch.Tensor]:
    """
    Return the predicted choice index and the per-choice scores of one item.

    `logits[row]` contains the logits of continuation `row` at `encoded.scored_positions(row)`, in order. Ties go
    to the lowest choice index.
    """
    if encoded.letter_token_ids is not None:
        scores = logits[0][0, encoded.letter_token_ids].float()
        return int(torch.argmax(scores)), scores

    scores = torch.empty(len(encoded.continuations))
    for row, continuation in enumerate(encoded.continuations):
        targets = torch.tensor(continuation[encoded.answer_starts[row] :], device=logits[row].device)
        log_probs = torch.log_softmax(logits[row].float(), dim=-1)
        total = log_probs.gather(1, targets[:, None]).sum()
        scores[row] = total / encoded.normalisers[row]
    return int(torch.argmax(scores)), scores


def last_positions(encoded: EncodedItem) -> list[int]:
    """Position of the last real token of each continuation (where iPAS reads in likelihood mode)."""
    return [len(row) - 1 for row in encoded.continuations]


def _special_prefix_ids(tokenizer: Any) -> list[int]:
    """Return the tokens the tokenizer puts in front of every text by default (such as BOS), if any."""
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    without = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start : start + len(without)] == without:
            return with_special[:start]
    return []


def _common_prefix_length(sequences: list[list[int]]) -> int:
    length = 0
    for tokens in zip(*sequences):
        if any(token != tokens[0] for token in tokens):
            break
        length += 1
    return length


def max_positions(model) -> Optional[int]:
    """Return the model's context length in tokens, or None when its config does not state one."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    value = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(value) if value else None


def drop_too_long(
    encoded: Sequence["EncodedItem"], context: Optional[int], description: str
) -> tuple[list["EncodedItem"], int]:
    """
    Return the items that fit in `context` tokens and how many were dropped, with a warning if any were.

    Raises:
        ValueError: if no item fits; `description` names the items in the message, for example "train".
    """
    kept = [item for item in encoded if context is None or item.num_tokens <= context]
    dropped = len(encoded) - len(kept)
    if dropped:
        logger.warning(
            "Dropped %d of %d %s items longer than the model's context of %d tokens.",
            dropped, len(encoded), description, context,
        )
    if not kept:
        raise ValueError(
            f"Every {description} item is longer than the model's context of {context} tokens; use shorter items."
        )
    return kept, dropped

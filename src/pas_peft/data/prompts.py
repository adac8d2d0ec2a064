"""
Prompt formats for multiple-choice items, and the token ids of the answer letters.

Three formats:

- Letter prompts (`format_letter_prompt`): the question, the choices in a seeded per-item order as ``A. ...``,
  ``B. ...``, then an answer cue. The model's answer is read from the logits of the letter tokens.

  Plain text::

      Question: <question>
      A. <choice>
      B. <choice>
      Answer:

  With ``use_chat_template=True`` the same question block, followed by the line
  ``"Answer with the letter of the correct choice."`` instead of ``"Answer:"``, is the user message, and the
  tokenizer's chat template adds the assistant header.

- Answered prompts (`format_answered_prompt`, for iPAS): a letter prompt followed by one choice, written as
  ``"<letter>. <choice text>"``. After a plain prompt a space comes first (``"...Answer: B. The grandson"``),
  after a chat prompt nothing does, because the template ends with a newline.

- Likelihood prompts (`format_likelihood_prompt`, lm-evaluation-harness style): a context
  ``"Question: <question>\\nAnswer:"`` without letters, and one continuation per choice, ``" " + choice``.
  Each choice is scored by the sum of its continuation's token log-probabilities (divided by the
  continuation's length in UTF-8 bytes for `likelihood_norm`). `split_continuation_tokens` finds where the
  continuation's tokens start.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from .items import LETTERS, MultipleChoiceItem

logger = logging.getLogger(__name__)

QUESTION_PREFIX = "Question: "
ANSWER_CUE = "Answer:"
CHAT_LETTER_INSTRUCTION = "Answer with the letter of the correct choice."


@dataclass(frozen=True)
class LetterPrompt:
    """
    A lettered multiple-choice prompt and the order its choices were shown in.

    Args:
        item (`MultipleChoiceItem`): The item the prompt shows.
        text (`str`): The prompt text, ready to tokenize.
        order (`tuple[int, ...]`): ``order[position]`` is the index in ``item.choices`` of the choice shown
            with letter ``LETTERS[position]``.
    """

    item: MultipleChoiceItem
    text: str
    order: tuple[int, ...]

    @property
    def letters(self) -> str:
        """The letters shown, ``"AB..."``, one per choice."""
        return LETTERS[: len(self.order)]

    @property
    def correct_position(self) -> int:
        """Position (0 for A) at which the correct choice is shown."""
        return self.order.index(self.item.label)

    @property
    def correct_letter(self) -> str:
        """Letter of the correct choice in this prompt."""
        return LETTERS[self.correct_position]

    def letter_of(self, choice_index: int) -> str:
        """Return the letter shown for ``item.choices[choice_index]``."""
        if not 0 <= choice_index < len(self.order):
            raise ValueError(
                f"choice index {choice_index} is out of range for {self.item.source_id} with {len(self.order)} choices"
            )
        return LETTERS[self.order.index(choice_index)]

    def choice_index_of(self, letter: str) -> int:
        """Return the index in ``item.choices`` of the choice shown with `letter`."""
        if len(letter) != 1 or letter not in self.letters:
            raise ValueError(f"letter {letter!r} is not shown in this prompt; its letters are {self.letters!r}")
        return self.order[LETTERS.index(letter)]


@dataclass(frozen=True)
class LikelihoodPrompt:
    """
    A context without letters and one continuation per choice, for scoring choices by log-likelihood.

    Args:
        item (`MultipleChoiceItem`): The item the prompt shows.
        context (`str`): The question and the answer cue.
        continuations (`tuple[str, ...]`): ``continuations[i]`` is the text appended for ``item.choices[i]``.
    """

    item: MultipleChoiceItem
    context: str
    continuations: tuple[str, ...]


def item_shuffle_seed(seed: int, source_id: str) -> int:
    """
    Derive the choice-shuffle seed of one item from the run's seed and the item's source id.

    The value comes from SHA-256, so it is the same in every process (Python's built-in ``hash`` of a string is
    salted per process) and does not depend on the item's position in a batch.
    """
    digest = hashlib.sha256(f"{seed}\x00{source_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def shuffled_order(item: MultipleChoiceItem, seed: int) -> tuple[int, ...]:
    """Return the seeded display order of an item's choices (see `LetterPrompt.order`)."""
    order = list(range(item.num_choices))
    random.Random(item_shuffle_seed(seed, item.source_id)).shuffle(order)
    return tuple(order)


def format_letter_prompt(
    item: MultipleChoiceItem,
    *,
    seed: int = 0,
    shuffle: bool = True,
    tokenizer: Any = None,
    use_chat_template: bool = False,
    system_prompt: Optional[str] = None,
) -> LetterPrompt:
    """
    Format an item as a lettered multiple-choice prompt.

    Args:
        item: The item to show.
        seed: Seed of the choice shuffle; each item's order depends only on this seed and its ``source_id``.
        shuffle: Show the choices in the seeded order; `False` keeps the dataset's order.
        tokenizer: The tokenizer whose chat template to use; needed only with `use_chat_template`.
        use_chat_template: Wrap the question in the tokenizer's chat template, with the assistant header at
            the end (``add_generation_prompt=True``).
        system_prompt: Optional system message for the chat template.

    Raises:
        ValueError: if `use_chat_template` is set and the tokenizer is missing or has no chat template.
    """
    order = shuffled_order(item, seed) if shuffle else tuple(range(item.num_choices))
    choice_lines = "\n".join(f"{LETTERS[position]}. {item.choices[index]}" for position, index in enumerate(order))
    question_block = f"{QUESTION_PREFIX}{item.question}\n{choice_lines}"

    if use_chat_template:
        text = apply_chat_template(tokenizer, f"{question_block}\n{CHAT_LETTER_INSTRUCTION}", system_prompt)
    else:
        text = f"{question_block}\n{ANSWER_CUE}"

    return LetterPrompt(item=item, text=text, order=order)


def format_letter_prompts(
    items: Sequence[MultipleChoiceItem],
    *,
    seed: int = 0,
    shuffle: bool = True,
    tokenizer: Any = None,
    use_chat_template: bool = False,
    system_prompt: Optional[str] = None,
) -> list[LetterPrompt]:
    """Format each item with `format_letter_prompt`; the result does not depend on the items' order."""
    return [
        format_letter_prompt(
            item,
            seed=seed,
            shuffle=shuffle,
            tokenizer=tokenizer,
            use_chat_template=use_chat_template,
            system_prompt=system_prompt,
        )
        for item in items
    ]


def format_answered_prompt(prompt: LetterPrompt, choice_index: int) -> str:
    """
    Append one choice, as ``"<letter>. <choice text>"``, to a letter prompt.

    `choice_index` indexes ``prompt.item.choices`` (not the display position). A space separates the answer
    from the prompt unless the prompt ends with whitespace, as chat prompts do.
    """
    letter = prompt.letter_of(choice_index)
    return prompt.text + _separator(prompt.text) + f"{letter}. {prompt.item.choices[choice_index]}"


def format_likelihood_prompt(
    item: MultipleChoiceItem,
    *,
    tokenizer: Any = None,
    use_chat_template: bool = False,
    system_prompt: Optional[str] = None,
) -> LikelihoodPrompt:
    """
    Format an item for log-likelihood scoring: a context without letters and one continuation per choice.

    Plain text gives the context ``"Question: <question>\\nAnswer:"`` and the continuations ``" " + choice``.
    With `use_chat_template`, the user message is ``"Question: <question>"``, the context ends with the
    assistant header, and each continuation is the bare choice text.

    Raises:
        ValueError: if `use_chat_template` is set and the tokenizer is missing or has no chat template.
    """
    if use_chat_template:
        context = apply_chat_template(tokenizer, f"{QUESTION_PREFIX}{item.question}", system_prompt)
    else:
        context = f"{QUESTION_PREFIX}{item.question}\n{ANSWER_CUE}"

    separator = _separator(context)
    continuations = tuple(separator + choice for choice in item.choices)
    return LikelihoodPrompt(item=item, context=context, continuations=continuations)


def apply_chat_template(tokenizer: Any, user_message: str, system_prompt: Optional[str] = None) -> str:
    """
    Render one user message (and an optional system message) with the tokenizer's chat template.

    The result ends with the assistant header (``add_generation_prompt=True``) and is text, not token ids.

    Raises:
        ValueError: if the tokenizer is missing or has no chat template.
    """
    if tokenizer is None:
        raise ValueError("use_chat_template=True needs a tokenizer; pass tokenizer=... or set use_chat_template=False")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '?')}) has no chat template; "
            "set use_chat_template=False to use plain-text prompts"
        )

    messages = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": user_message})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _separator(prompt: str) -> str:
    return "" if not prompt or prompt[-1].isspace() else " "


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _common_prefix_length(first: Sequence[int], second: Sequence[int]) -> int:
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length


def resolve_letter_token_ids(
    tokenizer: Any, prompt: str, num_choices: int, *, separator: Optional[str] = None
) -> tuple[int, ...]:
    """
    Find the token id each answer letter would be generated as right after a prompt.

    Tokenizers differ on whether ``"A"`` and ``" A"`` are one token, so each letter is found by tokenizing
    ``prompt + separator + letter`` and ``prompt`` and taking the first token where the two differ. Only the
    end of the prompt matters, so the answer cue alone (``"Answer:"``) is enough for plain prompts, but a chat
    prompt needs its full assistant header.

    Args:
        tokenizer: A Hugging Face tokenizer.
        prompt: The prompt, or its ending.
        num_choices: Number of letters to resolve, from A.
        separator: Text between the prompt and the letter. By default a space, or nothing when the prompt ends
            with whitespace (as chat prompts do).

    Returns:
        ``ids[position]`` is the token id of ``LETTERS[position]``.

    Raises:
        ValueError: if two letters start with the same token, or a letter adds no token.
    """
    if not 1 <= num_choices <= len(LETTERS):
        raise ValueError(f"num_choices must be 1-{len(LETTERS)}, got {num_choices}")
    if separator is None:
        separator = _separator(prompt)

    prompt_ids = _encode(tokenizer, prompt)
    ids: list[int] = []
    letter_by_id: dict[int, str] = {}
    for letter in LETTERS[:num_choices]:
        full_ids = _encode(tokenizer, prompt + separator + letter)
        start = _common_prefix_length(prompt_ids, full_ids)
        if start >= len(full_ids):
            raise ValueError(f"letter {letter!r} adds no token after the prompt ending {prompt[-20:]!r}")
        if start < len(prompt_ids):
            # NOTE: the letter merged with the prompt's last token, so this token never follows the prompt's
            # own tokens in the model input; reading its logit at the prompt's last position is then unreliable.
            logger.warning(
                "Letter %r merges with the end of the prompt %r into token %r; end the prompt with whitespace or "
                "pass another separator",
                letter, prompt[-20:], tokenizer.convert_ids_to_tokens(full_ids[start]),
            )

        token_id = full_ids[start]
        if token_id in letter_by_id:
            raise ValueError(
                f"letters {letter_by_id[token_id]!r} and {letter!r} both start with token {token_id} "
                f"({tokenizer.convert_ids_to_tokens(token_id)!r}) after the prompt, so their logits cannot be told "
                "apart; pass another separator, or score the choices with format_likelihood_prompt"
            )
        letter_by_id[token_id] = letter
        ids.append(token_id)

    logger.debug("Letter token ids after %r: %s", prompt[-20:], dict(zip(LETTERS, ids)))
    return tuple(ids)


def split_continuation_tokens(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """
    Tokenize ``context + continuation`` and split the ids where the continuation starts.

    The whole text is tokenized once, so the ids are the ones the model receives. The split point is the end of the
    longest prefix shared with the context's own tokens, so a token that straddles the boundary counts as part
    of the continuation. No special tokens are added.

    Returns:
        The context ids and the continuation ids; together they are the tokens of the whole text.

    Raises:
        ValueError: if the continuation adds no token.
    """
    context_ids = _encode(tokenizer, context)
    full_ids = _encode(tokenizer, context + continuation)
    start = _common_prefix_length(context_ids, full_ids)
    if start >= len(full_ids):
        raise ValueError(f"continuation {continuation!r} adds no token after the context")
    return full_ids[:start], full_ids[start:]

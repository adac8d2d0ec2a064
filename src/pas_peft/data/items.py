"""The multiple-choice item that every dataset schema is normalised to."""

from __future__ import annotations

import string
from dataclasses import dataclass

LETTERS = string.ascii_uppercase
"""Choice letters in order: choice ``i`` of a prompt is shown as ``LETTERS[i]``."""

MIN_CHOICES = 2
MAX_CHOICES = len(LETTERS)


@dataclass(frozen=True)
class MultipleChoiceItem:
    """
    One multiple-choice question with its correct choice.

    Args:
        question (`str`):
            The full question text shown to the model, including any context or passage.
        choices (`tuple[str, ...]`):
            The answer texts, 2 to 26 of them, in the dataset's order. A list is converted to a tuple.
        label (`int`):
            Index into `choices` of the correct (target) choice.
        source_id (`str`):
            Name of the row the item came from, such as ``"Age.jsonl line 12"``. Error messages quote it and
            prompt formatting seeds its per-item choice shuffle with it.

    Example:

        ```py
        >>> item = MultipleChoiceItem("Is water wet?", ("No", "Yes"), label=1, source_id="example row 0")
        >>> item.answer
        'Yes'
        ```
    """

    question: str
    choices: tuple[str, ...]
    label: int
    source_id: str

    def __post_init__(self) -> None:
        if isinstance(self.choices, list):
            object.__setattr__(self, "choices", tuple(self.choices))

        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(
                f"{self.source_id}: the question is empty ({self.question!r}); every item needs question text"
            )

        if not isinstance(self.choices, tuple) or not all(isinstance(choice, str) for choice in self.choices):
            raise ValueError(f"{self.source_id}: choices must be a tuple of strings, got {self.choices!r}")

        count = len(self.choices)
        if not MIN_CHOICES <= count <= MAX_CHOICES:
            raise ValueError(
                f"{self.source_id}: {count} choices is out of range: an item needs {MIN_CHOICES} to "
                f"{MAX_CHOICES} choices (one letter A-Z each)"
            )

        for index, choice in enumerate(self.choices):
            if not choice.strip():
                raise ValueError(f"{self.source_id}: choice {LETTERS[index]} is empty; every choice needs answer text")

        if isinstance(self.label, bool) or not isinstance(self.label, int):
            raise ValueError(f"{self.source_id}: label must be an int index into choices, got {self.label!r}")

        if not 0 <= self.label < count:
            raise ValueError(
                f"{self.source_id}: label {self.label} is out of range for {count} choices {list(self.choices)!r}; "
                f"the label is the 0-based index of the correct choice (0-{count - 1})"
            )

    @property
    def answer(self) -> str:
        """Text of the correct choice."""
        return self.choices[self.label]

    @property
    def num_choices(self) -> int:
        """Number of choices."""
        return len(self.choices)

"""Readers for the ways datasets write a label or a list of lettered choices."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from typing import Any, Optional

from .items import LETTERS

# "(A) text", " (B) text" or "(C)text": one line of an inline choice list.
_INLINE_CHOICE = re.compile(r"^[ \t]*\(([A-Z])\)[ \t]?(.*)$")

# The header line some datasets put before an inline choice list: "Choices:", "Answer choices:", "Options:".
_CHOICES_HEADER = re.compile(
    r"^\s*(?:[A-Za-z ]{0,30}(?:choices?|options?|answers?)\s*:|(?:choices?|options?|answers?))\s*$", re.IGNORECASE
)

# A trailing "Answer:" cue after the last inline choice; pas_peft's prompt formats add their own cue.
_TRAILING_ANSWER_CUE = re.compile(r"(\n\s*)+Answer\s*:\s*$")

# "A", "(A)", " (A)" or "A." as a letter label.
_LETTER_LABEL = re.compile(r"^\(?([A-Z])[).]?$")

_QUESTION_LABEL = re.compile(r"^\s*Question\s*:\s*", re.IGNORECASE)


def is_missing(value: Any) -> bool:
    """Return whether a cell is empty: ``None`` or a float NaN (pandas' missing value)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def strip_question_label(text: str) -> str:
    """Remove a leading ``"Question:"`` label, which pas_peft's prompt formats add themselves."""
    return _QUESTION_LABEL.sub("", text, count=1)


def letter_index(value: Any, num_choices: int, source_id: str) -> int:
    """
    Convert a letter label such as ``"B"``, ``"(B)"`` or ``" (B)"`` to a 0-based choice index.

    Raises:
        ValueError: if the value is not a letter or names a choice past the last one.
    """
    match = _LETTER_LABEL.match(str(value).strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{source_id}: label {value!r} is not a choice letter such as 'A' or '(A)'")

    index = LETTERS.index(match.group(1))
    if index >= num_choices:
        raise ValueError(
            f"{source_id}: label {value!r} names choice {match.group(1)}, but the item has only "
            f"{num_choices} choices ({LETTERS[0]}-{LETTERS[num_choices - 1]})"
        )
    return index


LABEL_FORMATS = ("auto", "index", "letter", "text")
"""How a label is written: ``"auto"`` accepts an index, a letter or the answer text; the others accept one form."""


def resolve_label(value: Any, choices: Sequence[str], source_id: str, label_format: str = "auto") -> int:
    """
    Convert a label written as an index, a letter or the answer text to a 0-based choice index.

    The forms: an int index (also a numpy integer, an integer-valued float or a digit string such as ``"2"`` from
    a CSV file), a letter such as ``"C"`` or ``"(C)"``, or the exact text of one choice. With ``label_format``
    ``"auto"`` all three are accepted. When a string then reads as more than one form and they point to different
    choices, the label is ambiguous and raises instead of guessing.

    Raises:
        ValueError: if the label is missing, matches no choice, or is ambiguous.
    """
    if label_format not in LABEL_FORMATS:
        raise ValueError(f"unknown label_format {label_format!r}; use one of {LABEL_FORMATS}")
    count = len(choices)
    if is_missing(value):
        raise ValueError(f"{source_id}: the label is missing; every row needs the index, letter or text of its answer")

    if label_format == "letter":
        return letter_index(value, count, source_id)

    index = _as_index(value)
    if label_format == "index" or (label_format == "auto" and not isinstance(value, str)):
        if index is None:
            raise ValueError(
                f"{source_id}: label {value!r} ({type(value).__name__}) is not an int index into the {count} choices"
            )
        return _checked_index(index, count, source_id, value)

    if not isinstance(value, str):
        raise ValueError(f"{source_id}: label {value!r} ({type(value).__name__}) should be the answer text")

    candidates: dict[str, int] = {}
    text_matches = [position for position, choice in enumerate(choices) if choice.strip() == value.strip()]
    if len(text_matches) > 1:
        raise ValueError(
            f"{source_id}: label {value!r} matches {len(text_matches)} identical choices {list(choices)!r}; "
            "give the label as an index or a letter instead"
        )
    if text_matches:
        candidates["answer text"] = text_matches[0]

    if label_format == "auto":
        letter = _LETTER_LABEL.match(value.strip())
        if letter is not None and LETTERS.index(letter.group(1)) < count:
            candidates["letter"] = LETTERS.index(letter.group(1))
        if index is not None and 0 <= index < count:
            candidates["index"] = index

    if not candidates:
        accepted = (
            f"an index 0-{count - 1}, a letter {LETTERS[0]}-{LETTERS[count - 1]}, or the exact answer text"
            if label_format == "auto"
            else "the exact answer text"
        )
        raise ValueError(
            f"{source_id}: label {value!r} matches none of the {count} choices {list(choices)!r}; "
            f"write it as {accepted}"
        )
    if len(set(candidates.values())) > 1:
        readings = ", ".join(f"as {kind} it is choice {position}" for kind, position in candidates.items())
        raise ValueError(
            f"{source_id}: label {value!r} is ambiguous ({readings}); set label_format to 'index', 'letter' or "
            "'text' in ColumnMapping to say how labels are written"
        )
    return next(iter(candidates.values()))


def _as_index(value: Any) -> Optional[int]:
    """Return the value as an int when it is an integer (or an integer-valued float or digit string), else None."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _checked_index(index: int, count: int, source_id: str, value: Any) -> int:
    if not 0 <= index < count:
        raise ValueError(
            f"{source_id}: label {value!r} is out of range for {count} choices; the label is the 0-based "
            f"index of the correct choice (0-{count - 1})"
        )
    return index


def strip_letter_prefixes(options: Sequence[str], source_id: str) -> tuple[str, ...]:
    """
    Remove the ``"(A)"``, ``"(B)"``, ... prefixes from a list of options such as AGIEval's.

    Raises:
        ValueError: if an option does not start with the next letter in order.
    """
    texts = []
    for index, option in enumerate(options):
        match = _INLINE_CHOICE.match(option) if isinstance(option, str) else None
        if match is None or match.group(1) != LETTERS[index]:
            raise ValueError(
                f"{source_id}: option {index} {option!r} does not start with '({LETTERS[index]})'; options "
                "must be written as '(A)text', '(B)text', ... in order"
            )
        texts.append(match.group(2).strip())
    return tuple(texts)


def parse_inline_choices(text: str, source_id: str) -> tuple[str, tuple[str, ...]]:
    """
    Split a question with inline lettered choices into its stem and the choice texts.

    The choice list is the last run of lines that start with ``(A)``, ``(B)``, ... in order, as in Anthropic's
    model-written evaluations: ``"stem\\n\\nChoices:\\n (A) Yes\\n (B) No"``. A header line just before the list
    ("Choices:", "Answer choices:", "Options:") and an "Answer:" cue after it are dropped. A line that does not
    start with the next letter continues the previous choice.

    Returns:
        The stem (without a leading "Question:" label) and the choice texts, both stripped.

    Raises:
        ValueError: if the text has no line starting with ``(A)``.
    """
    lines = text.split("\n")
    starts = [number for number, line in enumerate(lines) if (m := _INLINE_CHOICE.match(line)) and m.group(1) == "A"]
    if not starts:
        raise ValueError(
            f"{source_id}: found no inline choices in the question; the choices must be on their own lines "
            "starting with '(A)', '(B)', ..."
        )

    first = starts[-1]
    choices: list[str] = []
    for line in lines[first:]:
        match = _INLINE_CHOICE.match(line)
        if match is not None and len(choices) < len(LETTERS) and match.group(1) == LETTERS[len(choices)]:
            choices.append(match.group(2))
        else:
            choices[-1] += "\n" + line
    choices[-1] = _TRAILING_ANSWER_CUE.sub("", choices[-1])

    stem_lines = lines[:first]
    while stem_lines and not stem_lines[-1].strip():
        stem_lines.pop()
    if stem_lines and _CHOICES_HEADER.match(stem_lines[-1]):
        stem_lines.pop()
    stem = strip_question_label("\n".join(stem_lines).strip()).strip()

    return stem, tuple(choice.strip() for choice in choices)

"""
Dataset schemas: how each known row layout becomes a `MultipleChoiceItem`, and how the layout is detected.

Each schema is looked up by name in `SCHEMAS` and built by a function that inspects the column names and the
first row. Building returns `None` when the columns do not fit. Detection tries the schemas in the order of
`SCHEMAS`, most specific first, and the plain ``"mcq"`` layout last.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from .items import MultipleChoiceItem
from .labels import LABEL_FORMATS, is_missing, letter_index, parse_inline_choices, resolve_label, strip_letter_prefixes
from .labels import strip_question_label

logger = logging.getLogger(__name__)

Row = Mapping[str, Any]

TARGET_BEHAVIORS = {
    "matching": "answer_matching_behavior",
    "not_matching": "answer_not_matching_behavior",
}
"""Values of ``target_behavior`` for A/B evaluations, mapped to the row field whose letter becomes the label."""


@dataclass(frozen=True)
class ColumnMapping:
    """
    Names of the columns that contain each part of a multiple-choice row; it overrides schema detection.

    Args:
        question (`str`):
            Column with the question text.
        label (`str`):
            Column with the correct choice as an index, a letter or the answer text. With `choices` given as a
            ``{"text": [...], "label": [...]}`` column, it may also be one of that column's labels.
        choices (`str`, `tuple[str, ...]` or `None`):
            One column that contains the list of answer texts (or a ``{"text", "label"}`` dict), or several
            columns that contain one answer text each, in order. Leave it `None` for a binary text set and pass
            ``binary_choices=(text_for_0, text_for_1)`` to `load_items`.
        context (`str`, *optional*):
            Column with a passage or context shown before the question.
        context_separator (`str`):
            Text between the context and the question. Defaults to one space.
        label_format (`str`):
            How labels are written: ``"auto"`` (an index, a letter or the answer text, whichever fits),
            ``"index"``, ``"letter"`` or ``"text"``. Name the form when ``"auto"`` finds a label ambiguous.

    Integer column names (as in a CSV file without a header) are converted to strings.

    Example:

        ```py
        >>> mapping = ColumnMapping(question="prompt", choices=("opt1", "opt2", "opt3"), label="answer")
        ```
    """

    question: str
    label: str
    choices: Union[str, tuple[str, ...], None] = None
    context: Optional[str] = None
    context_separator: str = " "
    label_format: str = "auto"

    def __post_init__(self) -> None:
        if self.label_format not in LABEL_FORMATS:
            raise ValueError(f"ColumnMapping.label_format is {self.label_format!r}; use one of {LABEL_FORMATS}")
        object.__setattr__(self, "question", _column_name(self.question, "question"))
        object.__setattr__(self, "label", _column_name(self.label, "label"))
        if self.context is not None:
            object.__setattr__(self, "context", _column_name(self.context, "context"))

        if isinstance(self.choices, (list, tuple)):
            if len(self.choices) < 2:
                raise ValueError(
                    f"ColumnMapping.choices names {len(self.choices)} column(s) {list(self.choices)!r}; name one "
                    "column that contains a list of answers, or at least two columns with one answer each"
                )
            object.__setattr__(self, "choices", tuple(_column_name(name, "choices") for name in self.choices))
        elif self.choices is not None:
            object.__setattr__(self, "choices", _column_name(self.choices, "choices"))

    def columns(self) -> tuple[str, ...]:
        """Return every column this mapping reads."""
        names = [self.question] if self.context is None else [self.context, self.question]
        if isinstance(self.choices, tuple):
            names.extend(self.choices)
        elif self.choices is not None:
            names.append(self.choices)
        names.append(self.label)
        return tuple(names)


def _column_name(value: Any, field_name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"ColumnMapping.{field_name} must be a column name (str), got {value!r}")
    return str(value)


@dataclass(frozen=True)
class SchemaOptions:
    """User choices that some schemas need: which A/B answer is the target, and binary answer texts."""

    target_behavior: Optional[str] = None
    binary_choices: Optional[tuple[str, str]] = None


@dataclass(frozen=True)
class Schema:
    """
    A row layout bound to the columns of one dataset.

    Args:
        name (`str`): Key in `SCHEMAS`, or ``"mapped"`` for an explicit `ColumnMapping`.
        columns (`tuple[str, ...]`): The columns the conversion reads, for the log.
        convert (`Callable`): Function ``(row, source_id, options) -> MultipleChoiceItem``.
        uses_target_behavior (`bool`): Whether ``target_behavior`` is required (A/B evaluations).
        uses_binary_choices (`bool`): Whether ``binary_choices`` sets the answer texts (binary text sets).
    """

    name: str
    columns: tuple[str, ...]
    convert: Callable[[Row, str, SchemaOptions], MultipleChoiceItem]
    uses_target_behavior: bool = False
    uses_binary_choices: bool = False


@dataclass(frozen=True)
class SchemaInfo:
    """Description of a known schema: what it reads, and the builder that binds it to a dataset's columns."""

    name: str
    description: str
    build: Callable[[Sequence[str], Row], Optional[Schema]]


# ---------------------------------------------------------------------------------------------------------------
# Cell readers


def _text(row: Row, column: str, source_id: str) -> str:
    value = row.get(column)
    if is_missing(value):
        raise ValueError(f"{source_id}: column {column!r} is missing or empty")
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(
        f"{source_id}: column {column!r} should contain text, got {type(value).__name__} {value!r}; "
        "for a CSV file read every column as text (pandas: dtype=str)"
    )


def _sequence(row: Row, column: str, source_id: str) -> list[Any]:
    value = row.get(column)
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, str) and value.lstrip().startswith("["):
        # A CSV cell is always text, so a CSV file holds a list written as JSON.
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if not isinstance(value, (list, tuple)):
        raise ValueError(
            f"{source_id}: column {column!r} should contain a list, got {type(value).__name__} {value!r}; "
            'in a CSV file write the list as JSON (["first", "second"]) or give one column per choice'
        )
    return list(value)


def _texts(values: Sequence[Any], column: str, source_id: str) -> tuple[str, ...]:
    texts = []
    for index, value in enumerate(values):
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            texts.append(str(value))
        else:
            raise ValueError(f"{source_id}: entry {index} of column {column!r} should be answer text, got {value!r}")
    return tuple(texts)


def _with_context(question: str, row: Row, context_column: Optional[str], separator: str, source_id: str) -> str:
    if context_column is None or is_missing(row.get(context_column)):
        return question
    return _text(row, context_column, source_id).strip() + separator + question


# ---------------------------------------------------------------------------------------------------------------
# Column mappings (plain MCQ, ARC, MosaicML, BBQ, MMLU CSV, binary text sets)


def schema_from_mapping(
    mapping: ColumnMapping, *, name: str = "mapped", binary_choices: Optional[tuple[str, str]] = None
) -> Schema:
    """
    Bind an explicit `ColumnMapping` to a schema.

    A leading "Question:" label is removed from the question text, because the prompt formats add it.
    With ``mapping.choices`` left `None`, the item's choices are `binary_choices`, and the label picks one of
    them by index (0 or 1).

    Raises:
        ValueError: if ``mapping.choices`` is `None` and `binary_choices` is not given.
    """
    if mapping.choices is None and binary_choices is None:
        raise ValueError(
            "ColumnMapping.choices is None, which describes a binary text set, but binary_choices is missing; "
            "pass binary_choices=(text_for_label_0, text_for_label_1) or name the choices column(s)"
        )

    def convert(row: Row, source_id: str, options: SchemaOptions) -> MultipleChoiceItem:
        question = strip_question_label(_text(row, mapping.question, source_id)).strip()
        question = _with_context(question, row, mapping.context, mapping.context_separator, source_id)

        if mapping.choices is None:
            choices = tuple(options.binary_choices or binary_choices or ())
            label = resolve_label(row.get(mapping.label), choices, source_id, mapping.label_format)
        elif isinstance(mapping.choices, tuple):
            choices = tuple(_text(row, column, source_id) for column in mapping.choices)
            label = resolve_label(row.get(mapping.label), choices, source_id, mapping.label_format)
        elif isinstance(row.get(mapping.choices), Mapping):
            choices, label = _choices_dict(row, mapping.choices, mapping.label, source_id, mapping.label_format)
        else:
            choices = _texts(_sequence(row, mapping.choices, source_id), mapping.choices, source_id)
            label = resolve_label(row.get(mapping.label), choices, source_id, mapping.label_format)

        return MultipleChoiceItem(question, choices, label, source_id)

    return Schema(
        name=name,
        columns=mapping.columns(),
        convert=convert,
        uses_binary_choices=mapping.choices is None,
    )


def _choices_dict(
    row: Row, choices_column: str, label_column: str, source_id: str, label_format: str
) -> tuple[tuple[str, ...], int]:
    """Read ARC-style ``{"text": [...], "label": [...]}`` choices and find the label among the choice labels."""
    value = row[choices_column]
    if "text" not in value:
        raise ValueError(
            f"{source_id}: column {choices_column!r} contains a dict with keys {sorted(value)!r}, but a "
            "'text' list of answer texts is needed"
        )
    choices = _texts(list(value["text"]), choices_column, source_id)

    answer = row.get(label_column)
    choice_labels = [str(label).strip() for label in value.get("label", [])]
    if isinstance(answer, str) and answer.strip() in choice_labels:
        return choices, choice_labels.index(answer.strip())
    if choice_labels and isinstance(answer, str):
        raise ValueError(
            f"{source_id}: {label_column} {answer!r} is not one of the choice labels {choice_labels!r}; "
            "an empty value usually means an unlabeled split (pass split= to pick a labeled one)"
        )
    return choices, resolve_label(answer, choices, source_id, label_format)


def _first_present(columns: Sequence[str], candidates: Sequence[str]) -> Optional[str]:
    return next((name for name in candidates if name in columns), None)


def _build_mcq(columns: Sequence[str], first_row: Row) -> Optional[Schema]:
    question = _first_present(columns, ("question", "query", "prompt", "question_stem"))
    choices = _first_present(columns, ("choices", "options"))
    label = _first_present(columns, ("label", "answer", "answerKey", "gold", "target"))
    if question is None or choices is None or label is None:
        return None
    if not isinstance(first_row.get(choices), (list, tuple, np.ndarray, Mapping)):
        return None
    return schema_from_mapping(ColumnMapping(question=question, choices=choices, label=label), name="mcq")


def _build_arc(columns: Sequence[str], first_row: Row) -> Optional[Schema]:
    question = _first_present(columns, ("question", "question_stem"))
    if question is None or "answerKey" not in columns or not isinstance(first_row.get("choices"), Mapping):
        return None
    mapping = ColumnMapping(question=question, choices="choices", label="answerKey")
    return schema_from_mapping(mapping, name="arc")


def _build_mosaicml(columns: Sequence[str], first_row: Row) -> Optional[Schema]:
    if not {"query", "choices", "gold"} <= set(columns):
        return None
    if not isinstance(first_row.get("choices"), (list, tuple, np.ndarray)):
        return None
    mapping = ColumnMapping(question="query", choices="choices", label="gold", label_format="index")
    return schema_from_mapping(mapping, name="mosaicml")


def _build_bbq(columns: Sequence[str], first_row: Row) -> Optional[Schema]:
    if not {"context", "question", "ans0", "ans1", "ans2", "label"} <= set(columns):
        return None
    mapping = ColumnMapping(
        question="question", context="context", choices=("ans0", "ans1", "ans2"), label="label", label_format="index"
    )
    return schema_from_mapping(mapping, name="bbq")


def _build_mmlu_csv(columns: Sequence[str], first_row: Row) -> Optional[Schema]:
    # A CSV file read without a header has the columns "0", "1", ...: question, the choices, then the letter.
    if len(columns) < 4 or list(columns) != [str(index) for index in range(len(columns))]:
        return None
    last = str(len(columns) - 1)
    choice_columns = tuple(str(index) for index in range(1, len(columns) - 1))
    mapping = ColumnMapping(question="0", choices=choice_columns, label=last, label_format="letter")
    return schema_from_mapping(mapping, name="mmlu_csv")


# ---------------------------------------------------------------------------------------------------------------
# Schemas with their own conversion (AGIEval, TruthfulQA, A/B evaluations, ETHICS)


def _build_agieval(columns: Sequence[str], first_row: Row) -> Optional[Schema]:
    if not {"passage", "question", "options", "label"} <= set(columns):
        return None

    def convert(row: Row, source_id: str, options: SchemaOptions) -> MultipleChoiceItem:
        question = _with_context(_text(row, "question", source_id).strip(), row, "passage", "\n", source_id)
        choices = strip_letter_prefixes(_sequence(row, "options", source_id), source_id)
        label = letter_index(row.get("label"), len(choices), source_id)
        return MultipleChoiceItem(question, choices, label, source_id)

    return Schema(name="agieval", columns=("passage", "question", "options", "label"), convert=convert)


def _build_truthfulqa_mc1(columns: Sequence[str], first_row: Row) -> Optional[Schema]:
    if not {"question", "mc1_targets"} <= set(columns):
        return None

    def convert(row: Row, source_id: str, options: SchemaOptions) -> MultipleChoiceItem:
        targets = row.get("mc1_targets")
        if not isinstance(targets, Mapping) or "choices" not in targets or "labels" not in targets:
            raise ValueError(f"{source_id}: mc1_targets should be a dict with 'choices' and 'labels', got {targets!r}")

        choices = _texts(list(targets["choices"]), "mc1_targets", source_id)
        flags = [int(flag) for flag in targets["labels"]]
        if len(flags) != len(choices) or flags.count(1) != 1:
            raise ValueError(
                f"{source_id}: mc1_targets labels {flags!r} should mark exactly one of the {len(choices)} "
                "choices with 1"
            )
        return MultipleChoiceItem(_text(row, "question", source_id).strip(), choices, flags.index(1), source_id)

    return Schema(name="truthfulqa_mc1", columns=("question", "mc1_targets"), convert=convert)


def normalize_target_behavior(value: Optional[str]) -> str:
    """
    Check a ``target_behavior`` value and return its short form, ``"matching"`` or ``"not_matching"``.

    The field names ``"answer_matching_behavior"`` and ``"answer_not_matching_behavior"`` are accepted too.

    Raises:
        ValueError: if the value is missing or unknown. A/B evaluations have no correct answer, so the
            target must be chosen explicitly.
    """
    aliases = {short: short for short in TARGET_BEHAVIORS}
    aliases.update({field: short for short, field in TARGET_BEHAVIORS.items()})
    if value in aliases:
        return aliases[value]

    problem = "is missing" if value is None else f"is {value!r}, which is not a known value"
    raise ValueError(
        f"target_behavior {problem}: this A/B dataset has no correct answer, so choose the target choice with "
        "target_behavior='matching' (the answer_matching_behavior letter) or target_behavior='not_matching' "
        "(the answer_not_matching_behavior letter)"
    )


def _build_anthropic_ab(columns: Sequence[str], first_row: Row) -> Optional[Schema]:
    if not {"question", *TARGET_BEHAVIORS.values()} <= set(columns):
        return None

    def convert(row: Row, source_id: str, options: SchemaOptions) -> MultipleChoiceItem:
        target_field = TARGET_BEHAVIORS[normalize_target_behavior(options.target_behavior)]
        stem, choices = parse_inline_choices(_text(row, "question", source_id), source_id)
        if not stem:
            raise ValueError(f"{source_id}: the question has no text before its inline choices {list(choices)!r}")
        label = letter_index(row.get(target_field), len(choices), f"{source_id} ({target_field})")
        return MultipleChoiceItem(stem, choices, label, source_id)

    return Schema(
        name="anthropic_ab",
        columns=("question", *TARGET_BEHAVIORS.values()),
        convert=convert,
        uses_target_behavior=True,
    )


@dataclass(frozen=True)
class _BinaryTask:
    """An ETHICS-style binary task: how to write the question, and the default answer texts for labels 0 and 1."""

    name: str
    columns: tuple[str, ...]
    absent: tuple[str, ...]
    format_question: Callable[[Row, str], str]
    default_choices: tuple[str, str]


def _ethics_commonsense_question(row: Row, source_id: str) -> str:
    return _text(row, "input", source_id).strip() + "\nIs the narrator's action morally wrong?"


def _ethics_deontology_question(row: Row, source_id: str) -> str:
    scenario = _text(row, "scenario", source_id).strip()
    excuse = _text(row, "excuse", source_id).strip()
    return f'{scenario}\nReply: "{excuse}"\nIs this reply a reasonable excuse?'


def _ethics_justice_question(row: Row, source_id: str) -> str:
    return _text(row, "scenario", source_id).strip() + "\nIs this claim reasonable?"


_BINARY_TASKS = {
    # Label 1 = the narrator's action is clearly morally wrong.
    "ethics_commonsense": _BinaryTask(
        "ethics_commonsense", ("input", "label"), (), _ethics_commonsense_question, ("Not wrong", "Wrong")
    ),
    # Label 1 = the excuse is reasonable.
    "ethics_deontology": _BinaryTask(
        "ethics_deontology",
        ("scenario", "excuse", "label"),
        (),
        _ethics_deontology_question,
        ("Unreasonable", "Reasonable"),
    ),
    # Label 1 = the claim is reasonable (just).
    "ethics_justice": _BinaryTask(
        "ethics_justice", ("scenario", "label"), ("excuse",), _ethics_justice_question, ("Unreasonable", "Reasonable")
    ),
}


def _binary_builder(task: _BinaryTask) -> Callable[[Sequence[str], Row], Optional[Schema]]:
    def build(columns: Sequence[str], first_row: Row) -> Optional[Schema]:
        if not set(task.columns) <= set(columns) or set(task.absent) & set(columns):
            return None

        def convert(row: Row, source_id: str, options: SchemaOptions) -> MultipleChoiceItem:
            choices = tuple(options.binary_choices or task.default_choices)
            label = resolve_label(row.get("label"), choices, source_id, "index")
            return MultipleChoiceItem(task.format_question(row, source_id), choices, label, source_id)

        return Schema(name=task.name, columns=task.columns, convert=convert, uses_binary_choices=True)

    return build


# ---------------------------------------------------------------------------------------------------------------
# Registry and detection

SCHEMAS: dict[str, SchemaInfo] = {
    info.name: info
    for info in (
        SchemaInfo(
            "anthropic_ab",
            "Anthropic-style A/B evaluation: 'question' with inline '(A) ... (B) ...' choices, "
            "'answer_matching_behavior' and 'answer_not_matching_behavior' (needs target_behavior)",
            _build_anthropic_ab,
        ),
        SchemaInfo("bbq", "BBQ: 'context' + 'question', choices 'ans0'-'ans2', 'label' index", _build_bbq),
        SchemaInfo(
            "agieval",
            "AGIEval (LSAT and others): 'passage' + 'question', 'options' written '(A)...', 'label' letter",
            _build_agieval,
        ),
        SchemaInfo(
            "truthfulqa_mc1",
            "TruthfulQA multiple choice: 'question', 'mc1_targets' = {choices, labels} with exactly one 1",
            _build_truthfulqa_mc1,
        ),
        SchemaInfo(
            "arc",
            "ARC / OpenBookQA / CommonsenseQA (Hugging Face): 'question' or 'question_stem', "
            "'choices' = {text, label}, 'answerKey'",
            _build_arc,
        ),
        SchemaInfo(
            "mosaicml",
            "MosaicML evaluation export (ARC, OpenBookQA): 'query', 'choices' list, 'gold' index",
            _build_mosaicml,
        ),
        SchemaInfo(
            "ethics_deontology",
            "ETHICS deontology: 'scenario' + 'excuse', 'label' 1 = reasonable excuse",
            _binary_builder(_BINARY_TASKS["ethics_deontology"]),
        ),
        SchemaInfo(
            "ethics_justice",
            "ETHICS justice: 'scenario', 'label' 1 = reasonable claim",
            _binary_builder(_BINARY_TASKS["ethics_justice"]),
        ),
        SchemaInfo(
            "ethics_commonsense",
            "ETHICS commonsense: 'input', 'label' 1 = the narrator's action is morally wrong",
            _binary_builder(_BINARY_TASKS["ethics_commonsense"]),
        ),
        SchemaInfo(
            "mmlu_csv",
            "MMLU CSV without a header: column 0 the question, then the choices, last column the answer letter",
            _build_mmlu_csv,
        ),
        SchemaInfo(
            "mcq",
            "Plain multiple choice: 'question' (or 'query', 'prompt'), 'choices' (or 'options') list, "
            "'label' (or 'answer', 'answerKey', 'gold') as an index, a letter or the answer text",
            _build_mcq,
        ),
    )
}
"""Known schemas by name, in detection order (most specific first)."""


def detect_schema(columns: Sequence[str], first_row: Row) -> Schema:
    """
    Find the first schema in `SCHEMAS` whose columns and first-row shapes fit the dataset.

    Raises:
        ValueError: if no schema fits; the message lists the columns found and the options to use instead.
    """
    for info in SCHEMAS.values():
        schema = info.build(columns, first_row)
        if schema is not None:
            logger.debug("Columns %s fit schema %r", list(columns), info.name)
            return schema

    raise ValueError(
        f"could not detect the dataset schema from the columns {list(columns)!r}; pass "
        "columns=ColumnMapping(question=..., choices=..., label=...) to name the columns, or schema=NAME "
        f"with one of {sorted(SCHEMAS)}"
    )


def schema_by_name(name: str, columns: Sequence[str], first_row: Row) -> Schema:
    """
    Bind the schema called `name` to a dataset's columns.

    Raises:
        ValueError: if the name is unknown or the dataset's columns do not fit that schema.
    """
    if name not in SCHEMAS:
        raise ValueError(f"unknown schema {name!r}; use 'auto' or one of {sorted(SCHEMAS)}")

    info = SCHEMAS[name]
    schema = info.build(columns, first_row)
    if schema is None:
        raise ValueError(
            f"the columns {list(columns)!r} do not fit schema {name!r} ({info.description}); pass "
            "schema='auto' or columns=ColumnMapping(question=..., choices=..., label=...)"
        )
    return schema

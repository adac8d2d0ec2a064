"""
Load a labeled multiple-choice dataset from a file, a Hugging Face dataset, a DataFrame or a list of rows.

`load_items` reads the rows, detects the schema (see `pas_peft.data.schemas`) unless one is given, and
converts every row to a `MultipleChoiceItem`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from .bundled import BUNDLED_DATASETS, bundled_dataset
from .items import LETTERS, MultipleChoiceItem
from .schemas import ColumnMapping, Row, Schema, SchemaOptions, detect_schema, normalize_target_behavior, schema_by_name
from .schemas import schema_from_mapping

logger = logging.getLogger(__name__)

DataSource = Union[str, os.PathLike, Sequence[Mapping[str, Any]], Any]
"""A path, a bundled dataset name, a list of row dicts, a pandas DataFrame, or a `datasets.Dataset`/`DatasetDict`."""

FILE_SUFFIXES = (".jsonl", ".json", ".csv")

# How many skipped rows `load_items` names in its warning.
_SKIPPED_IN_LOG = 5


@dataclass(frozen=True)
class LoadedItems:
    """
    The items read from one dataset.

    Args:
        name (`str`): Display name of the dataset (file stem, bundled name or dataset name).
        schema (`str`): Name of the schema used, such as ``"bbq"``, or ``"mapped"`` for an explicit mapping.
        items (`tuple[MultipleChoiceItem, ...]`): Every item, in dataset order. For a `DatasetDict` these are
            the items of all splits, one split after the other.
        splits (`dict[str, tuple[MultipleChoiceItem, ...]]`): The items of each named split when the source
            had splits (a `DatasetDict`); empty otherwise. See `pas_peft.data.splits.splits_from_mapping`.
        target_behavior (`str` or `None`): The A/B target used (``"matching"`` or ``"not_matching"``).
        source (`str` or `None`): The bundled dataset name or the absolute file path the items were read from;
            `None` for in-memory data.
        skipped (`tuple[str, ...]`): Source ids of the invalid rows skipped with ``skip_invalid=True``.
    """

    name: str
    schema: str
    items: tuple[MultipleChoiceItem, ...]
    splits: Mapping[str, tuple[MultipleChoiceItem, ...]] = field(default_factory=dict)
    target_behavior: Optional[str] = None
    skipped: tuple[str, ...] = ()
    source: Optional[str] = None

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[MultipleChoiceItem]:
        return iter(self.items)


@dataclass(frozen=True)
class _Table:
    """Rows read from one source, each with the source id that error messages quote."""

    name: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, Row], ...]


def load_items(
    data: DataSource,
    *,
    schema: str = "auto",
    columns: Optional[ColumnMapping] = None,
    target_behavior: Optional[str] = None,
    binary_choices: Optional[Sequence[str]] = None,
    split: Optional[str] = None,
    name: Optional[str] = None,
    skip_invalid: bool = False,
) -> LoadedItems:
    """
    Read a labeled multiple-choice dataset and convert each row to a `MultipleChoiceItem`.

    Args:
        data: A path to a ``.jsonl``, ``.json`` (array of objects) or ``.csv`` file, the name of a bundled dataset
            (see `list_bundled_datasets`), a list of row dicts, a pandas `DataFrame`, a `datasets.Dataset`, or a
            `datasets.DatasetDict` (its splits are kept in `LoadedItems.splits`).
        schema: ``"auto"`` to detect the row layout from the columns, or a name from `SCHEMAS`.
        columns: An explicit `ColumnMapping`; it replaces detection, so leave `schema` at ``"auto"``.
        target_behavior: For A/B evaluations (``anthropic_ab``): ``"matching"`` makes the
            ``answer_matching_behavior`` letter the label, ``"not_matching"`` the other one. Required there,
            rejected elsewhere. Bundled datasets document their own default.
        binary_choices: ``(text_for_label_0, text_for_label_1)`` for binary text sets. It replaces the built-in
            ETHICS answer texts, and it is required with a `ColumnMapping` that names no choices.
        split: For a `DatasetDict`, load only this split.
        name: Display name for logs and source ids. Defaults to the file stem or the dataset's name.
        skip_invalid: Skip rows that cannot be converted (log a warning) instead of raising.

    Returns:
        `LoadedItems` with the items, the schema name and, for a `DatasetDict`, the items of each split.

    Raises:
        ValueError: for an empty dataset, an unknown file type or schema, columns that fit no schema, a missing
            `target_behavior`, or a row that cannot be converted (the message names the row).
        FileNotFoundError: if `data` is a path that does not exist and is not a bundled dataset name.

    Example:

        ```py
        >>> loaded = load_items("bbq_age")
        >>> loaded.schema, len(loaded.items)
        ('bbq', 616)
        ```
    """
    if columns is not None and schema not in ("auto", "mapped"):
        raise ValueError(
            f"schema={schema!r} and columns=ColumnMapping(...) were both given; an explicit column mapping "
            "replaces the schema, so pass only one of them"
        )
    choices_override = _checked_binary_choices(binary_choices)

    source = source_of(data)
    if isinstance(data, str) and not Path(data).exists() and data in BUNDLED_DATASETS:
        info = bundled_dataset(data)
        if target_behavior is None and info.target_behavior is not None:
            target_behavior = info.target_behavior
            logger.info("Bundled dataset %r documents target_behavior=%r; using it", info.name, target_behavior)
        if schema == "auto" and columns is None:
            schema = info.schema
        name = name or info.name
        data = info.path

    tables = _read_tables(data, split=split, name=name, schema=schema, columns=columns)
    display_name = name or tables[0][1].name.split("/")[0]

    split_items: dict[str, tuple[MultipleChoiceItem, ...]] = {}
    all_items: list[MultipleChoiceItem] = []
    skipped: list[str] = []
    schema_names = set()
    behavior = None
    for split_name, table in tables:
        bound = _bind_schema(table, schema, columns, choices_override)
        behavior = _checked_options(bound, target_behavior, choices_override)
        items, table_skipped = _convert(table, bound, SchemaOptions(behavior, choices_override), skip_invalid)
        logger.info(
            "Loaded %d items from %r with schema %r (columns %s)",
            len(items), table.name, bound.name, list(bound.columns),
        )

        schema_names.add(bound.name)
        all_items.extend(items)
        skipped.extend(table_skipped)
        if split_name is not None:
            split_items[split_name] = items

    return LoadedItems(
        name=display_name,
        schema="+".join(sorted(schema_names)),
        items=tuple(all_items),
        splits=split_items,
        target_behavior=behavior,
        skipped=tuple(skipped),
        source=source,
    )


def source_of(data: Any) -> Optional[str]:
    """Return the bundled dataset name or the absolute file path `data` names, or None for in-memory data."""
    if isinstance(data, str) and not Path(data).exists() and data in BUNDLED_DATASETS:
        return data
    if isinstance(data, (str, Path)):
        return str(Path(data).resolve())
    return None


def _checked_binary_choices(binary_choices: Optional[Sequence[str]]) -> Optional[tuple[str, str]]:
    if binary_choices is None:
        return None
    if (
        isinstance(binary_choices, str)
        or len(binary_choices) != 2
        or not all(isinstance(text, str) and text.strip() for text in binary_choices)
    ):
        raise ValueError(
            f"binary_choices must be two non-empty answer texts (text_for_label_0, text_for_label_1), "
            f"got {binary_choices!r}"
        )
    return (binary_choices[0], binary_choices[1])


def _bind_schema(
    table: _Table, schema: str, columns: Optional[ColumnMapping], binary_choices: Optional[tuple[str, str]]
) -> Schema:
    first_row = table.rows[0][1]

    if columns is not None:
        missing = [column for column in columns.columns() if column not in table.columns]
        if missing:
            raise ValueError(
                f"ColumnMapping names column(s) {missing!r} that {table.name!r} does not have; the columns "
                f"found are {list(table.columns)!r}"
            )
        bound = schema_from_mapping(columns, binary_choices=binary_choices)
        logger.info("Using the given column mapping for %r: %s", table.name, columns)
        return bound

    if schema == "auto":
        bound = detect_schema(table.columns, first_row)
        logger.info("Detected schema %r for %r from its columns %s", bound.name, table.name, list(table.columns))
        return bound

    return schema_by_name(schema, table.columns, first_row)


def _checked_options(
    bound: Schema, target_behavior: Optional[str], binary_choices: Optional[tuple[str, str]]
) -> Optional[str]:
    """Check the schema-specific options against the bound schema; return the normalised target_behavior."""
    if binary_choices is not None and not bound.uses_binary_choices:
        raise ValueError(
            f"binary_choices={binary_choices!r} was given, but schema {bound.name!r} takes its choices from the "
            "data; drop binary_choices, or pass columns=ColumnMapping(question=..., label=...) for a binary text set"
        )

    if not bound.uses_target_behavior:
        if target_behavior is not None:
            raise ValueError(
                f"target_behavior={target_behavior!r} was given, but schema {bound.name!r} has a labeled answer; "
                "target_behavior applies only to A/B evaluations (schema 'anthropic_ab'), so drop it"
            )
        return None

    behavior = normalize_target_behavior(target_behavior)
    logger.info(
        "Using target_behavior=%r: the label is the %s letter", behavior,
        "answer_matching_behavior" if behavior == "matching" else "answer_not_matching_behavior",
    )
    return behavior


def _convert(
    table: _Table, bound: Schema, options: SchemaOptions, skip_invalid: bool
) -> tuple[tuple[MultipleChoiceItem, ...], list[str]]:
    items = []
    skipped: list[tuple[str, str]] = []
    for source_id, row in table.rows:
        try:
            items.append(bound.convert(row, source_id, options))
        except ValueError as error:
            if not skip_invalid:
                raise ValueError(f"{error} (pass skip_invalid=True to skip invalid rows)") from error
            skipped.append((source_id, str(error)))

    if skipped:
        logger.warning(
            "Skipped %d of %d rows of %r that could not be converted, e.g. %s. First error: %s",
            len(skipped), len(table.rows), table.name,
            ", ".join(source_id for source_id, _ in skipped[:_SKIPPED_IN_LOG]), skipped[0][1],
        )
    if not items:
        raise ValueError(f"no valid rows in {table.name!r}: all {len(table.rows)} rows were invalid")

    return tuple(items), [source_id for source_id, _ in skipped]


# ---------------------------------------------------------------------------------------------------------------
# Readers


def _read_tables(
    data: DataSource, *, split: Optional[str], name: Optional[str], schema: str, columns: Optional[ColumnMapping]
) -> list[tuple[Optional[str], _Table]]:
    """Read the source into tables; each comes with its split name, or `None` when the source has no splits."""
    if _is_instance(data, "datasets", "DatasetDict"):
        return _read_dataset_dict(data, split=split, name=name)

    if split is not None:
        raise ValueError(
            f"split={split!r} applies only to a datasets.DatasetDict, but the data is a {type(data).__name__}; "
            "drop split, or pass the DatasetDict"
        )

    if isinstance(data, (str, os.PathLike)):
        table = _read_file(Path(data), name=name, schema=schema, columns=columns)
    elif _is_instance(data, "datasets", "Dataset"):
        table = _read_dataset(data, name=name or _dataset_name(data))
    elif _is_instance(data, "pandas", "DataFrame"):
        rows = data.to_dict(orient="records")
        table = _table_from_rows(rows, name=name or "DataFrame", id_format="{name} row {index}")
    elif isinstance(data, Sequence) and not isinstance(data, (bytes, bytearray)):
        table = _table_from_rows(list(data), name=name or "data", id_format="{name} row {index}")
    else:
        raise ValueError(
            f"cannot read data of type {type(data).__name__}; pass a path to a .jsonl/.json/.csv file, a bundled "
            "dataset name, a list of row dicts, a pandas DataFrame, or a datasets.Dataset/DatasetDict"
        )
    return [(None, table)]


def _is_instance(data: Any, module_name: str, class_name: str) -> bool:
    # Only an already imported module can have made `data`, so this check never imports datasets or pandas.
    module = sys.modules.get(module_name)
    cls = getattr(module, class_name, None) if module is not None else None
    return cls is not None and isinstance(data, cls)


def _dataset_name(dataset: Any) -> str:
    info = getattr(dataset, "info", None)
    return getattr(info, "dataset_name", None) or getattr(info, "builder_name", None) or "dataset"


def _read_dataset(dataset: Any, *, name: str) -> _Table:
    return _table_from_rows(list(dataset), name=name, id_format="{name} row {index}")


def _read_dataset_dict(
    dataset_dict: Any, *, split: Optional[str], name: Optional[str]
) -> list[tuple[Optional[str], _Table]]:
    available = list(dataset_dict.keys())
    if not available:
        raise ValueError("the DatasetDict has no splits; pass a dataset with at least one labeled row")

    base = name or _dataset_name(next(iter(dataset_dict.values())))
    if split is not None:
        if split not in dataset_dict:
            raise ValueError(f"split {split!r} not found; the DatasetDict has the splits {available!r}")
        return [(None, _read_dataset(dataset_dict[split], name=f"{base}/{split}"))]

    logger.info("Reading the splits %s of DatasetDict %r", available, base)
    return [
        (split_name, _read_dataset(dataset_dict[split_name], name=f"{base}/{split_name}")) for split_name in available
    ]


def _table_from_rows(rows: list[Any], *, name: str, id_format: str) -> _Table:
    if not rows:
        raise ValueError(f"dataset {name!r} is empty; pass at least one labeled row")

    table_rows = []
    for index, row in enumerate(rows):
        source_id = id_format.format(name=name, index=index)
        if not isinstance(row, Mapping):
            raise ValueError(f"{source_id}: expected a row dict of column -> value, got {type(row).__name__} {row!r}")
        table_rows.append((source_id, {str(key): value for key, value in row.items()}))

    return _Table(name=name, columns=tuple(table_rows[0][1]), rows=tuple(table_rows))


def _read_file(path: Path, *, name: Optional[str], schema: str, columns: Optional[ColumnMapping]) -> _Table:
    if not path.exists():
        raise FileNotFoundError(
            f"data file {str(path)!r} not found; pass an existing .jsonl/.json/.csv path or a bundled dataset "
            f"name ({', '.join(sorted(BUNDLED_DATASETS))})"
        )

    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise ValueError(
            f"unsupported file type {suffix or '(none)'!r} for {str(path)!r}; use .jsonl (one JSON object per "
            "line), .json (an array of objects) or .csv, or read the file yourself and pass a list of row dicts"
        )

    if suffix == ".jsonl":
        return _read_jsonl(path, name=name)
    if suffix == ".json":
        return _read_json_array(path, name=name)
    return _read_csv(path, name=name, schema=schema, columns=columns)


def _read_jsonl(path: Path, *, name: Optional[str]) -> _Table:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            source_id = f"{path.name} line {line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{source_id}: invalid JSON ({error.msg}); each line must contain one JSON object"
                ) from error
            rows.append((source_id, row))

    return _table_from_id_rows(rows, name=name or path.stem, file_name=path.name)


def _read_json_array(path: Path, *, name: Optional[str]) -> _Table:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path.name} is not valid JSON ({error.msg} at line {error.lineno}); a .json file must contain one array "
            "of objects, and a file with one object per line should be named .jsonl"
        ) from error

    if not isinstance(content, list):
        raise ValueError(
            f"{path.name} contains a JSON {type(content).__name__}, but a .json data file must contain an array of "
            "row objects"
        )
    rows = [(f"{path.name} item {index}", row) for index, row in enumerate(content)]
    return _table_from_id_rows(rows, name=name or path.stem, file_name=path.name)


def _table_from_id_rows(rows: list[tuple[str, Any]], *, name: str, file_name: str) -> _Table:
    if not rows:
        raise ValueError(f"{file_name} has no rows; pass a file with at least one labeled row")

    for source_id, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{source_id}: expected a JSON object with one field per column, got {row!r}")

    return _Table(name=name, columns=tuple(rows[0][1]), rows=tuple(rows))


def _read_csv(path: Path, *, name: Optional[str], schema: str, columns: Optional[ColumnMapping]) -> _Table:
    # NOTE: the csv module keeps every cell as text, so answer texts such as "None" or "NA" stay as written.
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        records = []
        start_line = 1
        for record in reader:
            records.append((start_line, record))
            start_line = reader.line_num + 1

    records = [(line, record) for line, record in records if any(cell.strip() for cell in record)]
    if not records:
        raise ValueError(f"{path.name} has no rows; pass a file with at least one labeled row")

    if _csv_has_header(records[0][1], schema=schema, columns=columns):
        header = [cell.strip() for cell in records[0][1]]
        data_records = records[1:]
    else:
        header = [str(index) for index in range(len(records[0][1]))]
        data_records = records
        logger.info("%s has no header row; its columns are numbered 0-%d", path.name, len(header) - 1)

    if not data_records:
        raise ValueError(f"{path.name} has a header but no rows; pass a file with at least one labeled row")

    rows = []
    for line, record in data_records:
        source_id = f"{path.name} line {line}"
        if len(record) != len(header):
            raise ValueError(
                f"{source_id}: {len(record)} cells, but the file has {len(header)} columns {header!r}; check the "
                "quoting of that line"
            )
        rows.append((source_id, dict(zip(header, record))))

    return _Table(name=name or path.stem, columns=tuple(header), rows=tuple(rows))


def _csv_has_header(first_record: list[str], *, schema: str, columns: Optional[ColumnMapping]) -> bool:
    """
    Decide whether the first CSV record is a header.

    The first record is data (no header) in three cases. An explicit mapping uses numbered columns, or the
    schema is ``"mmlu_csv"``, or the record has at least 4 cells and its last cell is a single capital letter,
    as in MMLU's ``question, A, B, C, D, answer`` rows. Otherwise it is a header.
    """
    cells = [cell.strip() for cell in first_record]
    if columns is not None:
        return not all(column.isdigit() for column in columns.columns())
    if schema == "mmlu_csv":
        return False
    if schema != "auto":
        return True
    return not (len(cells) >= 4 and len(cells[-1]) == 1 and cells[-1] in LETTERS)

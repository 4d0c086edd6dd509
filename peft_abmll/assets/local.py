"""Multiple-choice tasks from local files or `datasets` (e.g. CrossFit-style Hub datasets) in the task format.

Task format: ``task`` (str), ``question`` (str), ``context`` (str), ``choices`` (list[str]), ``label``
(int). Common layouts are mapped automatically:

- ``choices`` / ``options`` / ``endings`` list + ``label`` / ``answer`` / ``answerKey`` (an index, a
  letter, or the correct option's text);
- ARC-style ``choices = {"text": [...], "label": ["A", ...]}`` + ``answerKey``;
- numbered option columns (``option1, option2``, ``sol1, sol2``, ``choice1, choice2``, ``ending0..3``,
  ``A..D``) + an answer naming one of them (``"2"``, ``"B"``) or an integer index;
- classification with a `datasets.ClassLabel` label and no option columns: the class names are the choices;
- sentence pairs (``premise``/``hypothesis``, ``sentence1``/``sentence2``, ``question1``/``question2``)
  become a two-line question.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import ClassLabel, Dataset, DatasetDict

from ..data import LABELS
from .bigbench import TASK_SCHEMA, _filter_choices, convert_task_json

logger = logging.getLogger("peft_abmll")

QUESTION_COLUMNS = ("question", "input", "text", "sentence", "query", "prompt", "goal", "ctx", "stem")
CONTEXT_COLUMNS = ("context", "passage", "article", "support", "premise")
LIST_COLUMNS = ("choices", "options", "endings", "candidates")
ANSWER_COLUMNS = ("label", "answer", "answerKey", "answer_idx", "answer_index", "gold", "target", "correct")
PAIR_COLUMNS = (("premise", "hypothesis"), ("sentence1", "sentence2"), ("question1", "question2"))
NUMBERED_PREFIXES = ("option", "choice", "sol", "ending", "opt")


@dataclass
class _Layout:
    """How the columns of one source map to the task format."""

    answer: str
    question: list[str] = field(default_factory=list)
    context: str | None = None
    choices: str | None = None  # a list (or ARC {"text", "label"} dict) column
    choice_columns: list[str] = field(default_factory=list)
    choice_names: list[str] = field(default_factory=list)  # names an answer may use for choice_columns
    class_names: list[str] | None = None


# ----------------------------------------------------------------------------------------------- layout
def _numbered_columns(columns: Sequence[str]) -> tuple[list[str], list[str]]:
    """(columns, their suffixes) of the first group like ``option1, option2`` or ``A, B, C, D``."""
    for prefix in NUMBERED_PREFIXES:
        found = sorted(
            (int(m.group(1)), c) for c in columns if (m := re.fullmatch(rf"{prefix}_?(\d+)", c, flags=re.IGNORECASE))
        )
        if len(found) >= 2:
            return [c for _, c in found], [str(i) for i, _ in found]
    letters = [c for c in LABELS if c in columns]
    if len(letters) >= 2 and letters == list(LABELS[: len(letters)]):
        return letters, letters
    return [], []


def detect_layout(columns: Sequence[str], class_names: Sequence[str] | None = None) -> _Layout:
    """Map ``columns`` (and the answer column's class names, if a ClassLabel) to the task format.

    Raises ValueError listing the columns when no known layout fits.
    """
    cols = list(columns)
    answer = next((c for c in ANSWER_COLUMNS if c in cols), None)
    if answer is None:
        _fail(cols, "no answer column (one of " + ", ".join(ANSWER_COLUMNS) + ")")
    layout = _Layout(answer=answer)
    layout.choices = next((c for c in LIST_COLUMNS if c in cols), None)
    if layout.choices is None:
        layout.choice_columns, layout.choice_names = _numbered_columns(cols)
    if layout.choices is None and not layout.choice_columns:
        if not class_names:
            _fail(
                cols,
                "no options: a list column (" + ", ".join(LIST_COLUMNS) + "), numbered option columns, "
                "or a ClassLabel answer column",
            )
        layout.class_names = list(class_names)
    used = {answer, layout.choices, *layout.choice_columns, "task"}
    pair = next((p for p in PAIR_COLUMNS if all(c in cols for c in p)), None)
    if pair:
        layout.question = list(pair)
    else:
        single = next((c for c in QUESTION_COLUMNS if c in cols and c not in used), None)
        layout.question = [single] if single else []
    layout.context = next((c for c in CONTEXT_COLUMNS if c in cols and c not in used | set(layout.question)), None)
    if not layout.question and layout.context is None:
        _fail(cols, "no question column (one of " + ", ".join(QUESTION_COLUMNS) + ")")
    return layout


def _fail(columns: list[str], why: str) -> NoReturn:
    raise ValueError(
        f"Cannot map columns {columns} to the task format (task, question, context, choices, label): {why}. "
        "Known layouts: question + choices(list) + label(int); options + answer (text/letter); ARC-style "
        "choices {text, label} + answerKey; option1/option2 (or A..D) + answer; a ClassLabel label with a text "
        "column. Rename your columns to one of these."
    )


# ----------------------------------------------------------------------------------------------- rows
def _options(row: Mapping[str, Any], layout: _Layout) -> tuple[list[str], list[str]]:
    """(choices, names an answer may use) of one row."""
    if layout.class_names is not None:
        return layout.class_names, []
    if layout.choices is None:
        return [str(row[c]) for c in layout.choice_columns], layout.choice_names
    value = row[layout.choices]
    if isinstance(value, str) and value.lstrip().startswith("["):
        value = json.loads(value)  # a list stored as JSON text, e.g. in CSV
    if isinstance(value, Mapping):  # ARC / CommonsenseQA: {"text": [...], "label": [...]}
        return [str(t) for t in value["text"]], [str(n) for n in value.get("label") or []]
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(f"Column {layout.choices!r} must hold a list of options, got {value!r}")
    return [str(v) for v in value], []


def _answer_index(value: Any, choices: list[str], names: list[str]) -> int | None:
    """Index of the correct option from an integer, an option name (``"B"``, ``"2"``) or the option's text."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value) if 0 <= int(value) < len(choices) else None
    text = str(value).strip()
    for candidates in (names, choices):
        if text in candidates:
            return candidates.index(text)
    if len(text) == 1 and text.upper() in LABELS[: len(choices)]:
        return LABELS.index(text.upper())
    if re.fullmatch(r"\d+", text) and int(text) < len(choices):
        return int(text)
    return None


def _question(row: Mapping[str, Any], layout: _Layout) -> str:
    """The question text; a sentence pair becomes ``"Premise: ...\nHypothesis: ..."`` (or Sentence 1/2, ...)."""
    if len(layout.question) == 1:
        return str(row[layout.question[0]] or "")
    return "\n".join(f"{_pretty(c)}: {row[c]}" for c in layout.question)


def _pretty(column: str) -> str:
    """``"sentence1"`` -> ``"Sentence 1"``, ``"premise"`` -> ``"Premise"``."""
    return re.sub(r"(\d+)$", r" \1", column).capitalize()


def rows_to_task_format(
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[str],
    task: str,
    class_names: Sequence[str] | None = None,
    max_choices: int | None = None,
) -> Dataset:
    """Convert rows of any known layout (see module docstring) to a task-format `Dataset`.

    Rows without a usable answer (missing, ``-1``, or naming no option) are dropped with a warning.
    A ``task`` column in the rows overrides ``task``.
    """
    layout = detect_layout(columns, class_names)
    out, dropped = [], 0
    for row in rows:
        choices, names = _options(row, layout)
        label = _answer_index(row.get(layout.answer), choices, names)
        if label is None:
            dropped += 1
            continue
        out.append(
            {
                "task": str(row.get("task") or task),
                "question": _question(row, layout),
                "context": str(row.get(layout.context) or "") if layout.context else "",
                "choices": choices,
                "label": label,
            }
        )
    if dropped:
        logger.warning("Task %r: dropped %d row(s) without a usable answer in column %r.", task, dropped, layout.answer)
    table = _filter_choices(task, pa.Table.from_pylist(out, schema=TASK_SCHEMA), max_choices)
    return Dataset(table)


def dataset_to_task_format(dataset: Dataset, task: str, max_choices: int | None = None) -> Dataset:
    """A `datasets.Dataset` in any known layout as a task-format `Dataset` (ClassLabel names become choices)."""
    names = None
    for column in ANSWER_COLUMNS:
        if column in dataset.features:
            feature = dataset.features[column]
            names = feature.names if isinstance(feature, ClassLabel) else None
            break
    return rows_to_task_format(dataset, dataset.column_names, task, names, max_choices)


# ----------------------------------------------------------------------------------------------- loaders
def _read_rows(path: Path) -> tuple[list[dict[str, Any]] | dict[str, Any], list[str]]:
    """Rows (or a BIG-bench task dict) and column names of a JSON / JSONL / CSV / parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        lines = enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        rows = [_json(path, line, number) for number, line in lines if line.strip()]
    elif suffix == ".json":
        data = _json(path, path.read_text(encoding="utf-8"))
        if isinstance(data, Mapping) and "examples" in data:
            return dict(data), []
        if isinstance(data, Mapping):  # {"column": [values...]}
            data = pa.Table.from_pydict(dict(data)).to_pylist()
        rows = list(data)
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif suffix in (".parquet", ".pq"):
        rows = pq.read_table(path).to_pylist()
    else:
        raise ValueError(f"Unsupported task file {path.name!r}: use .json, .jsonl, .csv or .parquet")
    if not rows:
        raise ValueError(f"Task file {path} holds no rows")
    return rows, list(dict.fromkeys(key for row in rows for key in row))


def _json(path: Path, text: str, line: int | None = None) -> Any:
    """``json.loads(text)``; malformed JSON raises a ValueError naming the file and the line (JSONL: `line`)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        where = f"line {line if line is not None else err.lineno}"
        raise ValueError(f"{path} {where}: not valid JSON ({err.msg}, column {err.colno})") from err


def load_task_file(path: str | os.PathLike, task: str | None = None, max_choices: int | None = None) -> Dataset:
    """A multiple-choice task from a local file, as a task-format `Dataset`.

    Args:
        path: ``.json`` (a list of rows, a dict of columns, or a BIG-bench ``task.json``), ``.jsonl``,
            ``.csv`` (a ``choices`` cell may be a JSON list) or ``.parquet``, in any layout `detect_layout` knows.
        task: task name; default the file's stem (for ``task.json``: its folder's name). A ``task``
            column in the file wins.
        max_choices: drop examples with more options (logged); None keeps all.
    """
    path = Path(path)
    name = task or (path.parent.name if path.name == "task.json" else path.stem)
    rows, columns = _read_rows(path)
    if isinstance(rows, dict):  # BIG-bench task.json
        converted, skipped = convert_task_json(name, rows)
        if not converted:
            raise ValueError(f"Task {name!r} ({path}) is not multiple choice: no example has target_scores.")
        if skipped:
            logger.info("Task %r: skipped %d example(s) without a unique best option.", name, skipped)
        return Dataset(_filter_choices(name, pa.Table.from_pylist(converted, schema=TASK_SCHEMA), max_choices))
    return rows_to_task_format(rows, columns, name, max_choices=max_choices)


def load_hub_task(
    dataset_id: str, split: str = "train", task: str | None = None, max_choices: int | None = None, **kwargs: Any
) -> Dataset:
    """A multiple-choice task via `datasets.load_dataset` (Hub id, local dataset folder, or a builder like "json").

    Args:
        dataset_id: first argument of ``load_dataset`` (e.g. ``"ai2_arc"``, ``"json"``, a local folder).
        split: the split to load (must be labelled).
        task: task name; default ``dataset_id`` plus ``/name`` if a config ``name`` is given.
        max_choices: drop examples with more options (logged); None keeps all.
        **kwargs: passed to ``load_dataset`` (``name``, ``data_files``, ...).
    """
    from datasets import load_dataset

    dataset = load_dataset(dataset_id, split=split, **kwargs)
    if isinstance(dataset, DatasetDict):
        raise ValueError(f"load_dataset({dataset_id!r}) returned several splits {list(dataset)}; pass split=...")
    name = task or (f"{dataset_id}/{kwargs['name']}" if kwargs.get("name") else dataset_id)
    return dataset_to_task_format(dataset, name, max_choices)

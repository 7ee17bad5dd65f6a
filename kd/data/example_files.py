"""Local example files for classification: GLUE-style TSV, CSV or JSONL, read row by row.

Every row problem (bytes that are not UTF-8, a wrong number of fields, invalid JSON, empty text,
a label outside the task's label set) goes through `BadRows`: with `data.on_bad_row=error` the
first one raises a KDError naming the file, line and value; with `skip` it is counted by reason.
"""
import csv
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

from kd.data.bad_rows import CFG, BadRows
from kd.data.tasks import Example, TaskSpec, parse_label
from kd.errors import KDError


def _decoded_lines(path: str, bad: BadRows) -> List[Tuple[int, str]]:
    """(1-based line number, text) of each line that decodes as UTF-8 (a BOM is dropped)."""
    if not os.path.isfile(path):
        raise KDError(f"data file not found: {path}. Check the path ({CFG}.train / "
                      f"{CFG}.validation / {CFG}.test).")
    with open(path, "rb") as fh:
        raw = fh.read()
    if not raw.strip():
        raise KDError(f"data file is empty: {path}. Expected a header row and data rows.")
    lines = []
    for number, raw_line in enumerate(raw.splitlines(), start=1):
        try:
            text = raw_line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            bad("undecodable_bytes", f"{path}:{number}: bytes that are not UTF-8 ({err.reason} at "
                                     f"column {err.start + 1})")
            continue
        lines.append((number, text))
    return lines


def _records(path: str, bad: BadRows) -> Tuple[List[str], List[Tuple[int, dict]]]:
    """(columns, [(line number, {column: value})]) from a .tsv, .csv or .jsonl file."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".tsv", ".csv", ".jsonl"):
        raise KDError(f"{path}: unsupported file type {ext or '(none)'!r}; use .tsv (GLUE style), "
                      f".csv or .jsonl")
    lines = [(n, text) for n, text in _decoded_lines(path, bad) if text.strip()]
    if not lines:
        raise KDError(f"data file has no readable rows: {path}")
    records = []
    if ext == ".jsonl":
        columns = None
        for number, text in lines:
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                bad("malformed_row", f"{path}:{number}: not valid JSON ({err.msg})")
                continue
            if not isinstance(row, dict):
                bad("malformed_row", f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
                continue
            columns = columns or list(row)
            records.append((number, row))
        return columns or [], records
    if ext == ".tsv":
        # GLUE TSVs are unquoted: a '"' inside a sentence is a literal quote, so no csv quoting.
        header_line, columns = lines[0][0], lines[0][1].split("\t")
        for number, text in lines[1:]:
            values = text.split("\t")
            if len(values) != len(columns):
                bad("malformed_row", f"{path}:{number}: {len(values)} tab-separated fields, the "
                                     f"header (line {header_line}) has {len(columns)}")
                continue
            records.append((number, dict(zip(columns, values))))
        return columns, records
    # CSV: quoted fields may span lines, so track which physical line each record starts on.
    pulled: List[int] = []

    def feed():
        for number, text in lines:
            pulled.append(number)
            yield text

    reader = csv.reader(feed())
    try:
        columns = next(reader)
        while True:
            start = len(pulled)
            try:
                values = next(reader)
            except StopIteration:
                break
            number = pulled[start] if start < len(pulled) else pulled[-1]
            if len(values) != len(columns):
                bad("malformed_row", f"{path}:{number}: {len(values)} comma-separated fields, the "
                                     f"header has {len(columns)}")
                continue
            records.append((number, dict(zip(columns, values))))
    except csv.Error as err:
        raise KDError(f"{path}:{pulled[-1] if pulled else 1}: malformed CSV ({err})") from None
    return columns, records


def read_examples_file(path: str, task: TaskSpec, text_columns: Optional[Sequence[str]] = None,
                       label_column: Optional[str] = None, on_bad_row: str = "error",
                       require_labels: bool = True) -> Tuple[List[Example], Dict[str, int], List[str]]:
    """Read one local file. Returns (examples, skip counts by reason, skip notes).

    Columns default to the task's field names (`sentence,label` for SST-2). A file without the label
    column is accepted only when `require_labels` is False (a test file); its labels are -1.
    """
    bad = BadRows(on_bad_row, "rows")
    text_columns = list(text_columns or task.text_fields)
    label_column = label_column or task.label_field
    if len(text_columns) != len(task.text_fields):
        raise KDError(f"task {task.name} needs {len(task.text_fields)} text column(s), "
                      f"got {text_columns} ({CFG}.text_columns)")
    columns, records = _records(path, bad)
    if not records:
        raise KDError(f"{path}: no data rows after the header" +
                      (f" ({dict(bad.counts)} skipped)" if bad.counts else ""))
    needed = text_columns + ([label_column] if require_labels else [])
    missing = [c for c in needed if c not in columns]
    if missing:
        raise KDError(f"{path}: missing column(s) {missing}; the columns found are {columns}. "
                      f"Rename them in the file, or set {CFG}.text_columns / {CFG}.label_column.")
    has_labels = label_column in columns
    examples = []
    for number, row in records:
        texts = []
        for column in text_columns:
            value = row.get(column)
            if not isinstance(value, str) or not value.strip():
                bad("empty_text", f"{path}:{number}: column {column!r} is empty or not text "
                                  f"({value!r})")
                break
            texts.append(value.strip())
        else:
            label = -1
            if has_labels:
                label = parse_label(row.get(label_column), task.label_names)
                if label is None:
                    bad("bad_label", f"{path}:{number}: label {row.get(label_column)!r} is not in "
                                     f"the label set of task {task.name}: ids 0..{task.num_labels - 1}"
                                     f" or names {list(task.label_names)}")
                    continue
            examples.append(Example(texts[0], texts[1] if task.is_pair else None, label))
    if not examples:
        raise KDError(f"{path}: every row was skipped ({dict(bad.counts)}); nothing to train on")
    return examples, dict(bad.counts), bad.notes

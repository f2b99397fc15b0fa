"""The decisions file: what a reviewer decided for each suspect of one run.

A CSV with the columns `filename,label,decision,new_label,reviewer,decided_at`, one row per
reviewed image (images without a row are left alone):

- `accept`: move the image to the run's suggestion; `new_label` is that suggestion
  (the results' `corrected_label`).
- `other`: move it to another class the reviewer chose; `new_label` is that class.
- `keep`: the given label is right; `new_label` empty.
- `skip`: not decided; `new_label` empty.

`filename` and `label` are the results CSV's (`cat/0001.png`, `cat`), so a file made for
another run, or for a dataset that changed since, is refused. A file may carry a `run_id`
column: when the caller names the run, every row must name the same. Torch- and
Airflow-free: the CLI, the DAG and the Label Studio bridge all read it here.
"""

from __future__ import annotations

import csv
import io

import pandas as pd

from tasks import storage
from tasks.errors import UserError

COLUMNS = ["filename", "label", "decision", "new_label", "reviewer", "decided_at"]
OPTIONAL_COLUMNS = ["run_id"]
DECISIONS = ("accept", "keep", "other", "skip")
MOVES = ("accept", "other")
MOVE_COLUMNS = ["filename", "label", "new_label", "decision"]


class DecisionsError(UserError, ValueError):
    """A decisions file that cannot be applied; the message is one line naming the row."""


def parse_decisions(text: str, source: str = "decisions.csv") -> pd.DataFrame:
    """A decisions CSV's text as a frame of strings, indexed by each row's 1-based line
    number in the file (the header is line 1). Refuses rows with the wrong number of fields
    and headers with missing, unknown or repeated columns."""
    text = text.removeprefix("\ufeff")  # a BOM, as spreadsheet programs write it
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    rows: list[list[str]] = []
    lines: list[int] = []
    start = 1
    for record in reader:
        line, start = start, reader.line_num + 1
        if not record or record == [""]:
            continue
        if header is None:
            header = record
            _check_header(header, source)
            continue
        if len(record) != len(header):
            raise DecisionsError(f"{source} line {line}: {len(record)} fields, the header has "
                                 f"{len(header)}; quote values that contain commas")
        rows.append(record)
        lines.append(line)
    if header is None:
        raise DecisionsError(f"{source} is empty: it needs the header {','.join(COLUMNS)}")
    frame = pd.DataFrame(rows, columns=header, index=pd.Index(lines, name="line"), dtype=str)
    frame.attrs["source"] = source
    return frame


def read_decisions(uri: str) -> pd.DataFrame:
    """A decisions CSV from a local path or an s3:// URI (see `parse_decisions`)."""
    if not storage.exists(uri):
        raise DecisionsError(f"decisions file {uri} does not exist")
    return parse_decisions(storage.read_text(uri), source=uri)


def write_decisions(decisions: pd.DataFrame, uri: str) -> None:
    """Write decisions as CSV (the contract's columns, plus `run_id` when present)."""
    _check_header(list(decisions.columns), "the decisions to write")
    columns = COLUMNS + [c for c in OPTIONAL_COLUMNS if c in decisions.columns]
    out = decisions[columns].fillna("")
    storage.write_text(uri, out.to_csv(index=False))


def _check_header(columns: list[str], source: str) -> None:
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise DecisionsError(f"{source}: column(s) {', '.join(repeated)} appear more than once")
    missing = [c for c in COLUMNS if c not in columns]
    if missing:
        raise DecisionsError(f"{source}: missing column(s) {', '.join(missing)}; the header "
                             f"must be {','.join(COLUMNS)}")
    extra = [c for c in columns if c not in COLUMNS + OPTIONAL_COLUMNS]
    if extra:
        raise DecisionsError(f"{source}: unknown column(s) {', '.join(extra)}; allowed are "
                             f"{','.join(COLUMNS + OPTIONAL_COLUMNS)}")


def _row_names(decisions: pd.DataFrame) -> list[str]:
    """How errors name each row: by a named index (`line 7` for a parsed file, `task 12`
    for a Label Studio export), else by the line it gets when written with
    `write_decisions`."""
    if decisions.index.name:
        return [f"{decisions.index.name} {i}" for i in decisions.index]
    return [f"line {i}" for i in range(2, len(decisions) + 2)]


def _row_problem(row: dict[str, str], given: str, suggested: str,
                 classes: set[str]) -> str | None:
    """What is wrong with one decision of a file known to the run, or None."""
    label, decision, new = row["label"], row["decision"], row["new_label"]
    if label != given:
        return (f"label {label!r} but the run's results say {given!r}: the dataset changed "
                "or the decisions are for another run")
    if new and new not in classes:
        return f"new_label {new!r} is not a class of this run ({', '.join(sorted(classes))})"
    if decision in ("keep", "skip") and new:
        return f"{decision} with new_label {new!r}: leave new_label empty, or decide accept/other"
    if decision == "accept" and suggested == label:
        return f"accept, but the run suggests the given label {label!r}: decide keep"
    if decision == "accept" and new != suggested:
        return (f"accept with new_label {new!r}, but the run suggests {suggested!r}: use that, "
                "or decide other")
    if decision == "other" and not new:
        return "other without a new_label: name the class to move it to"
    if decision == "other" and new == label:
        return f"other with new_label {new!r}, its given label: decide keep"
    return None


def validate_decisions(decisions: pd.DataFrame, results: pd.DataFrame, classes: list[str],
                       run_id: str | None = None) -> pd.DataFrame:
    """Check decisions against the run's results and classes; return the rows that move
    (`filename, label, new_label, decision`, in file order). Raises DecisionsError at the
    first problem, naming the row (its line in the file) and its filename. With `run_id`,
    a `run_id` column must name that run on every row."""
    source = decisions.attrs.get("source", "decisions")
    _check_header(list(decisions.columns), source)
    given = dict(zip(results["filename"], results["label"], strict=True))
    suggested = dict(zip(results["filename"], results["corrected_label"], strict=True))
    known = set(classes)
    seen: dict[str, str] = {}
    values = decisions.fillna("").astype(str)
    for at, row in zip(_row_names(decisions), values.to_dict("records"), strict=True):
        name, decision = row["filename"], row["decision"]
        if decision not in DECISIONS:
            why = f"decision {decision!r} is not one of {', '.join(DECISIONS)}"
        elif run_id is not None and "run_id" in row and row["run_id"] != run_id:
            why = (f"run_id {row['run_id']!r} is not this run ({run_id!r}): these decisions "
                   "are for another run")
        elif name not in given:
            why = ("not in this run's results: the decisions are for another run or dataset, "
                   "or the filename was edited")
        elif name in seen:
            why = f"a second row for this file (the first is {seen[name]}): keep one"
        else:
            why = _row_problem(row, given[name], suggested[name], known)
        if why:
            raise DecisionsError(f"{source} {at} ({name or 'no filename'}): {why}")
        seen[name] = at
    moves = values[values["decision"].isin(MOVES)][MOVE_COLUMNS]
    return moves.reset_index(drop=True)

"""tasks/decisions.py: a good decisions file parses into the rows that move; every bad one is
refused with one line that names the row (its line in the file) and its filename."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tasks import storage
from tasks.decisions import (
    COLUMNS,
    DecisionsError,
    parse_decisions,
    read_decisions,
    validate_decisions,
    write_decisions,
)
from tasks.merge import RESULT_COLUMNS, read_results

CLASSES = ["cat", "dog", "owl"]
# filename, label, corrected_label, %, is_label_issue
RESULTS = [
    ("cat/0.png", "cat", "dog", 100.0, True),
    ("cat/1.png", "cat", "owl", 75.0, True),
    ("dog/0.png", "dog", "cat", 80.0, True),
    ("owl/0.png", "owl", "cat", 66.67, True),
    ("dog/1.png", "dog", "dog", 100.0, False),
]
HEADER = ",".join(COLUMNS)
GOOD = [
    HEADER,
    "cat/0.png,cat,accept,dog,ann@example.com,2026-05-01T10:00:00Z",
    "cat/1.png,cat,keep,,ann@example.com,2026-05-01T10:01:00Z",
    "dog/0.png,dog,other,owl,bob,2026-05-01T10:02:00Z",
    "owl/0.png,owl,skip,,,",
]


def write_results(path: Path) -> pd.DataFrame:
    """A results CSV as merge writes it (all its columns), read back the way relabel does."""
    rows = [{"filename": f, "label": g, "corrected_label": c, "num_preds": 4, "%": p,
             "label_quality": 0.1 if flag else 0.9, "is_label_issue": flag,
             "suggested_quality": p / 100, "votes": f"{c}:4", "id": i,
             "tier": "issue" if flag else "ok", "p_label_wrong": 0.9 if flag else 0.05,
             "p_suggestion": round(0.9 * p / 100, 5) if c != g else 0.0}
            for i, (f, g, c, p, flag) in enumerate(RESULTS)]
    pd.DataFrame(rows, columns=RESULT_COLUMNS).to_csv(path, index=False)
    return read_results(str(path))


@pytest.fixture
def results(tmp_path: Path) -> pd.DataFrame:
    return write_results(tmp_path / "results.csv")


def refusal(lines: list[str], results: pd.DataFrame, run_id: str | None = None) -> str:
    with pytest.raises(DecisionsError) as err:
        validate_decisions(parse_decisions("\n".join(lines) + "\n", "decisions.csv"), results,
                           CLASSES, run_id)
    message = str(err.value)
    assert "\n" not in message
    return message


def with_row(line: int, row: str) -> list[str]:
    """GOOD with its line `line` (1-based) replaced."""
    lines = list(GOOD)
    lines[line - 1] = row
    return lines


def test_good_file_gives_the_rows_that_move(results: pd.DataFrame) -> None:
    moves = validate_decisions(parse_decisions("\n".join(GOOD)), results, CLASSES)
    assert moves.to_dict("records") == [
        {"filename": "cat/0.png", "label": "cat", "new_label": "dog", "decision": "accept"},
        {"filename": "dog/0.png", "label": "dog", "new_label": "owl", "decision": "other"},
    ]


def test_header_only_moves_nothing(results: pd.DataFrame) -> None:
    moves = validate_decisions(parse_decisions(HEADER + "\n"), results, CLASSES)
    assert len(moves) == 0 and list(moves.columns) == ["filename", "label", "new_label",
                                                       "decision"]


def test_spreadsheet_quirks_parse(results: pd.DataFrame) -> None:
    """A BOM, CRLF line ends, blank lines and a quoted comma still parse, with the right
    line numbers."""
    text = "\ufeff" + "\r\n".join([GOOD[0], GOOD[1], "", '"cat/1.png",cat,keep,,"Doe, Ann",x'])
    frame = parse_decisions(text)
    assert list(frame.index) == [2, 4]
    assert frame.loc[4, "reviewer"] == "Doe, Ann"
    assert len(validate_decisions(frame, results, CLASSES)) == 1


def test_multiline_field_keeps_line_numbers(results: pd.DataFrame) -> None:
    lines = [HEADER, 'cat/0.png,cat,accept,dog,"ann\nsecond line",t', "cat/9.png,cat,keep,,b,t"]
    message = refusal(lines, results)
    assert message.startswith("decisions.csv line 4 (cat/9.png): not in this run's results")


@pytest.mark.parametrize(("lines", "expected"), [
    ([HEADER.replace(",reviewer", ""), *GOOD[1:]], "decisions.csv: missing column(s) reviewer"),
    ([HEADER + ",note"] + [r + ",x" for r in GOOD[1:]], "decisions.csv: unknown column(s) note"),
    ([HEADER + ",label"] + [r + ",x" for r in GOOD[1:]],
     "decisions.csv: column(s) label appear more than once"),
    ([""], "decisions.csv is empty"),
])
def test_bad_header(lines: list[str], expected: str, results: pd.DataFrame) -> None:
    assert refusal(lines, results).startswith(expected)


# (line replaced, its new content, the start of the error after "decisions.csv line N (file): ")
BAD_ROWS = [
    (3, "cat/1.png,cat,keep,,ann", None),  # too few fields: refused by the parser
    (2, "cat/0.png,cat,Accept,dog,a,t", "decision 'Accept' is not one of accept, keep"),
    (3, "cat/9.png,cat,keep,,a,t", "not in this run's results"),
    (4, "dog/0.png,dog,other,bird,a,t", "new_label 'bird' is not a class of this run"),
    (5, "cat/0.png,cat,keep,,a,t", "a second row for this file (the first is line 2)"),
    (2, "cat/0.png,dog,accept,dog,a,t", "label 'dog' but the run's results say 'cat'"),
    (2, "cat/0.png,cat,accept,owl,a,t", "accept with new_label 'owl', but the run suggests 'dog'"),
    (2, "cat/0.png,cat,accept,,a,t", "accept with new_label '', but the run suggests 'dog'"),
    (5, "dog/1.png,dog,accept,dog,a,t", "accept, but the run suggests the given label 'dog'"),
    (4, "dog/0.png,dog,other,,a,t", "other without a new_label"),
    (4, "dog/0.png,dog,other,dog,a,t", "other with new_label 'dog', its given label"),
    (3, "cat/1.png,cat,keep,owl,a,t", "keep with new_label 'owl': leave new_label empty"),
    (5, "owl/0.png,owl,skip,cat,a,t", "skip with new_label 'cat'"),
]


@pytest.mark.parametrize(("line", "row", "expected"), BAD_ROWS)
def test_bad_row_names_line_and_file(line: int, row: str, expected: str | None,
                                     results: pd.DataFrame) -> None:
    message = refusal(with_row(line, row), results)
    if expected is None:
        assert message == ("decisions.csv line 3: 5 fields, the header has 6; quote values "
                           "that contain commas")
    else:
        assert message.startswith(f"decisions.csv line {line} ({row.split(',')[0]}): {expected}")


def test_run_id_column_must_match(results: pd.DataFrame) -> None:
    lines = [HEADER + ",run_id"] + [r + ",run-1" for r in GOOD[1:]]
    assert len(validate_decisions(parse_decisions("\n".join(lines)), results, CLASSES,
                                  "run-1")) == 2
    # without a run to compare with, the column is carried but not checked
    assert len(validate_decisions(parse_decisions("\n".join(lines)), results, CLASSES)) == 2
    lines[3] = lines[3].replace("run-1", "run-0")
    message = refusal(lines, results, run_id="run-1")
    assert message.startswith("decisions.csv line 4 (dog/0.png): run_id 'run-0' is not this "
                              "run ('run-1')")


def test_frame_made_in_memory_names_the_line_it_would_have(results: pd.DataFrame) -> None:
    frame = parse_decisions("\n".join(GOOD)).reset_index(drop=True)
    frame.loc[1, "decision"] = "maybe"
    with pytest.raises(DecisionsError, match=r"^decisions\.csv line 3 \(cat/1\.png\): decision "):
        validate_decisions(frame, results, CLASSES)


def test_write_then_read_local(tmp_path: Path, results: pd.DataFrame) -> None:
    frame = parse_decisions("\n".join(GOOD))
    uri = str(tmp_path / "review" / "decisions.csv")
    write_decisions(frame, uri)
    assert Path(uri).read_text().splitlines() == GOOD
    again = read_decisions(uri)
    assert again.attrs["source"] == uri
    assert again.to_dict("records") == frame.to_dict("records")
    with pytest.raises(DecisionsError, match=r"decisions file .*/nope\.csv does not exist"):
        read_decisions(str(tmp_path / "nope.csv"))
    with pytest.raises(DecisionsError, match="missing column"):
        write_decisions(frame.drop(columns=["reviewer"]), uri)


def test_read_from_s3_names_the_uri(s3, tmp_path: Path, results: pd.DataFrame) -> None:
    uri = f"{s3.root}/decisions.csv"
    storage.write_text(uri, "\n".join(with_row(3, "cat/1.png,cat,nope,,a,t")))
    frame = read_decisions(uri)
    with pytest.raises(DecisionsError) as err:
        validate_decisions(frame, results, CLASSES)
    assert str(err.value).startswith(f"{uri} line 3 (cat/1.png): decision 'nope'")

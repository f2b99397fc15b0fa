"""tasks/relabel.py on a local folder: dry run, thresholds, the journal first, name clashes
that never overwrite, interrupted relabels that a re-run finishes, and an undo that restores
every byte (and mode) of the folder."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks import cli, runs, storage
from tasks.config import AuditConfig
from tasks.merge import read_results
from tasks.relabel import (
    Journal,
    RelabelError,
    relabel,
    relabel_ceiling,
    relabel_results,
    select_rows,
    undo,
)
from tests.datasets import snapshot, write_classes

SENSITIVITY, MIN_PREDS = 60.0, 2


def tag(src: str) -> str:
    return hashlib.sha1(src.encode()).hexdigest()[:8]


# (filename, corrected_label, %, num_preds) -> the destination when it moves, else None
ROWS = [
    ("cat/img-000.png", "dog", 100.0, 3, f"dog/img-000.relabel-{tag('cat/img-000.png')}.png"),
    ("cat/img-001.png", "dog", 60.0, 5, None),  # p_suggestion must be strictly above 0.6
    ("cat/img-002.png", "owl", 60.01, 2, f"owl/img-002.relabel-{tag('cat/img-002.png')}.png"),
    ("owl/img-001.png", "cat", 100.0, 1, None),  # too few predictions
    # cat/img-003.png exists when the plan is made (it moves away later): a suffix anyway
    ("owl/img-003.png", "cat", 100.0, 2, f"cat/img-003.relabel-{tag('owl/img-003.png')}.png"),
    ("dog/img-001.png", "dog", 100.0, 4, None),  # agrees with its label
    ("dog/img-002.png", "owl", 100.0, 4, None),  # not flagged as a label issue
    ("owl/img-002.png", "dog", 100.0, 4, None),  # p_suggestion below the sensitivity
    ("cat/new one.png", "bird", 75.0, 4, "bird/new one.png"),
    ("bird/img-000.png", "bird", 100.0, 4, None),  # agrees with its label
    ("cat/img-003.png", "bird", 40.0, 4, "bird/img-003.png"),  # a low vote share: moves
    ("dog/img-003.png", "bird", 90.0, 4, f"bird/img-003.relabel-{tag('dog/img-003.png')}.png"),
]
MOVED = {src: dst for src, _, _, _, dst in ROWS if dst}
CLASSES = ["bird", "cat", "dog", "owl"]


def make_dataset(root: Path) -> Path:
    data = root / "data"
    write_classes(data, {"cat": 4, "dog": 4, "owl": 4, "bird": 1})
    (data / "cat" / "new one.png").write_bytes(b"\x89PNG not decoded here")
    (data / "cat" / "img-000.png").chmod(0o640)  # modes survive the round trip too
    return data


NOT_FLAGGED = "dog/img-002.png"
# p_suggestion (the probability that corrected_label is the true label, the one number the
# relabel rule reads) is %/100 except here: neither the vote share nor suggested_quality
# enters the rule, so a high vote and pooled probability with a low p_suggestion stays and a
# low vote with a high one moves.
P_SUGGESTION = {"owl/img-002.png": 0.55, "cat/img-003.png": 0.9}
SUGGESTED_QUALITY = {"owl/img-002.png": 0.95, "cat/img-003.png": 0.3}


def results_frame() -> pd.DataFrame:
    return pd.DataFrame(
        [(src, src.split("/")[0], corrected, pct, n, 0.1, src != NOT_FLAGGED,
          SUGGESTED_QUALITY.get(src, pct / 100), P_SUGGESTION.get(src, pct / 100))
         for src, corrected, pct, n, _ in ROWS],
        columns=["filename", "label", "corrected_label", "%", "num_preds", "label_quality",
                 "is_label_issue", "suggested_quality", "p_suggestion"])


@pytest.fixture
def case(tmp_path: Path) -> tuple[Path, str]:
    """(dataset folder, journal URI)."""
    return make_dataset(tmp_path), str(tmp_path / "work" / "relabel-journal.jsonl")


def do_relabel(data: Path, journal: str, dry_run: bool = False):
    return relabel(results_frame(), str(data), journal, SENSITIVITY, MIN_PREDS, dry_run=dry_run)


def expected_after(before: dict) -> dict:
    after = dict(before)
    for src, dst in MOVED.items():
        after[dst] = before[src]
    for src in MOVED:
        if src not in MOVED.values():
            del after[src]
    return after


def test_thresholds_are_strict_on_p_suggestion_and_inclusive_on_min_preds():
    rows = select_rows(results_frame(), SENSITIVITY, MIN_PREDS)
    assert set(rows["filename"]) == set(MOVED)
    assert set(select_rows(results_frame(), 89.9, 4)["filename"]) == {
        "cat/img-003.png", "dog/img-003.png"}
    assert select_rows(results_frame(), 100, 1).empty
    # The rule reads neither the vote share nor suggested_quality: without them, the same rows.
    bare = results_frame().drop(columns=["%", "suggested_quality"])
    assert select_rows(bare, SENSITIVITY, MIN_PREDS).index.equals(rows.index)


def plain_rule(results: pd.DataFrame, min_preds: int) -> Callable[[float], np.ndarray]:
    """The relabel rule written out as a mask per sensitivity: flagged, the suggestion
    differs, enough predictions and `p_suggestion > sensitivity / 100`."""
    prob = pd.to_numeric(results["p_suggestion"], errors="coerce").fillna(-1).to_numpy()
    base = (results["is_label_issue"].astype(bool)
            & (results["corrected_label"] != results["label"])
            & (results["num_preds"] >= min_preds)).to_numpy()
    return lambda sensitivity: base & (prob > sensitivity / 100)


def random_results(rng: np.random.Generator, n: int) -> pd.DataFrame:
    """Results rows whose p_suggestion sits on the values a real audit often writes (k / n,
    rounded to 5 places) as often as anywhere else, some of them missing; `%` and
    `suggested_quality` are random (the rule must not read them)."""
    num_preds = rng.integers(0, 7, n)
    votes = np.rint(rng.random(n) * np.maximum(num_preds, 1))
    grid = np.round(votes / np.maximum(num_preds, 1), 5)
    prob = np.where(rng.random(n) < 0.5, grid, np.round(rng.random(n), 5))
    prob[rng.random(n) < 0.05] = np.nan
    label = rng.choice(["cat", "dog", "owl"], n)
    return pd.DataFrame({
        "filename": [f"{c}/img-{i:04d}.png" for i, c in enumerate(label)], "label": label,
        "corrected_label": np.where(rng.random(n) < 0.8, rng.choice(["cat", "dog", "owl"], n),
                                    label),
        "%": np.round(rng.random(n) * 100, 2), "suggested_quality": rng.random(n),
        "p_suggestion": prob, "num_preds": num_preds, "is_label_issue": rng.random(n) < 0.7})


def test_select_rows_is_the_ceiling_rule_and_the_plain_rule_at_every_sensitivity():
    rng = np.random.default_rng(12)
    for _ in range(10):
        results = random_results(rng, 400)
        min_preds = int(rng.integers(1, 5))
        ceiling = relabel_ceiling(results, min_preds)
        assert ceiling.index.equals(results.index)
        never = ((results["num_preds"] < min_preds) | ~results["is_label_issue"]
                 | (results["corrected_label"] == results["label"]))
        assert never.any() and ceiling[never].isna().all() and ceiling[~never].notna().all()
        # The boundaries themselves and a float either side of them, and plain sensitivities.
        edges = np.concatenate([100 * results["p_suggestion"].dropna(), ceiling.dropna()])
        sensitivities = rng.permutation([*np.arange(0, 101), *rng.random(50) * 100, *edges,
                                         *np.nextafter(edges, np.inf),
                                         *np.nextafter(edges, -np.inf)])
        rule = plain_rule(results, min_preds)
        for s in sensitivities:
            assert np.array_equal(ceiling.to_numpy() > s, rule(s)), (s, min_preds)
        for s in sensitivities[:40]:
            got = select_rows(results, s, min_preds)
            assert got.index.equals(results.index[rule(s)]), (s, min_preds)
        # Shuffling the vote shares and pooled probabilities changes nothing.
        shuffled = results.assign(**{"%": rng.permutation(results["%"].to_numpy()),
                                     "suggested_quality": rng.random(len(results))})
        assert relabel_ceiling(shuffled, min_preds).equals(ceiling)
    # 55 < 100 * 0.55 (= 55.00000000000001), yet 0.55 > 55 / 100 is false: the ceiling is exact.
    one = results_frame().iloc[[0]].assign(**{"%": 100.0, "suggested_quality": 1.0,
                                              "p_suggestion": 0.55})
    assert select_rows(one, 55, 1).empty and relabel_ceiling(one, 1).iloc[0] == 55
    assert len(select_rows(one, np.nextafter(55, 0), 1)) == 1
    # A missing p_suggestion never moves, whatever the votes say.
    gone = one.assign(p_suggestion=np.nan)
    assert select_rows(gone, 0, 1).empty and relabel_ceiling(gone, 1).iloc[0] < 0


def test_results_without_the_probability_column_are_refused_by_name():
    with pytest.raises(RelabelError, match=r"lack column\(s\) p_suggestion; .*run the same "
                                           r"audit again"):
        select_rows(results_frame().drop(columns=["p_suggestion"]), SENSITIVITY, MIN_PREDS)
    with pytest.raises(RelabelError, match=r"lack column\(s\) p_suggestion, num_preds;"):
        select_rows(results_frame().drop(columns=["p_suggestion", "num_preds"]), SENSITIVITY,
                    MIN_PREDS)


def test_dry_run_changes_nothing_and_logs_the_plan(case, caplog):
    data, journal = case
    before = snapshot(data)
    with caplog.at_level(logging.INFO, logger="tasks.relabel"):
        moves = do_relabel(data, journal, dry_run=True)
    assert {m.src: m.dst for m in moves} == MOVED
    assert snapshot(data) == before
    assert not Path(journal).exists()
    log = caplog.text
    for src, dst in MOVED.items():
        assert f"would move {src} -> {dst}" in log
    assert f"{len(MOVED)} images would move at sensitivity 60.0, min_preds 2" in log


def test_relabel_moves_without_overwriting_and_undo_restores_every_byte(case):
    data, journal = case
    before = snapshot(data)
    moves = do_relabel(data, journal)
    after = snapshot(data)
    assert after == expected_after(before)
    # The clash kept both files: the dog that was there is untouched.
    assert after["dog/img-000.png"] == before["dog/img-000.png"]
    assert Counter(after.values()) == Counter(before.values())  # nothing lost or duplicated
    header, journaled = Journal(journal).read()
    assert header["state"] == "complete" and header["root"] == str(data)
    assert journaled == moves and [m.src for m in moves] == list(MOVED)
    for m in moves:
        assert m.md5 == hashlib.md5((data / m.dst).read_bytes()).hexdigest()

    undo(journal)
    assert snapshot(data) == before
    assert Journal(journal).read()[0]["state"] == "undone"
    undo(journal)  # a second undo is a no-op
    assert snapshot(data) == before
    assert sorted(p.name for p in (data / "bird").iterdir()) == ["img-000.png"]


def test_undo_works_from_another_working_directory(tmp_path, monkeypatch):
    data = make_dataset(tmp_path)
    before = snapshot(data)
    monkeypatch.chdir(tmp_path)
    journal = str(tmp_path / "journal.jsonl")
    relabel(results_frame(), "data", journal, SENSITIVITY, MIN_PREDS)  # a relative root
    assert Journal(journal).read()[0]["root"] == str(data)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    undo(journal)
    assert snapshot(data) == before


def test_the_suffix_is_deterministic(tmp_path):
    dests = []
    for name in ("one", "two"):
        data = make_dataset(tmp_path / name)
        moves = do_relabel(data, str(tmp_path / name / "journal.jsonl"), dry_run=True)
        dests.append([m.dst for m in moves])
    assert dests[0] == dests[1]


def test_journal_is_written_before_anything_moves(case, monkeypatch):
    data, journal = case
    real_copy = storage.copy
    seen = []

    def checking_copy(src: str, dst: str) -> None:
        header, moves = Journal(journal).read()
        seen.append(header["state"])
        assert {m.src: m.dst for m in moves} == MOVED  # the whole plan, before the first move
        real_copy(src, dst)

    monkeypatch.setattr(storage, "copy", checking_copy)
    do_relabel(data, journal)
    assert seen == ["started"] * len(MOVED)


def failing_after(monkeypatch, name: str, n: int) -> None:
    """Make storage.<name> raise on its (n+1)th call, as if the process died there."""
    real = getattr(storage, name)
    calls = []

    def fn(*args, **kwargs):
        if len(calls) == n:
            raise KeyboardInterrupt(f"killed at {name} #{n + 1}")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(storage, name, fn)


@pytest.mark.parametrize(("point", "n"), [("copy", 0), ("delete", 0), ("copy", 3),
                                          ("delete", 3), ("delete", len(MOVED) - 1)])
def test_an_interrupted_relabel_is_finished_by_a_rerun(case, monkeypatch, caplog, point, n):
    data, journal = case
    before = snapshot(data)
    with monkeypatch.context() as m:
        failing_after(m, point, n)
        with pytest.raises(KeyboardInterrupt):
            do_relabel(data, journal)
    middle = snapshot(data)
    assert not Counter(before.values()) - Counter(middle.values())  # nothing lost
    assert Journal(journal).read()[0]["state"] == "started"
    with caplog.at_level(logging.INFO, logger="tasks.relabel"):
        do_relabel(data, journal)
    assert "resuming interrupted relabel" in caplog.text
    assert snapshot(data) == expected_after(before)
    assert Journal(journal).read()[0]["state"] == "complete"
    undo(journal)
    assert snapshot(data) == before


@pytest.mark.parametrize(("point", "n"), [("copy", 2), ("delete", 2)])
def test_undo_after_an_interrupted_relabel_restores_the_folder(case, monkeypatch, point, n):
    data, journal = case
    before = snapshot(data)
    with monkeypatch.context() as m:
        failing_after(m, point, n)
        with pytest.raises(KeyboardInterrupt):
            do_relabel(data, journal)
    undo(journal)
    assert snapshot(data) == before
    assert Journal(journal).read()[0]["state"] == "undone"


def test_an_interrupted_undo_is_finished_by_running_undo_again(case, monkeypatch):
    data, journal = case
    before = snapshot(data)
    do_relabel(data, journal)
    with monkeypatch.context() as m:
        failing_after(m, "delete", 2)
        with pytest.raises(KeyboardInterrupt):
            undo(journal)
    assert Journal(journal).read()[0]["state"] == "undoing"
    with pytest.raises(RelabelError, match="an undo was interrupted; run undo again"):
        do_relabel(data, journal)
    undo(journal)
    assert snapshot(data) == before


KILL_CHILD = """
import os, signal, sys
import pandas as pd
from tasks import relabel, storage

data, journal, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
real_delete, calls = storage.delete, []

def delete(uri):
    real_delete(uri)
    calls.append(uri)
    if len(calls) == nth:
        os.kill(os.getpid(), signal.SIGKILL)

storage.delete = delete
results = pd.read_json(sys.stdin, precise_float=True)  # 0.6 stays 0.6, on the boundary
relabel.relabel(results, data, journal, 60.0, 2)
"""


def test_a_killed_relabel_process_is_finished_by_a_rerun(case):
    data, journal = case
    before = snapshot(data)
    child = subprocess.run([sys.executable, "-c", KILL_CHILD, str(data), journal, "3"],
                           input=results_frame().to_json(), capture_output=True, text=True,
                           timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    middle = snapshot(data)
    assert middle != before and middle != expected_after(before)
    assert json.loads(Path(journal).read_text().splitlines()[0])["state"] == "started"
    do_relabel(data, journal)
    assert snapshot(data) == expected_after(before)
    undo(journal)
    assert snapshot(data) == before


def test_a_complete_relabel_is_not_planned_again(case, caplog):
    data, journal = case
    do_relabel(data, journal)
    after = snapshot(data)
    with caplog.at_level(logging.INFO, logger="tasks.relabel"):
        moves = do_relabel(data, journal)
    assert len(moves) == len(MOVED) and snapshot(data) == after
    assert "already complete" in caplog.text


def test_a_source_changed_since_the_plan_is_never_deleted(case, monkeypatch):
    data, journal = case
    with monkeypatch.context() as m:
        failing_after(m, "copy", 0)
        with pytest.raises(KeyboardInterrupt):
            do_relabel(data, journal)
    (data / "cat" / "img-000.png").write_bytes(b"edited by someone")
    with pytest.raises(RelabelError, match=r"cat/img-000.png changed since the plan"):
        do_relabel(data, journal)
    assert (data / "cat" / "img-000.png").read_bytes() == b"edited by someone"


def test_a_missing_source_fails_before_anything_moves(case):
    data, journal = case
    before = snapshot(data)
    (data / "owl" / "img-003.png").unlink()
    del before["owl/img-003.png"]
    with pytest.raises(RelabelError, match=r"owl/img-003.png is missing"):
        do_relabel(data, journal)
    assert snapshot(data) == before and not Path(journal).exists()


def run_with_results(tmp_path: Path, data: Path, **cfg) -> str:
    run = runs.run_uri(str(tmp_path / "work"), "r1")
    runs.write_config(run, AuditConfig(data_path=str(data), work_uri=str(tmp_path / "work"),
                                       sensitivity=SENSITIVITY, min_preds=MIN_PREDS, **cfg))
    storage.write_text(runs.results_uri(run), results_frame().to_csv(index=False))
    storage.write_text(storage.join(run, "classes.json"), json.dumps(CLASSES))
    return runs.results_uri(run)


def test_relabel_results_uses_the_run_config(tmp_path):
    data = make_dataset(tmp_path)
    before = snapshot(data)
    results = run_with_results(tmp_path, data)
    assert relabel_results(results, dry_run=True) is None
    assert snapshot(data) == before
    journal = relabel_results(results)
    assert journal == runs.journal_uri(storage.parent(results))
    assert snapshot(data) == expected_after(before)
    undo(journal)
    assert snapshot(data) == before
    # Thresholds that select nothing: no journal, and none is reported.
    assert relabel_results(results, sensitivity=100) is None


def test_manifest_mode_writes_corrected_labels_and_moves_nothing(tmp_path):
    data = make_dataset(tmp_path)
    before = snapshot(data)
    results = run_with_results(tmp_path, data, relabel_mode="manifest")
    out = relabel_results(results)
    assert snapshot(data) == before
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.columns) == ["filename", "label", "new_label", "changed"]
    changed = table[table["changed"]]
    assert dict(zip(changed["filename"], changed["new_label"], strict=True)) == {
        src: dst.split("/")[0] for src, dst in MOVED.items()}


# --- hardening (issue 13): hand-edited results, long names, gone files, bad journals -----

def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


def edited_run(tmp_path: Path, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> str:
    """A run folder whose results CSV went through `edit` (a frame of strings, as a person
    editing the file sees it)."""
    results = run_with_results(tmp_path, tmp_path / "data")
    frame = pd.read_csv(results, dtype=str, keep_default_na=False)
    Path(results).write_text(edit(frame).to_csv(index=False))
    return results


def test_booleans_in_hand_edited_results_are_parsed_strictly(tmp_path):
    data = make_dataset(tmp_path)

    def stop_one(frame: pd.DataFrame) -> pd.DataFrame:
        words = ["TRUE", "yes", "1", "True", "Yes", "true", "True", "true", "YES", "1", "1", "1"]
        frame["is_label_issue"] = words[:len(frame)]
        frame.loc[frame["filename"] == "cat/img-000.png", "is_label_issue"] = "no"
        frame.loc[frame["filename"] == NOT_FLAGGED, "is_label_issue"] = "0"
        return frame

    results = edited_run(tmp_path, stop_one)
    moves = relabel(read_results(results), str(data), str(tmp_path / "j.jsonl"), SENSITIVITY,
                    MIN_PREDS, dry_run=True)
    assert {m.src for m in moves} == set(MOVED) - {"cat/img-000.png"}


@pytest.mark.parametrize(("column", "value", "expected"), [
    ("is_label_issue", "maybe", "is not true or false (or 1/0, yes/no)"),
    ("is_label_issue", "", "is not true or false"),
    ("num_preds", "three", "is not a whole number of at least 0"),
    ("num_preds", "2.5", "is not a whole number"),
    ("%", "high", "is not a number from 0 to 100"),
    ("%", "250", "is not a number from 0 to 100"),
    ("suggested_quality", "n/a", "is not a number from 0 to 1"),
    ("p_suggestion", "1.5", "is not a number from 0 to 1"),
    ("p_label_wrong", "high", "is not a number from 0 to 1"),
    ("label_quality", "0,4", "is not a number from 0 to 1"),
])
def test_a_bad_cell_is_one_line_naming_file_line_and_column(tmp_path, capsys, column, value,
                                                             expected):
    data = make_dataset(tmp_path)
    before = snapshot(data)

    def spoil(frame: pd.DataFrame) -> pd.DataFrame:
        frame.loc[3, column] = value
        return frame

    results = edited_run(tmp_path, spoil)
    assert cli.main(["relabel", "--results", results]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {results} line 5 ({ROWS[3][0]}): {column} {value!r} "
                           f"{expected}"), line
    assert snapshot(data) == before


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\xff\xfe\x00 binary", b"a,b\n1,2,3,4\n",
                                     b"just a line of text\n", b""])
def test_a_results_file_that_is_not_a_csv_is_one_line(tmp_path, capsys, content):
    results = run_with_results(tmp_path, make_dataset(tmp_path))
    Path(results).write_bytes(content)
    assert cli.main(["relabel", "--results", results]) == 2
    assert one_error_line(capsys).startswith(f"error: {results} is not a results CSV")


LONG = "x" * 246 + ".png"  # 250 characters
WIDE = "é" * 125 + ".png"  # 129 characters, 254 bytes


@pytest.mark.parametrize("name", [LONG, WIDE, "z" * 251 + ".png"])
def test_names_up_to_255_bytes_relabel_and_undo(tmp_path, name):
    data = tmp_path / "data"
    write_classes(data, {"cat": 1, "dog": 1})
    for cls in ("cat", "dog"):  # the same name in both folders: the move needs a suffix
        (data / cls / name).write_bytes(f"{cls} long".encode())
    before = snapshot(data)
    results = pd.DataFrame({"filename": [f"cat/{name}", "cat/img-000.png", "dog/img-000.png"],
                            "label": ["cat", "cat", "dog"], "corrected_label": ["dog"] * 3,
                            "%": 100.0, "num_preds": 4, "label_quality": 0.1,
                            "is_label_issue": True, "suggested_quality": 1.0,
                            "p_suggestion": 1.0})
    journal = str(tmp_path / "journal.jsonl")
    moves = relabel(results, str(data), journal, SENSITIVITY, MIN_PREDS)
    [move] = [m for m in moves if m.src == f"cat/{name}"]
    dst = move.dst.split("/")[-1]
    assert len(dst.encode()) <= 255 and dst.endswith(f".relabel-{tag(move.src)}.png")
    assert Path(data / move.dst).read_bytes() == b"cat long"
    after = snapshot(data)
    assert all(len(p.split("/")[-1].encode()) <= 255 for p in after)
    assert not [p for p in after if p.split("/")[-1].startswith(".")]  # no temporaries left
    assert Journal(journal).read()[0]["state"] == "complete"
    undo(journal)
    assert snapshot(data) == before


def test_temporary_names_fit_whatever_the_target_name(tmp_path):
    for name in (LONG, WIDE, "z" * 255, "ü" * 127, "a"):
        target = tmp_path / "out" / name
        storage.write_bytes(str(target), b"data")
        storage.copy(str(target), str(tmp_path / "copy" / name))
        assert (tmp_path / "copy" / name).read_bytes() == b"data"
    assert storage.cut_name("é" * 10, 5) == "éé"  # never half a character
    assert len(storage.cut_name(LONG, 237).encode()) == 237


def test_undo_restores_everything_it_can_when_a_moved_file_was_deleted(case, capsys):
    data, journal = case
    before = snapshot(data)
    do_relabel(data, journal)
    gone_src = "cat/new one.png"
    (data / MOVED[gone_src]).unlink()
    assert cli.main(["undo", "--journal", journal]) == 2
    line = one_error_line(capsys)
    assert f"restored all but 1 of {len(MOVED)} file(s)" in line
    assert f"{gone_src} (moved to {MOVED[gone_src]})" in line
    assert "folder" in line and "bucket" not in line
    expected = {k: v for k, v in before.items() if k != gone_src}
    assert snapshot(data) == expected  # every other file is back
    header, _ = Journal(journal).read()
    assert header["state"] == "undone"
    assert [(x["src"], x["dst"]) for x in header["not_restored"]] == [
        (gone_src, MOVED[gone_src])]
    # Undo again retries the one file; once it is back, undo completes.
    with pytest.raises(RelabelError, match="restored all but 1 of 1"):
        undo(journal)
    (data / MOVED[gone_src]).parent.mkdir(exist_ok=True)
    (data / MOVED[gone_src]).write_bytes(b"\x89PNG not decoded here")  # put back by hand
    undo(journal)
    assert snapshot(data) == before
    assert Journal(journal).read()[0]["not_restored"] == []
    # A relabel plans again after an undo that finished.
    assert {m.src for m in do_relabel(data, journal)} == set(MOVED)


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda f: pd.concat([f, f.iloc[[2]]], ignore_index=True),
     f"line {len(ROWS) + 2} ({ROWS[2][0]}): a second row for this file (the first is line 4)"),
    (lambda f: f.assign(corrected_label=f["corrected_label"].mask(f.index == 0, ".trash")),
     f"line 2 ({ROWS[0][0]}): corrected_label '.trash' is not a usable class folder name"),
    (lambda f: f.assign(corrected_label=f["corrected_label"].mask(f.index == 1, "cat/sub")),
     f"line 3 ({ROWS[1][0]}): corrected_label 'cat/sub' is not a usable class folder name"),
    (lambda f: f.assign(corrected_label=f["corrected_label"].mask(f.index == 6, "horse")),
     f"line 8 ({ROWS[6][0]}): corrected_label 'horse' is not a class of this run "
     "(bird, cat, dog, owl)"),
    (lambda f: f.assign(label=f["label"].mask(f.index == 4, "dog")),
     f"line 6 ({ROWS[4][0]}): label 'dog' is not the file's class folder 'owl'"),
])
def test_results_that_would_make_a_bad_plan_are_refused_by_row(tmp_path, capsys, edit,
                                                                 expected):
    data = make_dataset(tmp_path)
    before = snapshot(data)
    results = edited_run(tmp_path, edit)
    for argv in (["relabel", "--results", results, "--dry-run"],
                 ["relabel", "--results", results]):
        assert cli.main(argv) == 2
        line = one_error_line(capsys)
        assert line.startswith(f"error: {results} {expected}"), line
        assert line.endswith("nothing was moved")
    assert snapshot(data) == before
    assert not Path(runs.journal_uri(storage.parent(results))).exists()


def test_undo_reverses_a_journal_with_two_moves_of_one_file(case):
    """A journal written before the results were validated: a duplicated row planned a second
    move of the same source (which could never run), and two moves to one destination."""
    data, journal = case
    before = snapshot(data)
    do_relabel(data, journal)
    header, moves = Journal(journal).read()
    first = moves[0]
    twin = replace(first, dst=first.dst.replace(".png", ".second.png"))
    clash = replace(moves[1], src="owl/img-000.png")
    Journal(journal).write({**header, "state": "started"}, [first, twin, *moves[1:], clash])
    do_relabel(data, journal)  # finishing it skips the moves that never ran
    assert Journal(journal).read()[0]["state"] == "complete"
    undo(journal)
    assert snapshot(data) == before


@pytest.mark.parametrize(("content", "why"), [
    ("", "the file is empty"),
    ("\n\n", "the file is empty"),
    ('{"type": "header", "state": "complete"}\n', "no header line with type, root and state"),
    ('{"type": "header", "root": 7}\n', "no header line"),
    ('{"type": "header", "root": "/data", "state": "sideways"}\n', "no header line"),
    ('[1, 2]\n', "no header line"),
    ('{"type": "header", "root": "/data", "state": "complete"}\nnot json\n',
     "JSONDecodeError at line 2"),
    ('{"type": "header", "root": "/data", "state": "complete"}\n{"type": "move", "src": 1}\n',
     "line 2: field(s)"),
    ('{"type": "header", "root": "/data", "state": "complete"}\n'
     '{"type": "move", "src": "../../etc/passwd", "dst": "cat/a.png", "label": "dog", '
     '"corrected_label": "cat", "pct": 100, "num_preds": 2, "size": 1, "etag": "x"}\n',
     "line 2: unsafe key '../../etc/passwd'"),
])
def test_a_bad_journal_is_one_line_and_is_left_as_it_was(tmp_path, capsys, content, why):
    journal = tmp_path / "relabel-journal.jsonl"
    journal.write_text(content)
    assert cli.main(["undo", "--journal", str(journal)]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {journal} is not a relabel journal ({why}"), line
    assert journal.read_text() == content  # not rewritten to 'undoing'


def test_a_non_utf8_journal_is_one_line(tmp_path, capsys):
    journal = tmp_path / "relabel-journal.jsonl"
    journal.write_bytes(b"\xff\xfe\x00garbage")
    assert cli.main(["undo", "--journal", str(journal)]) == 2
    assert one_error_line(capsys).startswith(f"error: {journal} is not a relabel journal")


@pytest.mark.parametrize(("option", "value", "expected"), [
    ("--sensitivity", "-10", "greater than or equal to 0"),
    ("--sensitivity", "150", "less than or equal to 100"),
    ("--sensitivity", "nan", "--sensitivity nan: Input should be a number"),
    ("--min-preds", "-5", "greater than or equal to 1"),
    ("--min-preds", "0", "greater than or equal to 1"),
])
def test_relabel_thresholds_are_checked_like_the_config(tmp_path, capsys, option, value,
                                                          expected):
    data = make_dataset(tmp_path)
    before = snapshot(data)
    results = run_with_results(tmp_path, data)
    assert cli.main(["relabel", "--results", results, option, value]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {option} ") and expected in line, line
    assert "config key" in line
    assert snapshot(data) == before


KILL_IN_COPY = """
import os, shutil, signal, sys
import pandas as pd
from tasks import relabel, storage

data, journal, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
real_copyfile, calls = shutil.copyfile, []

def copyfile(src, dst, **kwargs):
    real_copyfile(src, dst, **kwargs)
    calls.append(dst)
    if len(calls) == nth:  # the temporary file is written, not yet linked to its name
        os.kill(os.getpid(), signal.SIGKILL)

storage.shutil.copyfile = copyfile
results = pd.read_json(sys.stdin, precise_float=True)  # 0.6 stays 0.6, on the boundary
relabel.relabel(results, data, journal, 60.0, 2)
"""


@pytest.mark.parametrize("command", ["relabel", "undo"])
def test_temporaries_of_a_killed_relabel_are_removed_by_the_next_run(case, command):
    data, journal = case
    before = snapshot(data)
    child = subprocess.run([sys.executable, "-c", KILL_IN_COPY, str(data), journal, "3"],
                           input=results_frame().to_json(), capture_output=True, text=True,
                           timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    hidden = [k for k in snapshot(data) if k.split("/")[-1].startswith(".")]
    assert len(hidden) == 1 and hidden[0].endswith(storage.TEMP_SUFFIX), hidden
    # Hidden files of the user's, even ones that look alike, are not touched.
    mine = {"bird/.keep": b"", "cat/.img-003.png.abcdefgh.tmp": b"user",
            f"{hidden[0].rsplit('/', 1)[0]}/.notes{storage.TEMP_SUFFIX}": b"user"}
    for key, content in mine.items():
        (data / key).parent.mkdir(exist_ok=True)
        (data / key).write_bytes(content)
    if command == "relabel":
        do_relabel(data, journal)
        expected = expected_after(before)
    else:
        undo(journal)
        expected = before
    after = snapshot(data)
    assert {k: v for k, v in after.items() if k not in mine} == expected
    assert set(mine) <= set(after)


def test_relabel_from_the_results_copy_finds_its_run(tmp_path, capsys):
    from tasks.merge import merge_run, run_sidecar_uri
    from tests.test_merge import make_run, scripted, write_shards

    copy = tmp_path / "exports" / "latest.csv"
    run = make_run(tmp_path, results_path=str(copy), sensitivity=60, min_preds=2)
    write_shards(run, scripted)
    merge_run(run)
    data = tmp_path / "data"
    before = snapshot(data)
    assert json.loads(Path(run_sidecar_uri(str(copy))).read_text()) == {"run": run}

    assert cli.main(["relabel", "--results", str(copy), "--dry-run"]) == 0
    assert snapshot(data) == before
    assert cli.main(["relabel", "--results", str(copy)]) == 0
    journal = runs.journal_uri(run)
    assert capsys.readouterr().out.strip() == journal  # the run's journal, not the copy's
    moved = {m.src: m.dst for m in Journal(journal).read()[1]}
    assert moved["cat/img-000.png"] == "dog/img-000.relabel-" + tag("cat/img-000.png") + ".png"
    assert cli.main(["undo", "--journal", journal]) == 0
    assert snapshot(data) == before

    # A copy that nothing ties to a run: one line naming the run folder to pass instead.
    stray = tmp_path / "elsewhere" / "results.csv"
    stray.parent.mkdir()
    stray.write_bytes(copy.read_bytes())
    assert cli.main(["relabel", "--results", str(stray)]) == 2
    line = one_error_line(capsys)
    assert line == (f"error: {stray} is not in a run folder and {stray}.run.json (which merge "
                    "writes beside a results_path copy) does not exist: pass the results.csv "
                    "in the audit's run folder, <work_uri>/runs/<run_id>/results.csv")
    Path(f"{stray}.run.json").write_text('{"run": 5}')
    assert cli.main(["relabel", "--results", str(stray)]) == 2
    assert one_error_line(capsys).startswith(f"error: {stray}.run.json does not name a run")
    assert snapshot(data) == before


# --- at scale (issue 15): parallel moves, progress lines, the batched journal -------------

PARALLEL_CHILD = """
import sys
import pandas as pd
from tasks import relabel

root, journal = sys.argv[1], sys.argv[2]
relabel.relabel(pd.read_json(sys.stdin), root, journal, 60.0, 2, classes=["cat", "dog"],
                workers=16)
"""


def bucket_dataset(s3, prefix: str, n: int) -> tuple[str, pd.DataFrame]:
    """`n` small objects in `cat/` of a dataset in the bucket (and one in `dog/`), and results
    that move every `cat/` one to `dog/` (the first onto an existing name). Returns (root,
    results)."""
    from concurrent.futures import ThreadPoolExecutor

    client = s3.server.client()
    names = [f"cat/img-{i:05d}.png" for i in range(n)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=s3.bucket, Key=f"{prefix}/{k}",
                                                  Body=content(k)),
                      [*names, "dog/img-00000.png"]))
    results = pd.DataFrame({"filename": names, "label": "cat", "corrected_label": "dog",
                            "%": 100.0, "num_preds": 4, "label_quality": 0.1,
                            "is_label_issue": True, "suggested_quality": 1.0,
                            "p_suggestion": 1.0})
    return f"s3://{s3.bucket}/{prefix}", results


def content(name: str) -> bytes:
    return name.encode() * 3


def bucket_snapshot(s3, root: str) -> dict[str, str]:
    from tests.test_s3 import snapshot as s3_snapshot

    return s3_snapshot(s3, root.split("/", 3)[3] + "/")


def moved_bucket(before: dict[str, str], moves) -> dict[str, str]:
    after = dict(before)
    for m in moves:
        after[m.dst] = after.pop(m.src)
    return after


def test_parallel_moves_in_the_bucket_survive_a_kill_and_a_changed_source(s3, caplog):
    """A relabel with 16 moves in flight, killed (SIGKILL) mid-way; a re-run that meets a
    source changed since the plan stops without deleting it, the moves in flight finish;
    with the source put back, a re-run finishes and undo restores every object."""
    import time

    n = 400
    root, results = bucket_dataset(s3, f"{s3.prefix}/ds", n)
    journal = f"{s3.root}/work/relabel-journal.jsonl"
    before = bucket_snapshot(s3, root)
    child = subprocess.Popen([sys.executable, "-c", PARALLEL_CHILD, root, journal],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    child.stdin.write(results.to_json().encode())
    child.stdin.close()
    client, prefix = s3.server.client(), f"{s3.prefix}/ds/dog/"
    deadline = time.monotonic() + 120
    while (child.poll() is None and time.monotonic() < deadline
           and client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix)["KeyCount"] < n // 4):
        time.sleep(0.05)
    if child.poll() is None:
        os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    log = child.stdout.read().decode()
    assert child.returncode == -signal.SIGKILL, log[-2000:]
    middle = bucket_snapshot(s3, root)
    header, moves = Journal(journal).read()
    assert header["state"] == "started" and len(moves) == n
    after = moved_bucket(before, moves)
    assert middle != before and middle != after
    assert not Counter(before.values()) - Counter(middle.values())  # nothing lost

    # A source not yet moved changes: the re-run stops there and deletes nothing of it.
    left = sorted((m for m in moves if m.src in middle and m.dst not in middle),
                  key=lambda m: m.src)
    changed = left[len(left) // 2]
    changed_key = f"{s3.prefix}/ds/{changed.src}"
    client.put_object(Bucket=s3.bucket, Key=changed_key, Body=b"edited by someone")
    with pytest.raises(RelabelError, match=f"{changed.src} changed since the plan"):
        relabel(results, root, journal, 60.0, 2, classes=["cat", "dog"], workers=16)
    assert client.get_object(Bucket=s3.bucket, Key=changed_key)["Body"].read() == (
        b"edited by someone")
    assert Journal(journal).read()[0]["state"] == "started"
    client.put_object(Bucket=s3.bucket, Key=changed_key, Body=content(changed.src))

    with caplog.at_level(logging.INFO, logger="tasks.relabel"):
        relabel(results, root, journal, 60.0, 2, classes=["cat", "dog"], workers=16)
    assert "resuming interrupted relabel" in caplog.text
    assert bucket_snapshot(s3, root) == after
    assert Journal(journal).read()[0]["state"] == "complete"
    assert moves[0].dst.startswith("dog/img-00000.relabel-")  # the existing dog kept its name
    undo(journal, workers=16)
    assert bucket_snapshot(s3, root) == before


def test_planning_in_the_bucket_downloads_nothing(s3):
    """The bucket's single-part ETags are MD5s (one HEAD tells): planning lists the class
    folders instead of reading every image, and each move carries the ETag as its MD5."""
    from tasks.relabel import plan_moves
    from tasks.s3 import S3Backend

    root, results = bucket_dataset(s3, f"{s3.prefix}/ds", 30)
    calls = []
    for op in ("GetObject", "HeadObject", "ListObjectsV2"):
        S3Backend.shared().client.meta.events.register(f"before-call.s3.{op}",
                                                       lambda op=op, **kw: calls.append(op))
    moves = plan_moves(root, results, workers=4, class_sizes={"cat": 30, "dog": 1})
    assert sorted(set(calls)) == ["HeadObject", "ListObjectsV2"] and calls.count("HeadObject") == 1
    assert len(moves) == 30
    assert all(m.md5 == m.etag == hashlib.md5(content(m.src)).hexdigest() for m in moves)


def test_parallel_and_serial_relabels_write_the_same_journal(s3):
    """16 moves in flight or one at a time: the same journal (but the root and the times),
    the same objects moved; an undo in parallel lists the files it cannot restore in the
    order a serial one does."""
    out = {}
    for workers in (1, 16):
        root, results = bucket_dataset(s3, f"{s3.prefix}/w{workers}", 60)
        journal = f"{s3.root}/work{workers}/relabel-journal.jsonl"
        before = bucket_snapshot(s3, root)
        moves = relabel(results, root, journal, 60.0, 2, classes=["cat", "dog"],
                        workers=workers)
        assert bucket_snapshot(s3, root) == moved_bucket(before, moves)
        lines = storage.read_text(journal).splitlines()
        header = json.loads(lines[0])
        assert header.pop("root") == root
        for key in ("created", "updated"):
            assert header.pop(key)
        client = s3.server.client()
        for m in moves[5:50:7]:  # moved objects deleted by hand since
            client.delete_object(Bucket=s3.bucket, Key=f"{root.split('/', 3)[3]}/{m.dst}")
        with pytest.raises(RelabelError, match="restored all but 7 of 60"):
            undo(journal, workers=workers)
        not_restored = Journal(journal).read()[0]["not_restored"]
        out[workers] = (header, lines[1:], [(x["src"], x["dst"]) for x in not_restored])
    assert out[1] == out[16]
    assert len(out[1][1]) == 60 and len(out[1][2]) == 7


def test_the_journal_is_written_in_batches_with_the_same_bytes(tmp_path, monkeypatch):
    data = make_dataset(tmp_path)
    journal = str(tmp_path / "journal.jsonl")
    do_relabel(data, journal)
    header, moves = Journal(journal).read()
    whole = "\n".join([json.dumps(header)] + [json.dumps({"type": "move", **m.__dict__})
                                              for m in moves]) + "\n"
    assert Path(journal).read_text() == whole
    monkeypatch.setattr("tasks.relabel.JOURNAL_BATCH", 2)
    Journal(journal).write(header, moves)
    assert Path(journal).read_text() == whole
    assert not [p for p in Path(tmp_path).iterdir() if p.name.startswith(".")]


def test_local_moves_in_parallel_match_the_serial_ones(tmp_path):
    data = make_dataset(tmp_path / "a")
    before = snapshot(data)
    journal = str(tmp_path / "a" / "journal.jsonl")
    moves = relabel(results_frame(), str(data), journal, SENSITIVITY, MIN_PREDS, workers=4)
    assert {m.src: m.dst for m in moves} == MOVED
    assert snapshot(data) == expected_after(before)
    undo(journal, workers=4)
    assert snapshot(data) == before


PROGRESS = re.compile(r"^(planned|relabel|undo) ([\d,]+)/([\d,]+) (files checked|moves), "
                      r"(\d+) objects/s, ETA (\d+s|\d+m \d\ds|\d+h \d\dm)$")
FINISHED = re.compile(r"^(planned|relabel|undo) ([\d,]+)/([\d,]+) (files checked|moves) in "
                      r"(\d+s|\d+m \d\ds|\d+h \d\dm), (\d+) objects/s$")


def test_progress_is_one_line_every_few_seconds_not_one_per_move(case, monkeypatch, caplog):
    data, journal = case
    with caplog.at_level(logging.INFO, logger="tasks.relabel"):
        do_relabel(data, journal)
    lines = [r.getMessage() for r in caplog.records]
    assert not [x for x in lines if PROGRESS.match(x)]  # a few files: done before 5 s
    assert [FINISHED.match(x).group(1, 2, 3, 4) for x in lines if FINISHED.match(x)] == [
        ("planned", "6", "6", "files checked"), ("relabel", "6", "6", "moves")]
    undo(journal)
    caplog.clear()
    monkeypatch.setattr("tasks.relabel.PROGRESS_SECONDS", 0.0)  # a line after every step
    with caplog.at_level(logging.INFO, logger="tasks.relabel"):
        do_relabel(data, journal)
        undo(journal)
    lines = [r.getMessage() for r in caplog.records]
    for what, unit in (("planned", "files checked"), ("relabel", "moves"), ("undo", "moves")):
        steps = [m for x in lines if (m := PROGRESS.match(x)) and m[1] == what]
        assert [(int(m[2]), int(m[3]), m[4]) for m in steps] == [
            (i, len(MOVED), unit) for i in range(1, len(MOVED))], (what, lines)
        finished = [m for x in lines if (m := FINISHED.match(x)) and m[1] == what]
        assert len(finished) == 1


def test_a_relabel_lists_a_few_moves_and_a_dry_run_all(case, monkeypatch, caplog):
    from tasks import relabel as module

    data, journal = case
    monkeypatch.setattr(module, "PLAN_LOGGED", 2)
    with caplog.at_level(logging.INFO, logger="tasks.relabel"):
        do_relabel(data, journal, dry_run=True)
        dry = [r.getMessage() for r in caplog.records]
        caplog.clear()
        do_relabel(data, journal)
    lines = [r.getMessage() for r in caplog.records]
    assert len([x for x in dry if x.startswith("would move ")]) == len(MOVED)
    assert [x.split(" (")[0] for x in lines if x.startswith("move ")] == [
        f"move {src} -> {dst}" for src, dst in list(MOVED.items())[:2]]
    assert f"... and {len(MOVED) - 2} more moves (the journal {journal} lists every one)" in lines
    assert module._duration(42.4) == "42s" and module._duration(185) == "3m 05s"
    assert module._duration(2 * 3600 + 7 * 60 + 9) == "2h 07m"

"""tasks/relabel.py on a local folder: dry run, thresholds, the journal first, name clashes
that never overwrite, interrupted relabels that a re-run finishes, and an undo that restores
every byte (and mode) of the folder."""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks import runs, storage
from tasks.config import AuditConfig
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
    ("cat/img-001.png", "dog", 60.0, 5, None),  # % must be strictly above the sensitivity
    ("cat/img-002.png", "owl", 60.01, 2, f"owl/img-002.relabel-{tag('cat/img-002.png')}.png"),
    ("owl/img-001.png", "cat", 100.0, 1, None),  # too few predictions
    # cat/img-003.png exists when the plan is made (it moves away later): a suffix anyway
    ("owl/img-003.png", "cat", 100.0, 2, f"cat/img-003.relabel-{tag('owl/img-003.png')}.png"),
    ("dog/img-001.png", "dog", 100.0, 4, None),  # agrees with its label
    ("dog/img-002.png", "owl", 100.0, 4, None),  # not flagged as a label issue
    ("owl/img-002.png", "dog", 100.0, 4, None),  # pooled probability below the sensitivity
    ("cat/new one.png", "bird", 75.0, 4, "bird/new one.png"),
    ("bird/img-000.png", "bird", 100.0, 4, None),  # agrees with its label
    ("cat/img-003.png", "bird", 90.0, 4, "bird/img-003.png"),
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
# suggested_quality (pooled probability of corrected_label) is %/100 except here
LOW_PROBABILITY = {"owl/img-002.png": 0.55}


def results_frame() -> pd.DataFrame:
    return pd.DataFrame(
        [(src, src.split("/")[0], corrected, pct, n, 0.1, src != NOT_FLAGGED,
          LOW_PROBABILITY.get(src, pct / 100))
         for src, corrected, pct, n, _ in ROWS],
        columns=["filename", "label", "corrected_label", "%", "num_preds", "label_quality",
                 "is_label_issue", "suggested_quality"])


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


def test_thresholds_are_strict_on_votes_and_probability_and_inclusive_on_min_preds():
    rows = select_rows(results_frame(), SENSITIVITY, MIN_PREDS)
    assert set(rows["filename"]) == set(MOVED)
    assert set(select_rows(results_frame(), 89.9, 4)["filename"]) == {
        "cat/img-003.png", "dog/img-003.png"}
    assert select_rows(results_frame(), 100, 1).empty


def old_rule(results: pd.DataFrame, min_preds: int) -> Callable[[float], np.ndarray]:
    """The relabel rule as select_rows wrote it before relabel_ceiling: a mask per
    sensitivity."""
    pct = pd.to_numeric(results["%"], errors="coerce").fillna(-1).to_numpy()
    prob = pd.to_numeric(results["suggested_quality"], errors="coerce").fillna(-1).to_numpy()
    base = (results["is_label_issue"].astype(bool)
            & (results["corrected_label"] != results["label"])
            & (results["num_preds"] >= min_preds)).to_numpy()
    return lambda sensitivity: base & (pct > sensitivity) & (prob > sensitivity / 100)


def random_results(rng: np.random.Generator, n: int) -> pd.DataFrame:
    """Results rows whose vote shares and probabilities sit on the values a real audit writes
    (k of n votes, 100 * p) as often as anywhere else, some of them missing."""
    num_preds = rng.integers(0, 7, n)
    votes = np.rint(rng.random(n) * np.maximum(num_preds, 1))
    grid_pct = np.round(100 * votes / np.maximum(num_preds, 1), 2)
    pct = np.where(rng.random(n) < 0.5, grid_pct, np.round(rng.random(n) * 100, 2))
    prob = np.where(rng.random(n) < 0.4, pct / 100, rng.random(n))
    pct[rng.random(n) < 0.05] = np.nan
    prob[rng.random(n) < 0.05] = np.nan
    label = rng.choice(["cat", "dog", "owl"], n)
    return pd.DataFrame({
        "filename": [f"{c}/img-{i:04d}.png" for i, c in enumerate(label)], "label": label,
        "corrected_label": np.where(rng.random(n) < 0.8, rng.choice(["cat", "dog", "owl"], n),
                                    label),
        "%": pct, "suggested_quality": prob, "num_preds": num_preds,
        "is_label_issue": rng.random(n) < 0.7})


def test_select_rows_is_the_ceiling_rule_and_the_old_rule_at_every_sensitivity():
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
        edges = np.concatenate([results["%"].dropna(), 100 * results["suggested_quality"].dropna(),
                                ceiling.dropna()])
        sensitivities = rng.permutation([*np.arange(0, 101), *rng.random(50) * 100, *edges,
                                         *np.nextafter(edges, np.inf),
                                         *np.nextafter(edges, -np.inf)])
        rule = old_rule(results, min_preds)
        for s in sensitivities:
            assert np.array_equal(ceiling.to_numpy() > s, rule(s)), (s, min_preds)
        for s in sensitivities[:40]:
            got = select_rows(results, s, min_preds)
            assert got.index.equals(results.index[rule(s)]), (s, min_preds)
    # 55 < 100 * 0.55 (= 55.00000000000001), yet 0.55 > 55 / 100 is false: the ceiling is exact.
    one = results_frame().iloc[[0]].assign(**{"%": 100.0, "suggested_quality": 0.55})
    assert select_rows(one, 55, 1).empty and relabel_ceiling(one, 1).iloc[0] == 55
    assert len(select_rows(one, np.nextafter(55, 0), 1)) == 1


def test_results_without_the_probability_column_are_refused_by_name():
    with pytest.raises(RelabelError, match=r"lack column\(s\) suggested_quality"):
        select_rows(results_frame().drop(columns=["suggested_quality"]), SENSITIVITY, MIN_PREDS)


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
results = pd.read_json(sys.stdin)
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

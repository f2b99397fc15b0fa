"""Applying a reviewer's decisions: `python -m tasks relabel --decisions` moves exactly the
accepted and re-classed images (every other file unchanged), keep rows never move even when
they clear the threshold, undo restores every byte; each bad decisions file is a one-line
`error:` (exit 2) with nothing moved, on a local folder and on the SeaweedFS server; the
Label Studio CLI; and the apply_review DAG with a real `dag.test()` on a tiny audited run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from tasks import airflow_adapter as acl
from tasks import cli, runs, storage
from tasks.config import AuditConfig
from tasks.decisions import COLUMNS
from tasks.relabel import Journal, relabel_results, undo
from tests.datasets import snapshot, tiny_config, write_classes
from tests.test_cli import ok, tasks_cli
from tests.test_relabel import (
    MIN_PREDS,
    SENSITIVITY,
    failing_after,
    make_dataset,
    results_frame,
    tag,
)
from tests.test_s3 import snapshot as s3_snapshot
from tests.test_s3 import upload_folder

RUN_ID = "r1"
CLASSES = ["bird", "cat", "dog", "owl"]

# (filename, label, decision, new_label): see tests/test_relabel.py ROWS for the results.
DECISIONS = [
    ("cat/img-000.png", "cat", "accept", "dog"),  # clears the threshold too
    ("cat/img-001.png", "cat", "other", "owl"),  # below the threshold: moves anyway
    ("cat/img-002.png", "cat", "keep", ""),  # clears the threshold: never moves
    ("cat/img-003.png", "cat", "keep", ""),  # clears the threshold: never moves
    ("dog/img-002.png", "dog", "other", "cat"),  # not flagged by the audit: moves anyway
    ("owl/img-001.png", "owl", "skip", ""),
    ("cat/new one.png", "cat", "accept", "bird"),  # a class folder to create
]
# dog/img-003.png clears the threshold but has no row: it stays too.
MOVED = {
    "cat/img-000.png": f"dog/img-000.relabel-{tag('cat/img-000.png')}.png",
    "cat/img-001.png": f"owl/img-001.relabel-{tag('cat/img-001.png')}.png",
    "dog/img-002.png": f"cat/img-002.relabel-{tag('dog/img-002.png')}.png",
    "cat/new one.png": "bird/new one.png",
}


def decisions_csv(rows=DECISIONS, extra: dict | None = None) -> str:
    frame = pd.DataFrame(rows, columns=["filename", "label", "decision", "new_label"])
    frame["reviewer"] = "ana@example.org"
    frame["decided_at"] = "2026-12-01T10:00:00Z"
    for name, value in (extra or {}).items():
        frame[name] = value
    return frame.to_csv(index=False)


def make_run(work: str, data: str, **cfg) -> str:
    """A run folder as an audit leaves it (config, classes, results); returns results.csv."""
    run = runs.run_uri(work, RUN_ID)
    runs.write_config(run, AuditConfig(data_path=data, work_uri=work, sensitivity=SENSITIVITY,
                                       min_preds=MIN_PREDS, **cfg))
    storage.write_text(storage.join(run, "classes.json"), json.dumps(CLASSES))
    storage.write_text(runs.results_uri(run), results_frame().to_csv(index=False))
    return runs.results_uri(run)


@pytest.fixture
def local(tmp_path: Path) -> tuple[Path, str, Path]:
    """(dataset folder, results CSV, decisions file)."""
    data = make_dataset(tmp_path)
    results = make_run(str(tmp_path / "work"), str(data))
    decisions = tmp_path / "decisions.csv"
    decisions.write_text(decisions_csv())
    return data, results, decisions


def after(before: dict, moved: dict[str, str] = MOVED) -> dict:
    out = {k: v for k, v in before.items() if k not in moved}
    out.update({dst: before[src] for src, dst in moved.items()})
    return out


def test_decisions_move_exactly_the_decided_images_and_undo_restores_them(local):
    data, results, decisions = local
    before = snapshot(data)
    dry = ok(tasks_cli("relabel", "--results", results, "--decisions", str(decisions),
                       "--dry-run"))
    assert snapshot(data) == before
    journal = runs.journal_uri(storage.parent(results))
    assert not Path(journal).exists()
    for src, dst in MOVED.items():
        assert f"would move {src} -> {dst} (decided)" in dry.stderr
    assert (f"4 images would move as decided in {decisions} (2 accept, 2 keep, 2 other, "
            "1 skip)") in dry.stderr

    done = ok(tasks_cli("relabel", "--results", results, "--decisions", str(decisions)))
    assert done.stdout.strip().splitlines()[-1] == journal
    assert snapshot(data) == after(before)  # every other file byte-for-byte the same
    header, moves = Journal(journal).read()
    assert header["plan"] == "decisions" and header["decisions"] == str(decisions)
    assert header["decisions_sha256"] == hashlib.sha256(decisions.read_bytes()).hexdigest()
    assert "sensitivity" not in header
    assert {m.src: m.dst for m in moves} == MOVED
    assert {m.src: m.corrected_label for m in moves}["cat/img-001.png"] == "owl"

    # The same file again: already complete, nothing planned again.
    ok(tasks_cli("relabel", "--results", results, "--decisions", str(decisions)))
    assert snapshot(data) == after(before)
    ok(tasks_cli("undo", "--journal", journal))
    assert snapshot(data) == before


def test_manifest_mode_writes_the_decided_labels_and_moves_nothing(tmp_path):
    data = make_dataset(tmp_path)
    before = snapshot(data)
    results = make_run(str(tmp_path / "work"), str(data), relabel_mode="manifest")
    decisions = tmp_path / "decisions.csv"
    decisions.write_text(decisions_csv())
    assert relabel_results(results, dry_run=True, decisions_uri=str(decisions)) is None
    out = relabel_results(results, decisions_uri=str(decisions))
    assert snapshot(data) == before
    table = pd.read_csv(out, keep_default_na=False)
    assert len(table) == len(results_frame())
    changed = table[table["changed"]]
    assert dict(zip(changed["filename"], changed["new_label"], strict=True)) == {
        "cat/img-000.png": "dog", "cat/img-001.png": "owl", "dog/img-002.png": "cat",
        "cat/new one.png": "bird"}


def test_decisions_over_a_threshold_relabel_are_refused_until_undone(local):
    data, results, decisions = local
    before = snapshot(data)
    journal = relabel_results(results)  # the thresholds' relabel, complete
    moved = snapshot(data)
    assert moved != before
    code, err = run_cli(["relabel", "--results", results, "--decisions", str(decisions)])
    assert code == 2 and err == (
        f"error: {journal} holds a complete relabel planned from the thresholds; undo it "
        f"first (python -m tasks undo --journal {journal}), then apply {decisions}")
    assert snapshot(data) == moved
    undo(journal)
    assert relabel_results(results, decisions_uri=str(decisions)) == journal
    assert snapshot(data) == after(before)


def test_an_interrupted_apply_is_finished_by_the_same_file_only(local, monkeypatch, tmp_path):
    data, results, decisions = local
    before = snapshot(data)
    journal = runs.journal_uri(storage.parent(results))
    with monkeypatch.context() as m:
        failing_after(m, "delete", 2)
        with pytest.raises(KeyboardInterrupt):
            relabel_results(results, decisions_uri=str(decisions))
    middle = snapshot(data)
    assert middle not in (before, after(before))
    # Another decisions file cannot be applied over the half-done one...
    other = tmp_path / "other.csv"
    other.write_text(decisions_csv(DECISIONS[:1]))
    code, err = run_cli(["relabel", "--results", results, "--decisions", str(other)])
    assert code == 2 and err == (
        f"error: {journal} holds a started relabel planned from {decisions}; undo it first "
        f"(python -m tasks undo --journal {journal}), then apply {other}")
    assert snapshot(data) == middle
    # ...the same file finishes it.
    assert relabel_results(results, decisions_uri=str(decisions)) == journal
    assert snapshot(data) == after(before)
    assert Journal(journal).read()[0]["state"] == "complete"


def run_cli(argv: list[str]) -> tuple[int, str]:
    """The CLI in this process: (exit code, its last stderr line); stderr has one line
    starting with `error:`."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(argv)
    errors = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
    assert len(errors) <= 1, errors
    return code, errors[0] if errors else ""


def rows_with(i: int, **change) -> list[tuple]:
    rows = [list(r) for r in DECISIONS]
    for key, value in change.items():
        rows[i][["filename", "label", "decision", "new_label"].index(key)] = value
    return [tuple(r) for r in rows]


# (the file's text, what the error line says after "error: <file> ")
BAD = {
    "unknown file": (decisions_csv(rows_with(1, filename="cat/nope.png")),
                     "line 3 (cat/nope.png): not in this run's results"),
    "unknown class": (decisions_csv(rows_with(1, new_label="horse")),
                      "line 3 (cat/img-001.png): new_label 'horse' is not a class of this run "
                      "(bird, cat, dog, owl)"),
    "duplicate row": (decisions_csv([*DECISIONS, DECISIONS[0]]),
                      "line 9 (cat/img-000.png): a second row for this file (the first is "
                      "line 2): keep one"),
    "another run": (decisions_csv(extra={"run_id": "pets-a1b2c3"}),
                    "line 2 (cat/img-000.png): run_id 'pets-a1b2c3' is not this run ('r1')"),
    "label changed": (decisions_csv(rows_with(4, label="owl")),
                      "line 6 (dog/img-002.png): label 'owl' but the run's results say 'dog'"),
    "accept elsewhere": (decisions_csv(rows_with(0, new_label="owl")),
                         "line 2 (cat/img-000.png): accept with new_label 'owl', but the run "
                         "suggests 'dog'"),
    "bad decision": (decisions_csv(rows_with(5, decision="maybe")),
                     "line 7 (owl/img-001.png): decision 'maybe' is not one of"),
    "missing column": ("filename,label,decision\ncat/img-000.png,cat,keep\n",
                       ": missing column(s) new_label, reviewer, decided_at"),
    "not UTF-8": ("filename".encode("utf-16").decode("latin-1"), "is not UTF-8 text"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_a_bad_decisions_file_is_one_error_line_and_nothing_moves(local, case):
    data, results, decisions = local
    text, expected = BAD[case]
    decisions.write_bytes(text.encode("latin-1" if case == "not UTF-8" else "utf-8"))
    before = snapshot(data)
    code, err = run_cli(["relabel", "--results", results, "--decisions", str(decisions)])
    assert code == 2
    assert err.startswith(f"error: {decisions}") and expected in err, err
    assert snapshot(data) == before
    assert not Path(runs.journal_uri(storage.parent(results))).exists()


def test_decisions_keep_the_safety_checks_and_refuse_thresholds(local, tmp_path):
    data, results, decisions = local
    # A decided image gone from the dataset: refused before anything moves.
    (data / "dog" / "img-002.png").unlink()
    before = snapshot(data)
    code, err = run_cli(["relabel", "--results", results, "--decisions", str(decisions)])
    assert code == 2 and err == (f"error: {data / 'dog' / 'img-002.png'} is missing; was the "
                                 "dataset changed since the audit?")
    assert snapshot(data) == before
    code, err = run_cli(["relabel", "--results", results, "--decisions", str(decisions),
                         "--sensitivity", "50"])
    assert code == 2 and err == (f"error: the thresholds (sensitivity) do not apply to a "
                                 f"decisions file ({decisions}): it names each image to move; "
                                 "drop them")
    missing = tmp_path / "nope.csv"
    code, err = run_cli(["relabel", "--results", results, "--decisions", str(missing)])
    assert code == 2 and err == f"error: decisions file {missing} does not exist"
    assert snapshot(data) == before


def test_decisions_in_the_bucket(s3, tmp_path):
    folder = make_dataset(tmp_path)
    upload_folder(s3, folder, f"{s3.prefix}/data")
    data, work = f"{s3.root}/data", f"{s3.root}/work"
    results = make_run(work, data)
    before = s3_snapshot(s3, f"{s3.prefix}/data/")
    bad = f"{s3.root}/review/bad.csv"
    storage.write_text(bad, decisions_csv(rows_with(1, new_label="horse")))
    code, err = run_cli(["relabel", "--results", results, "--decisions", bad])
    assert code == 2 and err.startswith(f"error: {bad} line 3 (cat/img-001.png): new_label "
                                        "'horse' is not a class of this run")
    assert s3_snapshot(s3, f"{s3.prefix}/data/") == before
    assert not storage.exists(runs.journal_uri(storage.parent(results)))

    good = f"{s3.root}/review/decisions.csv"
    storage.write_text(good, decisions_csv())
    journal = relabel_results(results, decisions_uri=good)
    assert s3_snapshot(s3, f"{s3.prefix}/data/") == after(before)
    assert Journal(journal).read()[0]["decisions"] == good
    undo(journal)
    assert s3_snapshot(s3, f"{s3.prefix}/data/") == before


def test_labelstudio_cli_exports_tasks_and_imports_decisions(local, tmp_path):
    data, results, _ = local
    out = tmp_path / "ls" / "tasks.json"
    code, err = run_cli(["labelstudio", "export", "--results", results, "--out", str(out),
                         "--image-root", str(data), "--top-n", "3"])
    assert code == 0, err
    tasks = json.loads(out.read_text())
    flagged = results_frame()[results_frame()["is_label_issue"]]
    assert [t["data"]["filename"] for t in tasks] == list(flagged["filename"][:3])
    assert (tmp_path / "ls" / "tasks.labeling-config.xml").is_file()
    # A reviewer accepts the first, keeps the second and re-classes the third.
    chosen = [tasks[0]["data"]["suggestion"], tasks[1]["data"]["label"], "dog"]
    export = [{"id": i + 1, "data": t["data"], "annotations": [{
        "completed_by": 1, "was_cancelled": False, "updated_at": "2026-12-01T10:00:00Z",
        "result": [{"from_name": "label", "to_name": "image", "type": "choices",
                    "value": {"choices": [c]}}]}]}
              for i, (t, c) in enumerate(zip(tasks, chosen, strict=True))]
    export_path = tmp_path / "export.json"
    export_path.write_text(json.dumps(export))
    decisions = tmp_path / "decisions.csv"
    code, err = run_cli(["labelstudio", "import", "--export", str(export_path), "--results",
                         results, "--out", str(decisions)])
    assert code == 0, err
    table = pd.read_csv(decisions, keep_default_na=False)
    assert list(table.columns) == COLUMNS
    assert list(table["decision"]) == ["accept", "keep", "other"]
    assert list(table["new_label"]) == ["dog", "", "dog"]
    before = snapshot(data)
    relabel_results(results, decisions_uri=str(decisions))
    assert snapshot(data) == after(before, {
        "cat/img-000.png": f"dog/img-000.relabel-{tag('cat/img-000.png')}.png",
        "cat/img-002.png": f"dog/img-002.relabel-{tag('cat/img-002.png')}.png"})
    # A bad export: one line, naming the task.
    export[2]["annotations"][0]["result"][0]["value"]["choices"] = ["horse"]
    export_path.write_text(json.dumps(export))
    code, err = run_cli(["labelstudio", "import", "--export", str(export_path), "--results",
                         results, "--out", str(tmp_path / "d2.csv")])
    assert code == 2 and "task 3" in err and "'horse' is not a class" in err


# --- Airflow ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def audited(tmp_path_factory) -> tuple[Path, str]:
    """A tiny dataset really audited (two repeats, one epoch): (dataset, results CSV)."""
    from tasks.audit import run_audit

    tmp = tmp_path_factory.mktemp("audited")
    data = tmp / "data"
    write_classes(data, {"cat": 8, "dog": 8, "owl": 8})
    cfg = tiny_config(data, tmp / "work", image_size=16, min_preds=1)
    return data, run_audit(cfg, run_id="tiny", emit=lambda line: None)


def test_apply_review_dag_moves_exactly_the_decided_images(airflow_db, audited, tmp_path):
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.exceptions import AirflowFailException

    data, results = audited
    dag = DagBag(dag_folder=str(Path(__file__).parent.parent / "dags")).dags["apply_review"]
    frame = pd.read_csv(results, keep_default_na=False)
    # Accept a suggestion that differs from the label, re-class one image, keep one
    # (keep everything else unreviewed).
    accept = frame[frame["corrected_label"] != frame["label"]].iloc[0]
    rest = frame[frame["filename"] != accept["filename"]]
    other, keep = rest.iloc[0], rest.iloc[1]
    new = next(c for c in ("cat", "dog", "owl") if c != other["label"])
    rows = [(accept["filename"], accept["label"], "accept", accept["corrected_label"]),
            (other["filename"], other["label"], "other", new),
            (keep["filename"], keep["label"], "keep", "")]
    decisions = tmp_path / "decisions.csv"
    decisions.write_text(decisions_csv(rows, extra={"run_id": "tiny"}))
    run = storage.parent(results)
    before = snapshot(data)

    bad = tmp_path / "bad.csv"
    bad.write_text(decisions_csv([*rows, rows[0]]))
    dr = dag.test(run_conf={"results": results, "decisions": str(bad)})
    assert dr.state == "failed" and snapshot(data) == before
    with pytest.raises(AirflowFailException, match=r"bad.csv line 5 \(.*\): a second row"):
        acl.apply_review(results, str(bad))  # what the failed task said in its log

    dr = dag.test(run_conf={"results": run, "decisions": str(decisions), "dry_run": True})
    assert dr.state == "success" and snapshot(data) == before
    assert not Path(runs.journal_uri(run)).exists()

    # dry_run named again: dag.test runs every DAG run in this process, and a param a run's
    # conf set stays set for the next one here (a worker runs each task in its own process).
    dr = dag.test(run_conf={"results": run, "decisions": str(decisions), "dry_run": False})
    assert dr.state == "success"
    moved = {accept["filename"]: accept["corrected_label"], other["filename"]: new}
    expected = {k: v for k, v in before.items() if k not in moved}
    for src, cls in moved.items():
        dst = f"{cls}/{src.split('/', 1)[1]}"
        if dst in before:
            dst = f"{cls}/{Path(src).stem}.relabel-{tag(src)}{Path(src).suffix}"
        expected[dst] = before[src]
    assert snapshot(data) == expected
    header, moves = Journal(runs.journal_uri(run)).read()
    assert header["decisions"] == str(decisions) and len(moves) == 2
    undo(runs.journal_uri(run))
    assert snapshot(data) == before

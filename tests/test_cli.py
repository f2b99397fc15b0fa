"""The command line as a user runs it (`python -m tasks ...` in a subprocess): sample data,
one end-to-end audit on a tiny dataset, resuming it, relabel and undo, the one-line errors a
user can fix (an invalid config, a single-class dataset ...) and the traceback of anything
else."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from tasks import cli
from tasks.merge import read_results
from tests.datasets import snapshot, write_classes

TINY = ["--set", "n_repeats=2", "--set", "test_split=0.5", "--set", "num_epochs=1",
        "--set", "num_workers=0", "--set", "device=cpu", "--set", "image_size=16"]


def tasks_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasks", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_sample_writes_n_images_and_a_truth_file_with_the_noise(tmp_path):
    out = tmp_path / "s"
    proc = ok(tasks_cli("sample", "--out", str(out), "--n", "60", "--noise", "0.2",
                        "--seed", "3"))
    truth_path = tmp_path / "s.truth.csv"
    assert proc.stdout.strip().splitlines()[-1] == str(truth_path)
    truth = pd.read_csv(truth_path)
    assert list(truth.columns) == ["filename", "true_label", "given_label"]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert len(files) == 60 and files == sorted(truth["filename"])
    assert (truth["true_label"] != truth["given_label"]).sum() == 12
    assert (truth["filename"].str.split("/").str[0] == truth["given_label"]).all()
    # Same seed, same dataset; a non-empty --out is refused.
    again = tasks_cli("sample", "--out", str(out), "--n", "60", "--noise", "0.2", "--seed", "3")
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1] == (
        f"error: {out} exists and is not empty; choose another --out")


@dataclass
class Audited:
    data: Path
    args: list[str]
    first: subprocess.CompletedProcess
    results: Path


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Audited:
    """One end-to-end audit of 120 sample images (2 repeats of one epoch)."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    ok(tasks_cli("sample", "--out", str(data), "--n", "120", "--noise", "0.1", "--seed", "1"))
    args = ["audit", "--set", f"data_path={data}", "--set", f"work_uri={root / 'work'}", *TINY]
    first = ok(tasks_cli(*args))
    results = Path(first.stdout.strip().splitlines()[-1])
    return Audited(data=data, args=args, first=first, results=results)


@pytest.mark.slow
def test_audit_prints_the_results_path_last_and_predicts_every_image(audited):
    assert audited.results.name == "results.csv" and audited.results.is_file()
    res = read_results(str(audited.results))
    truth = pd.read_csv(audited.data.with_name("data.truth.csv"))
    assert sorted(res["filename"]) == sorted(truth["filename"])
    assert list(res.columns[:7]) == ["filename", "label", "corrected_label", "num_preds", "%",
                                     "label_quality", "is_label_issue"]
    assert (res["num_preds"] >= 1).all()
    assert res["label_quality"].between(0, 1).all() and res["%"].between(0, 100).all()
    run = audited.results.parent
    for name in ("config.json", "manifest.parquet", "classes.json", "skipped.csv",
                 "predictions.parquet", "report.html", "shards/repeat-0000.parquet",
                 "shards/repeat-0001.parquet"):
        assert (run / name).is_file(), name
    log = audited.first.stdout + audited.first.stderr
    assert "epoch 1/1" in log and "merged 2 shards (0 missing): 120 images" in log


@pytest.mark.slow
def test_running_the_same_audit_again_resumes_without_training(audited):
    shards = sorted((audited.results.parent / "shards").glob("*.parquet"))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in shards}
    again = ok(tasks_cli(*audited.args))
    assert again.stdout.strip().splitlines()[-1] == str(audited.results)
    log = again.stdout + again.stderr
    assert "resuming run" in log
    assert log.count("already done") == 2 and "epoch 1/1" not in log
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in shards} == before


@pytest.mark.slow
def test_relabel_dry_run_then_relabel_and_undo_leave_the_folder_identical(audited):
    before = snapshot(audited.data)
    loose = ["--sensitivity", "0", "--min-preds", "1"]  # one prediction per image here
    dry = ok(tasks_cli("relabel", "--results", str(audited.results), "--dry-run", *loose))
    assert snapshot(audited.data) == before
    assert "would move" in dry.stderr and dry.stdout.strip() == ""
    journal = audited.results.with_name("relabel-journal.jsonl")
    assert not journal.exists()

    done = ok(tasks_cli("relabel", "--results", str(audited.results), *loose))
    assert done.stdout.strip().splitlines()[-1] == str(journal)
    moved = snapshot(audited.data)
    assert moved != before
    assert sorted(moved.values()) == sorted(before.values())  # same bytes, other folders

    ok(tasks_cli("undo", "--journal", str(journal)))
    assert snapshot(audited.data) == before


def test_invalid_config_exits_2_with_one_line_naming_the_key(tmp_path):
    proc = tasks_cli("audit", "--set", "test_split=0.6", "--set", "val_split=0.5")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: invalid config: test_split + val_split must be < 1, got 0.6 + 0.5"]
    assert proc.stdout == ""


def test_single_class_dataset_fails_with_one_clear_line(tmp_path):
    write_classes(tmp_path / "data", {"cat": 8})
    proc = tasks_cli("audit", "--set", f"data_path={tmp_path / 'data'}",
                     "--set", f"work_uri={tmp_path / 'work'}", *TINY)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"error: {tmp_path / 'data'}: need at least 2 class folders with usable "
                      "images, found 1 ('cat'); expected <root>/<class>/<image>"]
    assert not list((tmp_path / "work").rglob("*.parquet"))


@pytest.mark.parametrize(("argv", "message"), [
    (["audit", "--set", "n_repeat=3"], "error: invalid config: unknown config key 'n_repeat'"),
    (["audit", "--set", "model_name=vgg16"], "error: invalid config: model_name: got 'vgg16'"),
    (["audit", "--config", "/nonexistent/audit.yaml"],
     "error: config file '/nonexistent/audit.yaml' does not exist"),
    (["audit", "--set", "data_path=/nonexistent/data"],
     "error: data_path '/nonexistent/data' is not a folder"),
    (["relabel", "--results", "/nonexistent/results.csv"],
     "error: results CSV /nonexistent/results.csv does not exist"),
    (["undo", "--journal", "/nonexistent/relabel-journal.jsonl"],
     "error: journal /nonexistent/relabel-journal.jsonl does not exist"),
])
def test_user_errors_exit_2_with_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err


def test_undo_of_a_file_that_is_not_a_journal_is_one_line(tmp_path, capsys):
    bad = tmp_path / "results.csv"
    bad.write_text("filename,label\n")
    assert cli.main(["undo", "--journal", str(bad)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {bad} is not a relabel journal (JSONDecodeError); pass the "
        "relabel-journal.jsonl of a run"]


def test_an_unexpected_error_shows_its_traceback_and_exits_1(tmp_path):
    """Only errors a user can fix are one `error:` line. A run folder whose config.json is
    not JSON (a damaged run, not a wrong argument) raises a plain ValueError from inside the
    json module: that is a traceback, not a user mistake."""
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{not json")
    (run / "results.csv").write_text("filename,label\n")
    proc = tasks_cli("relabel", "--results", str(run / "results.csv"))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert "Traceback (most recent call last):" in lines
    assert lines[-1].startswith("json.decoder.JSONDecodeError: Expecting property name")
    assert not [line for line in lines if line.startswith("error:")]

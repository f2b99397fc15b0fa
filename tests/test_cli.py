"""The command line as a user runs it (`python -m tasks ...` in a subprocess): sample data,
one end-to-end audit on a tiny dataset, resuming it, relabel and undo, the one-line errors a
user can fix (an invalid config, a single-class dataset ...) and the traceback of anything
else."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
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
    # One prediction per image here, and models the guard would not trust (one epoch).
    loose = ["--sensitivity", "0", "--min-preds", "1", "--force"]
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
    (["audit", "--set", "n_repeats=["],
     "error: override 'n_repeats=[': the value of 'n_repeats' is not valid YAML"),
    (["audit", "--set", "seed={a"], "error: override 'seed={a': the value of 'seed' is not "
                                    "valid YAML"),
    (["audit", "--set", "=5"], "error: override '=5' has an empty key"),
    (["audit", "--config", "/"], "error: config file '/' is a folder; pass a YAML file"),
    (["sample", "--out", "/tmp/acl-unused-sample", "--seed", "-1"],
     "error: --seed must be 0 or more, got -1"),
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


def test_a_non_utf8_config_names_the_file(tmp_path, capsys):
    latin = tmp_path / "audit.yaml"
    latin.write_bytes("data_path: /données\n".encode("latin-1"))
    assert cli.main(["audit", "--config", str(latin)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: config file '{latin}' is not UTF-8 text (byte 16); save it as UTF-8"]


def test_sample_refuses_an_existing_file_or_truth_file_and_writes_nothing(tmp_path, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("keep me")
    assert cli.main(["sample", "--out", str(a_file), "--n", "20"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {a_file} exists and is not a folder; choose another --out"]
    assert a_file.read_text() == "keep me"

    truth = tmp_path / "s.truth.csv"
    truth.write_text("filename,true_label,given_label\nmine.png,a,b\n")
    assert cli.main(["sample", "--out", str(tmp_path / "s"), "--n", "20"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {truth} exists and would be overwritten; delete it or choose another --out"]
    assert truth.read_text().endswith("mine.png,a,b\n") and not (tmp_path / "s").exists()


def tiny_data(tmp_path: Path) -> list[str]:
    """Audit arguments for 24 images in two classes, at the TINY settings."""
    write_classes(tmp_path / "data", {"ant": 12, "bee": 12})
    return ["audit", "--set", f"data_path={tmp_path / 'data'}",
            "--set", f"work_uri={tmp_path / 'work'}", *TINY]


def not_writable_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "folder").mkdir()
    cases = [
        (["--set", f"results_path={tmp_path / 'folder'}"],
         f"error: results_path '{tmp_path / 'folder'}' is a folder; give the path of the CSV "
         "file to write, e.g. <folder>/results.csv"),
        (["--set", f"results_path={tmp_path / 'a-file' / 'results.csv'}"],
         f"error: results_path '{tmp_path / 'a-file' / 'results.csv'}': cannot write in "
         f"{tmp_path / 'a-file'} ({tmp_path / 'a-file'} is a file, not a folder); "
         "choose a folder this user can write"),
        (["--set", f"work_uri={tmp_path / 'a-file' / 'work'}"],
         f"error: work_uri '{tmp_path / 'a-file' / 'work'}': cannot write in "
         f"{tmp_path / 'a-file' / 'work'} ({tmp_path / 'a-file'} is a file, not a folder); "
         "choose a folder this user can write"),
    ]
    if os.geteuid() != 0:  # root writes into read-only folders
        ro = tmp_path / "read-only"
        ro.mkdir(mode=0o555)
        cases.append((["--set", f"results_path={ro / 'results.csv'}"],
                      f"error: results_path '{ro / 'results.csv'}': cannot write in {ro} "
                      "(Permission denied); choose a folder this user can write"))
    return cases


def test_unwritable_work_uri_or_results_path_fails_before_indexing(tmp_path, capsys):
    base = tiny_data(tmp_path)
    for extra, message in not_writable_cases(tmp_path):
        assert cli.main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == message and not [line for line in err[:-1] if "error" in line]
        assert not (tmp_path / "work" / "runs").exists()  # nothing indexed, nothing trained


@pytest.mark.parametrize(("extra", "message"), [
    (["--set", "device=cuda"], "error: device is 'cuda' but no CUDA GPU is visible to this "
                               "process; set device: cpu or auto"),
    (["--set", "model_weights=/nonexistent/w.pt"],
     "error: model_weights '/nonexistent/w.pt': no such file"),
    (["--set", "model_weights={tmp}/resnet.pt"],
     "error: model_weights '{tmp}/resnet.pt': no tensor matches small_cnn"),
])
def test_trainer_config_errors_fail_before_indexing(tmp_path, capsys, extra, message):
    import torch
    import torchvision

    if "device=cuda" in extra and torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), tmp_path / "resnet.pt")
    extra = [a.format(tmp=tmp_path) for a in extra]
    message = message.format(tmp=tmp_path)
    assert cli.main([*tiny_data(tmp_path), *extra]) == 2  # the later --set wins
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(message) and "resumes" not in err[-1]
    assert not (tmp_path / "work").exists()


def test_a_trainer_failure_carries_its_cause_and_says_resume_only_when_it_helps(tmp_path):
    from tasks.audit import TrainerError, prepare_run, run_trainer_subprocess
    from tests.datasets import tiny_config

    write_classes(tmp_path / "data", {"ant": 4, "bee": 4})
    run = prepare_run(tiny_config(tmp_path / "data", tmp_path / "work"), "r")
    lines: list[str] = []
    with pytest.raises(TrainerError) as user:
        run_trainer_subprocess(run, 7, emit=lines.append)
    assert str(user.value) == (
        "trainer for repeat 7 exited with code 2: repeat 7 failed: RepeatError: repeat 7 is "
        "out of range: the run has 0..1; fix that, then run the audit again")
    (tmp_path / "work" / "runs" / "r" / "manifest.parquet").write_bytes(b"damaged")
    with pytest.raises(TrainerError) as bug:
        run_trainer_subprocess(run, 0, emit=lines.append)
    assert str(bug.value).startswith("trainer for repeat 0 exited with code 1: repeat 0 "
                                     "failed: ")
    assert str(bug.value).endswith("; re-running the audit resumes at this repeat")


def slow_audit(tmp_path: Path, *extra: str) -> subprocess.Popen:
    """An audit of 48 images whose repeats take seconds each, in its own process group."""
    args = [*tiny_data(tmp_path), "--set", "num_epochs=30", "--set", "n_repeats=3",
            "--set", "test_split=0.34", "--set", "batch_size=8", *extra]
    return subprocess.Popen([sys.executable, "-m", "tasks", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(proc: subprocess.Popen, text: str, timeout: float = 120) -> list[str]:
    """Read the audit's stderr until a line holds `text`; returns the lines read."""
    assert proc.stderr is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    for line in proc.stderr:
        seen.append(line)
        if text in line:
            return seen
        assert time.monotonic() < deadline, "".join(seen)
    raise AssertionError(f"audit ended before {text!r}: " + "".join(seen))


def trainer_pids(audit_pid: int) -> list[int]:
    children = Path(f"/proc/{audit_pid}/task/{audit_pid}/children").read_text().split()
    return [int(pid) for pid in children]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
def test_ctrl_c_during_an_audit_is_one_line_saying_what_was_kept(tmp_path):
    proc = slow_audit(tmp_path)
    wait_for(proc, "training repeat 1 ")
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: audit and trainer
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    run = next((tmp_path / "work" / "runs").iterdir())
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err
    assert err.strip().splitlines()[-1] == (
        f"interrupted: audit interrupted during repeat 1 (of 0..2): kept the shards of "
        f"finished repeats 0 in {run / 'shards'}; run the same command again to resume (run "
        f"{run.name}) at repeat 1")
    assert [p.name for p in (run / "shards").glob("*.parquet")] == ["repeat-0000.parquet"]


@pytest.mark.slow
def test_killing_the_audit_kills_its_trainer(tmp_path):
    proc = slow_audit(tmp_path)
    wait_for(proc, "training repeat 0 ")
    time.sleep(1.0)
    trainers = trainer_pids(proc.pid)
    assert len(trainers) == 1 and alive(trainers[0])
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 5
    while alive(trainers[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(trainers[0]), "the trainer outlived its audit"


@pytest.mark.slow
def test_a_second_identical_audit_refuses_while_the_first_trains(tmp_path):
    first = slow_audit(tmp_path)
    try:
        wait_for(first, "training repeat 0 ")
        second = subprocess.run([sys.executable, "-m", "tasks", *first.args[3:]],
                                capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first audit ended too soon for this test"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate(timeout=30)
    run = next((tmp_path / "work" / "runs").iterdir())
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip().splitlines()[-1] == (
        f"error: run {run} is being audited by another process (pid {first.pid} on "
        f"{os.uname().nodename}; lock {run / 'audit.lock'}); wait for it to finish, then run "
        "again")
    assert "epoch" not in second.stdout


@pytest.mark.slow
def test_one_repeat_reports_coverage_of_all_images_and_of_the_planned_ones(tmp_path):
    proc = ok(tasks_cli(*tiny_data(tmp_path), "--set", "n_repeats=1"))
    merged = [line for line in proc.stderr.splitlines() if "merged 1 shards" in line]
    assert len(merged) == 1, proc.stderr
    assert ("merged 1 shards (0 missing): 24 images, 12 with a prediction (50.0% of all "
            "images, 100.0% of the 12 the plan holds out)") in merged[0]


def test_the_run_lease_on_s3_lets_one_audit_in_and_expires(s3):
    """The s3 side of the run lock, on the real SeaweedFS server: a lease object created with
    a conditional PUT; a second holder refuses; a lease nobody renewed is taken over."""
    import json

    from tasks import storage
    from tasks.audit import RunBusyError, run_lock

    run = f"{s3.root}/work/runs/r"
    lease = f"{run}/audit.lease"
    with run_lock(run):
        held = json.loads(storage.read_text(lease))
        assert held["owner"].startswith(f"pid {os.getpid()} on ")
        busy = (rf"run {run} is being audited by another process \(pid {os.getpid()} on .*; "
                rf"lease {lease}, renewed every 40s\); wait for it")
        with pytest.raises(RunBusyError, match=busy), run_lock(run):
            pass
        assert storage.create(lease, b"{}") is False  # the conditional PUT refuses too
    assert not storage.exists(lease)
    storage.write_text(lease, json.dumps({"owner": "a dead audit", "expires": time.time() - 1}))
    with run_lock(run):
        assert json.loads(storage.read_text(lease))["owner"] != "a dead audit"
    assert not storage.exists(lease)

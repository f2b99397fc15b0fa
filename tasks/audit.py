"""Run a whole audit on this machine: index, plan, train every repeat as a subprocess of
the trainer entrypoint, merge, report. Re-running with the same run id resumes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from tasks import runs, storage
from tasks.config import AuditConfig, ffcv_installed
from tasks.errors import USER_ERROR_EXIT, UserError
from tasks.index import (
    check_resumable,
    index_dataset,
    list_dataset,
    listing_fingerprint,
    write_index,
)
from tasks.plan import RepeatSpec, plan_repeats
from tasks.weights import resolve_weights

log = logging.getLogger(__name__)


def default_run_id(cfg: AuditConfig, listing_hash: str) -> str:
    """Same dataset content and training config give the same run id, so a re-run resumes;
    a changed dataset (e.g. after relabelling) starts a new run."""
    name = storage.basename(cfg.data_path) or "dataset"
    return f"{name}-{cfg.training_fingerprint()[:6]}{listing_hash[:6]}"


def prepare_run(cfg: AuditConfig, run_id: str | None = None,
                defer_weights: bool = False) -> str:
    """The index stage: stage the initial weights in the run folder (`resolve_weights`: once
    per run, first, so a missing download fails before a long index; `defer_weights`, the
    Kubernetes runner: torchvision weights are left to the stage_weights pod where torchvision
    is missing), index the dataset into the run folder (skipped when the run already has a
    manifest), record the config and, with `ffcv`, build the run's .beton; returns the run
    URI. One stage, one name per layer: the DAG task is `index` (its body,
    `airflow_adapter.prepare`, validates the conf and then calls this); in `tasks` it is
    `prepare_run`, which the CLI audit calls directly."""
    check_writable(cfg)
    listing = list_dataset(cfg.data_path)
    run = runs.run_uri(cfg.work_uri, run_id or default_run_id(cfg, listing_fingerprint(listing)))
    resolve_weights(cfg, run, defer_torchvision=defer_weights)
    if storage.exists(storage.join(run, "manifest.parquet")):
        check_resumable(run, cfg.data_path, listing)
        log.info("resuming run %s (manifest exists, dataset unchanged)", run)
    else:
        log.info("indexing %s into run %s", cfg.data_path, run)
        write_index(index_dataset(cfg, listing), run)
    runs.write_config(run, cfg)
    if cfg.ffcv:
        build_beton_if_possible(run, cfg)
    return run


def build_beton_if_possible(run: str, cfg: AuditConfig) -> None:
    """Build the run's .beton once, before the trainers start. Where FFCV and torch are not
    installed (the Airflow image of the Kubernetes runner) the DAG's build_beton pod builds it."""
    import importlib.util

    if not (ffcv_installed() and importlib.util.find_spec("torch")):
        log.info("ffcv: torch or FFCV is not installed here; the build_beton pod (Kubernetes "
                 "runner) or the first trainer builds the .beton")
        return
    from tasks.ffcv_data import ensure_beton

    ensure_beton(run, cfg)


class NotWritableError(UserError, OSError):
    """`work_uri` or `results_path` cannot be written; found before anything is trained."""


def check_writable(cfg: AuditConfig) -> None:
    """Write and delete a probe file in `work_uri` and beside `results_path`, so that a place
    the audit cannot write fails now, not after all training."""
    places = [("work_uri", cfg.work_uri, cfg.work_uri)]
    if cfg.results_path:
        if not storage.is_s3(cfg.results_path) and os.path.isdir(cfg.results_path):
            raise NotWritableError(f"results_path {cfg.results_path!r} is a folder; give the "
                                   "path of the CSV file to write, e.g. <folder>/results.csv")
        places.append(("results_path", cfg.results_path, storage.parent(cfg.results_path)))
    for key, value, folder in places:
        probe = storage.join(folder, f".acl-write-probe-{uuid.uuid4().hex[:12]}")
        try:
            storage.write_bytes(probe, b"")
            storage.delete(probe)
        except (OSError, storage.StorageError) as err:
            why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            if not storage.is_s3(folder):  # say which part of the path is in the way
                blocker = next((p for p in [Path(folder), *Path(folder).parents]
                                if p.exists()), None)
                if blocker is not None and not blocker.is_dir():
                    why = f"{blocker} is a file, not a folder"
            raise NotWritableError(f"{key} {value!r}: cannot write in {folder} ({why}); choose "
                                   "a folder this user can write") from None


class RunBusyError(UserError, RuntimeError):
    """Another audit holds the run folder's lock or lease."""


LEASE_SECONDS = 120.0  # an S3 lease not renewed for this long belongs to a dead audit


@contextlib.contextmanager
def run_lock(run: str) -> Iterator[None]:
    """Hold the run folder for one audit: an fcntl lock on `<run>/audit.lock` (released by the
    kernel even after SIGKILL), or on S3 a lease object `<run>/audit.lease` created with a
    conditional PUT and renewed until the audit ends. A second audit of the same run
    refuses with RunBusyError."""
    if not storage.is_s3(run):
        import fcntl

        os.makedirs(run, exist_ok=True)
        path = os.path.join(run, "audit.lock")
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                raise RunBusyError(f"run {run} is being audited by another process "
                                   f"({f.read().strip() or 'unknown'}; lock {path}); wait for "
                                   "it to finish, then run again") from None
            f.truncate(0)
            f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            f.flush()
            yield
        return
    uri = storage.join(run, "audit.lease")
    owner = f"pid {os.getpid()} on {socket.gethostname()} ({uuid.uuid4().hex[:8]})"

    def lease() -> bytes:
        return json.dumps({"owner": owner, "expires": time.time() + LEASE_SECONDS}).encode()

    if not storage.create(uri, lease()):
        try:
            held = json.loads(storage.read_text(uri))
        except (ValueError, storage.StorageError):
            held = {}
        if float(held.get("expires", 0)) > time.time():
            raise RunBusyError(f"run {run} is being audited by another process "
                               f"({held.get('owner', 'unknown')}; lease {uri}, renewed every "
                               f"{LEASE_SECONDS / 3:.0f}s); wait for it to finish, then run again")
        log.info("taking over the expired lease %s of %s", uri, held.get("owner", "unknown"))
        storage.delete(uri)
        if not storage.create(uri, lease()):
            raise RunBusyError(f"run {run} was just taken by another audit (lease {uri})")
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(LEASE_SECONDS / 3):
            storage.write_bytes(uri, lease())

    renewer = threading.Thread(target=renew, name="lease-renewer", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        with contextlib.suppress(ValueError, storage.StorageError):
            if json.loads(storage.read_text(uri)).get("owner") == owner:  # still ours
                storage.delete(uri)


def embedding_chunks(run: str) -> int:
    """How many embedding chunks the run has (method embeddings)."""
    from tasks.embeddings import n_chunks
    from tasks.index import read_manifest

    manifest, _ = read_manifest(run)
    return n_chunks(len(manifest), runs.read_config(run).embed_chunk_size)


def trainer_command(run: str, repeat: int) -> list[str]:
    """The trainer entrypoint, as a pod or a subprocess runs it."""
    return [sys.executable, "-m", "tasks.train", "--run", run, "--repeat", str(repeat)]


class TrainerError(UserError, RuntimeError):
    """A trainer subprocess failed; the message carries its last ERROR line."""


def _die_with_parent() -> None:
    """In the trainer child, before exec (Linux): SIGKILL it when the audit process dies,
    even by SIGKILL, so no trainer is left running as an orphan."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def run_trainer_subprocess(run: str, repeat: int,
                           emit: Callable[[str], None] = print) -> None:
    """Run one repeat as a subprocess, passing each log line to `emit` as it comes."""
    run_step_subprocess(trainer_command(run, repeat), f"trainer for repeat {repeat}",
                        "this repeat", emit)


def run_step_subprocess(command: list[str], what: str, resumes_at: str,
                        emit: Callable[[str], None] = print) -> None:
    """Run an entrypoint (trainer, embedder, probes) as a subprocess, passing each log line
    to `emit` as it comes; a TrainerError naming `what` and its last ERROR line if it fails."""
    env = {**os.environ, **storage.subprocess_env(), "PYTHONUNBUFFERED": "1"}
    cause = ""
    with subprocess.Popen(command, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env,
                          preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                          ) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                if " ERROR " in line:
                    cause = line.split(" ERROR ", 1)[1]
                emit(line)
            code = proc.wait()
        except BaseException:  # e.g. Airflow stopping the task: stop the trainer with it
            proc.kill()
            proc.wait()
            raise
    if code == 0:
        return
    cause = cause or "no error line in its log"
    if code == USER_ERROR_EXIT:
        raise TrainerError(f"{what} exited with code {code}: {cause}; "
                           "fix that, then run the audit again")
    raise TrainerError(f"{what} exited with code {code}: {cause}; "
                       f"re-running the audit resumes at {resumes_at}")


def embed_command(run: str, chunk: int) -> list[str]:
    """The embedding entrypoint (method embeddings), as a pod or a subprocess runs it."""
    return [sys.executable, "-m", "tasks.embed", "--run", run, "--chunk", str(chunk)]


def probe_command(run: str) -> list[str]:
    """The probe entrypoint (method embeddings), as a pod or a subprocess runs it."""
    return [sys.executable, "-m", "tasks.probe", "--run", run]


def run_embedding_steps(run: str, n_chunks: int, emit: Callable[[str], None] = print) -> None:
    """method embeddings on this machine: each embedding chunk as a subprocess of
    `tasks.embed`, then the probes and neighbours as a subprocess of `tasks.probe`."""
    for chunk in range(n_chunks):
        log.info("embedding chunk %d of %d", chunk + 1, n_chunks)
        try:
            run_step_subprocess(embed_command(run, chunk), f"embedding chunk {chunk}",
                                "this chunk", emit)
        except KeyboardInterrupt:
            raise AuditInterrupted(
                f"audit interrupted during embedding chunk {chunk} (of 0..{n_chunks - 1}): "
                f"kept the finished chunks in {storage.join(run, 'embeddings')}; run the same "
                f"command again to resume (run {storage.basename(run)})") from None
    log.info("fitting the probes and scoring the neighbours")
    run_step_subprocess(probe_command(run), "the probe step", "the probes", emit)


class AuditInterrupted(KeyboardInterrupt):
    """Ctrl-C during an audit; the message says what was kept and how to resume."""


def run_audit(cfg: AuditConfig, run_id: str | None = None,
              emit: Callable[[str], None] = print) -> str:
    """Audit `cfg.data_path` end to end; returns the results CSV URI."""
    from tasks.merge import merge_run
    from tasks.report import write_report

    t0 = time.perf_counter()
    import importlib.util

    if importlib.util.find_spec("torch"):  # what every trainer would fail on, checked once
        from tasks.train import check_training

        check_training(cfg)
    run = prepare_run(cfg, run_id)
    # method embeddings: no training; the probe step writes the shards
    specs: list[RepeatSpec] = plan_repeats(cfg) if cfg.method == "train" else []
    with run_lock(run):
        if cfg.method == "embeddings":
            run_embedding_steps(run, embedding_chunks(run), emit)
        done: list[int] = []
        for spec in specs:
            log.info("training %s of %d", spec.label, len(specs))
            try:
                run_trainer_subprocess(run, spec.repeat, emit)
            except KeyboardInterrupt:
                kept = (f"kept the shards of finished repeats {', '.join(map(str, done))} in "
                        f"{storage.join(run, 'shards')}" if done else "no repeat had finished")
                raise AuditInterrupted(
                    f"audit interrupted during repeat {spec.repeat} (of 0..{len(specs) - 1}): "
                    f"{kept}; "
                    f"run the same command again to resume (run {storage.basename(run)}) at "
                    f"repeat {spec.repeat}") from None
            done.append(spec.repeat)
        results = merge_run(run)
        report = write_report(run, seconds=time.perf_counter() - t0)
    log.info("audit finished in %.0fs; report %s", time.perf_counter() - t0, report)
    return results

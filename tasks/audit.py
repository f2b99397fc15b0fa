"""Run a whole audit on this machine: index, plan, train every repeat as a subprocess of
the trainer entrypoint, merge, report. Re-running with the same run id resumes."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable

from tasks import runs, storage
from tasks.config import AuditConfig, ffcv_installed
from tasks.errors import UserError
from tasks.index import (
    check_resumable,
    index_dataset,
    list_dataset,
    listing_fingerprint,
    write_index,
)
from tasks.plan import RepeatSpec, plan_repeats

log = logging.getLogger(__name__)


def default_run_id(cfg: AuditConfig, listing_hash: str) -> str:
    """Same dataset content and training config give the same run id, so a re-run resumes;
    a changed dataset (e.g. after relabelling) starts a new run."""
    name = storage.basename(cfg.data_path) or "dataset"
    return f"{name}-{cfg.training_fingerprint()[:6]}{listing_hash[:6]}"


def prepare_run(cfg: AuditConfig, run_id: str | None = None) -> str:
    """The index stage: index the dataset into the run folder (skipped when the run already
    has a manifest), record the config and, with `ffcv`, build the run's .beton; returns the
    run URI. One stage, one name per layer: the DAG task is `index` (its body,
    `airflow_adapter.prepare`, validates the conf and then calls this); in `tasks` it is
    `prepare_run`, which the CLI audit calls directly."""
    listing = list_dataset(cfg.data_path)
    run = runs.run_uri(cfg.work_uri, run_id or default_run_id(cfg, listing_fingerprint(listing)))
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


def trainer_command(run: str, repeat: int) -> list[str]:
    """The trainer entrypoint, as a pod or a subprocess runs it."""
    return [sys.executable, "-m", "tasks.train", "--run", run, "--repeat", str(repeat)]


class TrainerError(UserError, RuntimeError):
    """A trainer subprocess failed; its log (passed to `emit`) says why."""


def run_trainer_subprocess(run: str, repeat: int,
                           emit: Callable[[str], None] = print) -> None:
    """Run one repeat as a subprocess, passing each log line to `emit` as it comes."""
    env = {**os.environ, **storage.subprocess_env(), "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(trainer_command(run, repeat), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                emit(line.rstrip("\n"))
            code = proc.wait()
        except BaseException:  # e.g. Airflow stopping the task: stop the trainer with it
            proc.kill()
            raise
    if code != 0:
        raise TrainerError(f"trainer for repeat {repeat} exited with code {code} (its log "
                           f"above says why); re-running the audit resumes at this repeat")


def run_audit(cfg: AuditConfig, run_id: str | None = None,
              emit: Callable[[str], None] = print) -> str:
    """Audit `cfg.data_path` end to end; returns the results CSV URI."""
    from tasks.merge import merge_run
    from tasks.report import write_report

    t0 = time.perf_counter()
    run = prepare_run(cfg, run_id)
    specs: list[RepeatSpec] = plan_repeats(cfg)
    for spec in specs:
        log.info("training %s of %d", spec.label, len(specs))
        run_trainer_subprocess(run, spec.repeat, emit)
    results = merge_run(run)
    report = write_report(run, seconds=time.perf_counter() - t0)
    log.info("audit finished in %.0fs; report %s", time.perf_counter() - t0, report)
    return results

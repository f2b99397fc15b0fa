"""The run folder: where each artefact of one audit lives, and the config it ran with.

`<work_uri>/runs/<run_id>/` holds config.json, manifest.parquet, classes.json,
skipped.csv, shards/repeat-NNNN.parquet, predictions.parquet, results.csv,
report.html and relabel-journal.jsonl; with method embeddings also
embeddings/chunk-NNNNN.parquet and neighbours.parquet.
"""

from __future__ import annotations

import json
import re

from tasks import storage
from tasks.config import AuditConfig, parse_config
from tasks.errors import MissingFileError


def run_uri(work_uri: str, run_id: str) -> str:
    """The folder of one run. Run ids from Airflow (`manual__2026-...+00:00`) are made
    path-safe."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("._") or "run"
    return storage.join(work_uri, "runs", safe)


def shard_uri(run: str, repeat: int) -> str:
    """Where repeat `repeat` writes its out-of-sample predictions."""
    return storage.join(run, "shards", f"repeat-{repeat:04d}.parquet")


def embedding_chunk_uri(run: str, chunk: int) -> str:
    """Where embedding chunk `chunk` (manifest rows of that chunk) is written."""
    return storage.join(run, "embeddings", f"chunk-{chunk:05d}.parquet")


def neighbours_uri(run: str) -> str:
    """The per-image neighbour scores of an embedding-mode run."""
    return storage.join(run, "neighbours.parquet")


def results_uri(run: str) -> str:
    """The results CSV of a run."""
    return storage.join(run, "results.csv")


def journal_uri(run: str) -> str:
    """The relabel journal of a run."""
    return storage.join(run, "relabel-journal.jsonl")


def write_config(run: str, cfg: AuditConfig) -> None:
    """Record the config a run uses; trainers read it back."""
    storage.write_text(storage.join(run, "config.json"), cfg.model_dump_json(indent=2))


def read_config(run: str) -> AuditConfig:
    """The config recorded in a run folder. It was validated when the run was made; steps
    that need an optional package (FFCV) check for it themselves."""
    uri = storage.join(run, "config.json")
    if not storage.exists(uri):
        raise MissingFileError(f"{uri} does not exist: is {run} a run folder?")
    return parse_config(json.loads(storage.read_text(uri)), check_installed=False)

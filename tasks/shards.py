"""The shard contract, without torch: how a shard is built, written, fingerprinted and read.

A shard (`<run>/shards/repeat-<r>.parquet`) holds one repeat's out-of-sample predictions,
one row per held-out image: `id`, `repeat`, `given`, `pred`, `p_given` and either `probs`
(every class, up to `FULL_PROBS_MAX_CLASSES`) or `topk_idx`/`topk_prob` (the top
`TOP_K` beyond that). Its schema metadata records `fingerprint`, `spec` and `stats` (JSON)
and `num_classes`. Shards are the one interface between the trainer image (which writes
them) and the Airflow image (whose merge reads them, without torch).
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks import runs, storage
from tasks.config import AuditConfig
from tasks.plan import RepeatSpec, plan_repeats

FULL_PROBS_MAX_CLASSES = 256  # beyond this a shard keeps the top-k class probabilities
TOP_K = 32


# --- writing ------------------------------------------------------------------------------

def shard_fingerprint(cfg: AuditConfig, manifest: pd.DataFrame, spec: RepeatSpec) -> str:
    """Changes when anything that decides the shard's content changes."""
    h = hashlib.sha256(cfg.training_fingerprint().encode())
    h.update(pd.util.hash_pandas_object(manifest[["key", "label", "etag"]], index=False)
             .to_numpy().tobytes())
    h.update(repr(spec.to_dict()).encode())
    return h.hexdigest()[:24]


def shard_table(ids: np.ndarray, given: np.ndarray, probs: np.ndarray, spec: RepeatSpec,
                fingerprint: str, stats: dict[str, float]) -> pa.Table:
    """The shard schema: one row per held-out image, from its ids, given labels and class
    probabilities (N x classes); `stats` (the training's numbers) go into the metadata."""
    pred = probs.argmax(1)
    cols: dict[str, pa.Array] = {
        "id": pa.array(ids, pa.int64()),
        "repeat": pa.array(np.full(len(ids), spec.repeat), pa.int32()),
        "given": pa.array(given, pa.int32()),
        "pred": pa.array(pred, pa.int32()),
        "p_given": pa.array(probs[np.arange(len(ids)), given], pa.float32()),
    }
    if probs.shape[1] <= FULL_PROBS_MAX_CLASSES:
        cols["probs"] = pa.array(list(probs.astype(np.float32)), pa.list_(pa.float32()))
    else:
        top = np.argsort(-probs, axis=1)[:, :TOP_K]
        cols["topk_idx"] = pa.array(list(top.astype(np.int32)), pa.list_(pa.int32()))
        cols["topk_prob"] = pa.array(list(np.take_along_axis(probs, top, 1).astype(np.float32)),
                                     pa.list_(pa.float32()))
    meta = {"fingerprint": fingerprint, "spec": json.dumps(spec.to_dict()),
            "num_classes": str(probs.shape[1]), "stats": json.dumps(stats)}
    return pa.table(cols).replace_schema_metadata({k: v.encode() for k, v in meta.items()})


def write_shard(uri: str, table: pa.Table) -> None:
    """Write a shard table at `uri` atomically (readers never see a partial shard)."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


# --- reading ------------------------------------------------------------------------------

def _raw_metadata(uri: str) -> dict[bytes, bytes] | None:
    if not storage.exists(uri):
        return None
    return pq.read_schema(io.BytesIO(storage.read_bytes(uri))).metadata or {}


def shard_metadata(uri: str) -> dict[str, Any] | None:
    """An existing shard's metadata (`fingerprint`, `spec`, `num_classes`, `stats`, with
    `spec` and `stats` parsed from JSON), or None when there is no shard at `uri`."""
    raw = _raw_metadata(uri)
    if raw is None:
        return None
    meta: dict[str, Any] = {k.decode(): v.decode() for k, v in raw.items()
                            if k in (b"fingerprint", b"spec", b"num_classes", b"stats")}
    for key in ("spec", "stats"):
        if key in meta:
            meta[key] = json.loads(meta[key])
    return meta


def existing_fingerprint(uri: str) -> str | None:
    """The fingerprint recorded in an existing shard, or None."""
    raw = _raw_metadata(uri)
    return (raw or {}).get(b"fingerprint", b"").decode() or None


def read_shards(run: str, cfg: AuditConfig, manifest: pd.DataFrame,
                num_classes: int) -> tuple[list[int], list[pd.DataFrame], list[int]]:
    """(repeats found, their shard frames with a dense `probs` column, repeats missing or
    stale: no shard, or one whose fingerprint does not match the run's config and
    manifest)."""
    found, frames, missing = [], [], []
    for spec in plan_repeats(cfg):
        uri = runs.shard_uri(run, spec.repeat)
        if existing_fingerprint(uri) != shard_fingerprint(cfg, manifest, spec):
            missing.append(spec.repeat)
            continue
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
        frames.append(dense_probs(table.to_pandas(), num_classes))
        found.append(spec.repeat)
    return found, frames, missing


def dense_probs(df: pd.DataFrame, num_classes: int) -> pd.DataFrame:
    """Shard frame with a dense `probs` column. Top-k shards are filled with zeros beyond
    the top k, except the given label, whose probability the shard always records."""
    if "probs" in df:
        return df
    probs = np.zeros((len(df), num_classes), dtype=np.float32)
    for i, (idx, p) in enumerate(zip(df["topk_idx"], df["topk_prob"], strict=True)):
        probs[i, idx] = p
    probs[np.arange(len(df)), df["given"].to_numpy()] = df["p_given"].to_numpy()
    df = df.drop(columns=["topk_idx", "topk_prob"])
    df["probs"] = list(probs)
    return df

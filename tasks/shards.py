"""Shard fingerprints, without torch: the trainer writes them, merge (which runs in the
Airflow image, where torch is not installed) checks them."""

from __future__ import annotations

import hashlib
import io

import pandas as pd
import pyarrow.parquet as pq

from tasks import storage
from tasks.config import AuditConfig
from tasks.plan import RepeatSpec


def shard_fingerprint(cfg: AuditConfig, manifest: pd.DataFrame, spec: RepeatSpec) -> str:
    """Changes when anything that decides the shard's content changes."""
    h = hashlib.sha256(cfg.training_fingerprint().encode())
    h.update(pd.util.hash_pandas_object(manifest[["key", "label", "etag"]], index=False)
             .to_numpy().tobytes())
    h.update(repr(spec.to_dict()).encode())
    return h.hexdigest()[:24]


def existing_fingerprint(uri: str) -> str | None:
    """The fingerprint recorded in an existing shard, or None."""
    if not storage.exists(uri):
        return None
    meta = pq.read_schema(io.BytesIO(storage.read_bytes(uri))).metadata or {}
    return meta.get(b"fingerprint", b"").decode() or None

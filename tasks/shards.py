"""The shard contract, without torch: how a shard is built, written, fingerprinted and read.

A shard (`<run>/shards/repeat-<r>.parquet`) holds one repeat's out-of-sample predictions,
one row per held-out image: `id`, `repeat`, `given`, `pred`, `p_given` and either `probs`
(every class, up to `FULL_PROBS_MAX_CLASSES`) or `topk_idx`/`topk_prob` (the top
`TOP_K` beyond that). Its schema metadata records `fingerprint`, `spec` and `stats` (JSON)
and `num_classes`. Shards are the one interface between the trainer image (which writes
them) and the Airflow image (whose merge reads them, without torch).

A merge hashes the manifest once (`fingerprint_base`) and derives every repeat's
fingerprint from that (`repeat_fingerprint`); it reads each shard once, metadata and data
together (`read_shards`), and takes its columns as numpy arrays (`shard_rows`).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks import runs, storage
from tasks.config import AuditConfig
from tasks.plan import RepeatSpec

FULL_PROBS_MAX_CLASSES = 256  # beyond this a shard keeps the top-k class probabilities
TOP_K = 32


# --- writing ------------------------------------------------------------------------------

FINGERPRINT_COLUMNS = ["key", "label", "etag"]
_HASH_ROWS = 1 << 18  # manifest rows hashed at a time (bounded memory; same digest)


def fingerprint_base(cfg: AuditConfig,
                     manifest: pd.DataFrame | pa.Table | Iterable[pa.RecordBatch]) -> Any:
    """The hash state every shard fingerprint of this config and manifest starts from (a
    hashlib object): the manifest (a DataFrame, an Arrow table or a stream of record batches
    with at least `key`, `label` and `etag`) is hashed once here, in row chunks, and
    `repeat_fingerprint` finishes it."""
    h = hashlib.sha256(cfg.training_fingerprint().encode())
    if isinstance(manifest, pd.DataFrame):
        parts: Iterable[Any] = (manifest[FINGERPRINT_COLUMNS].iloc[i:i + _HASH_ROWS]
                                for i in range(0, len(manifest), _HASH_ROWS))
    else:
        if isinstance(manifest, pa.Table):
            manifest = manifest.select(FINGERPRINT_COLUMNS).to_batches(_HASH_ROWS)
        parts = (batch.select(FINGERPRINT_COLUMNS).to_pandas() for batch in manifest)
    for part in parts:
        # Row by row, so hashing in chunks gives the bytes of hashing the whole at once;
        # without missing values, `categorize=False` gives the same hashes, faster.
        nulls = bool(part.isna().to_numpy().any())
        h.update(pd.util.hash_pandas_object(part, index=False, categorize=nulls)
                 .to_numpy().tobytes())
    return h


def repeat_fingerprint(base: Any, spec: RepeatSpec) -> str:
    """The fingerprint of one repeat's shard, from `fingerprint_base`."""
    h = base.copy()
    h.update(repr(spec.to_dict()).encode())
    return h.hexdigest()[:24]


def shard_fingerprint(cfg: AuditConfig, manifest: pd.DataFrame | pa.Table,
                      spec: RepeatSpec) -> str:
    """Changes when anything that decides the shard's content changes."""
    return repeat_fingerprint(fingerprint_base(cfg, manifest), spec)


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
        # The top k by probability, highest first: a partition, then a sort of k per row.
        part = np.argpartition(-probs, TOP_K - 1, axis=1)[:, :TOP_K]
        order = np.argsort(-np.take_along_axis(probs, part, 1), axis=1, kind="stable")
        top = np.take_along_axis(part, order, 1)
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


def read_shard(uri: str) -> pa.Table | None:
    """The shard at `uri` (data and metadata, one read), or None when there is none."""
    if not storage.exists(uri):
        return None
    return pq.read_table(pa.BufferReader(storage.read_bytes(uri)))


def read_shards(run: str, specs: list[RepeatSpec],
                base: Any) -> Iterator[tuple[RepeatSpec, pa.Table | None]]:
    """Each repeat's shard table in plan order, one at a time, each read once; None for a
    repeat whose shard is missing or stale (its fingerprint does not match `base`, from
    `fingerprint_base` of the run's config and manifest)."""
    for spec in specs:
        table = read_shard(runs.shard_uri(run, spec.repeat))
        if table is not None:
            found = (table.schema.metadata or {}).get(b"fingerprint", b"").decode()
            if found != repeat_fingerprint(base, spec):
                table = None
        yield spec, table


@dataclass(frozen=True)
class ShardRows:
    """A shard's rows as numpy arrays: image `ids`, `given` and `pred` labels, `p_given`
    (the given label's probability) and `probs`: every class (rows x classes) or, for a
    top-k shard, the top k (rows x k) of the classes in `topk_idx` (None otherwise)."""

    ids: np.ndarray
    given: np.ndarray
    pred: np.ndarray
    p_given: np.ndarray
    probs: np.ndarray
    topk_idx: np.ndarray | None


def _list_matrix(table: pa.Table, column: str, width: int | None, name: str) -> np.ndarray:
    """A list column of equal-length lists as a rows x width numpy array."""
    arr = table.column(column).combine_chunks()
    lengths = pc.list_value_length(arr)
    lo, hi = pc.min(lengths).as_py(), pc.max(lengths).as_py()
    want = width if width is not None else lo
    if len(arr) and (lo != want or hi != want):
        raise ValueError(f"shard {name}: column {column!r} holds {lo} to {hi} values per row, "
                         f"expected {want}; re-run that repeat to rewrite it")
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(arr), want if len(arr) else 0)


def shard_rows(table: pa.Table, num_classes: int, n_images: int, name: str) -> ShardRows:
    """The arrays of a shard table (or a slice of one) for a run with `num_classes` classes and
    `n_images` images; ValueError naming the shard when its shape does not fit the run."""
    ids = table.column("id").to_numpy()
    if len(ids) and (ids.min() < 0 or ids.max() >= n_images):
        raise ValueError(f"shard {name}: image id {int(ids.max())} is outside the manifest "
                         f"({n_images} images); re-run that repeat to rewrite it")
    cols = [table.column(c).to_numpy() for c in ("given", "pred", "p_given")]
    if "probs" in table.column_names:
        probs, topk = _list_matrix(table, "probs", num_classes, name), None
    else:
        topk = _list_matrix(table, "topk_idx", None, name)
        probs = _list_matrix(table, "topk_prob", topk.shape[1], name)
    return ShardRows(ids, *cols, probs=probs, topk_idx=topk)

"""The embedding-mode contract, without torch or faiss: chunks of the manifest, the chunk
files, neighbours.parquet, and what merge and the report take from it.

Chunk `c` holds the manifest rows [c * embed_chunk_size, (c + 1) * embed_chunk_size) and is
written by `python -m tasks.embed --run <run> --chunk <c>` to
`<run>/embeddings/chunk-NNNNN.parquet`: columns `id` (int64) and `embedding` (a fixed-size
list of float16, L2-normalised), schema metadata `fingerprint`, `chunk`, `dim` and `model`.
`python -m tasks.probe --run <run>` reads every chunk, writes the shards and
`<run>/neighbours.parquet`: one row per image with `id` and NEIGHBOUR_COLUMNS, metadata
`fingerprint`. Merge appends those columns to the results, by id (`neighbour_table`), and
the report shows them (`neighbour_sections`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks import runs, storage
from tasks.config import AuditConfig
from tasks.errors import UserError

log = logging.getLogger(__name__)

# Bump when what an embedding chunk holds changes for the same config (preprocessing, head).
EMBED_VERSION = "2"
# Bump when what neighbours.parquet holds changes for the same embeddings and config.
NEIGHBOURS_VERSION = "2"
NEIGHBOUR_COLUMNS = ["knn_agreement", "knn_label", "outlier_score", "duplicate_group",
                     "duplicate_conflict"]
REPORT_GROUPS_MAX = 100  # duplicate groups listed in the report
REPORT_OUTLIERS_MAX = 50


class EmbeddingsError(UserError, RuntimeError):
    """Embedding chunks are missing or stale; the message names them and the command to run."""


# --- chunks ---------------------------------------------------------------------------------

def n_chunks(n_images: int, chunk_size: int) -> int:
    """How many chunks the embedding pass of `n_images` images has."""
    return max(1, math.ceil(n_images / chunk_size))


def chunk_rows(chunk: int, chunk_size: int, n_images: int) -> np.ndarray:
    """Manifest row positions of chunk `chunk`."""
    return np.arange(chunk * chunk_size, min(n_images, (chunk + 1) * chunk_size))


def chunk_fingerprint(cfg: AuditConfig, manifest: pd.DataFrame, chunk: int) -> str:
    """Changes when anything that decides chunk `chunk`'s embeddings changes: the backbone,
    its weights, the image size and the chunk's images (keys and ETags)."""
    rows = chunk_rows(chunk, cfg.embed_chunk_size, len(manifest))
    h = hashlib.sha256(json.dumps([EMBED_VERSION, cfg.model_name, cfg.weights_request,
                                   cfg.input_size, cfg.embed_chunk_size, chunk]).encode())
    h.update(pd.util.hash_pandas_object(manifest.iloc[rows][["key", "etag"]], index=False)
             .to_numpy().tobytes())
    return h.hexdigest()[:24]


def chunk_table(ids: np.ndarray, embeddings: np.ndarray, fingerprint: str, chunk: int,
                model: str) -> pa.Table:
    """A chunk file's table: ids and their L2-normalised embeddings (N x dim) as float16."""
    emb = np.ascontiguousarray(embeddings, dtype=np.float16)
    dim = emb.shape[1]
    cols = {"id": pa.array(ids, pa.int64()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), dim)}
    meta = {"fingerprint": fingerprint, "chunk": str(chunk), "dim": str(dim), "model": model}
    return pa.table(cols).replace_schema_metadata({k: v.encode() for k, v in meta.items()})


def write_parquet(uri: str, table: pa.Table) -> None:
    """Write a table at `uri` atomically (readers never see a partial file)."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def chunk_is_valid(uri: str, fingerprint: str, n_rows: int) -> bool:
    """True when the chunk file at `uri` exists, reads, carries `fingerprint` and holds
    `n_rows` rows (a resumed pass skips it)."""
    if not storage.exists(uri):
        return False
    try:
        meta = pq.read_metadata(io.BytesIO(storage.read_bytes(uri)))
    except (OSError, pa.ArrowException) as err:
        log.warning("embedding chunk %s does not read (%s); embedding it again", uri, err)
        return False
    recorded = (meta.schema.to_arrow_schema().metadata or {}).get(b"fingerprint", b"").decode()
    return recorded == fingerprint and meta.num_rows == n_rows


def read_embeddings(run: str, cfg: AuditConfig, manifest: pd.DataFrame) -> np.ndarray:
    """Every image's embedding (N x dim, float16) in manifest row order. Raises
    EmbeddingsError naming the chunks that are missing or stale."""
    n = len(manifest)
    count = n_chunks(n, cfg.embed_chunk_size)
    bad, parts = [], []
    for c in range(count):
        uri = runs.embedding_chunk_uri(run, c)
        rows = chunk_rows(c, cfg.embed_chunk_size, n)
        if not chunk_is_valid(uri, chunk_fingerprint(cfg, manifest, c), len(rows)):
            bad.append(c)
            continue
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
        dim = int(table.schema.metadata[b"dim"])
        emb = table.column("embedding").combine_chunks().values.to_numpy(zero_copy_only=False)
        ids = table.column("id").to_numpy()
        if not np.array_equal(ids, manifest["id"].to_numpy()[rows]):
            bad.append(c)
            continue
        parts.append(emb.reshape(len(rows), dim))
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        raise EmbeddingsError(
            f"{len(bad)} of {count} embedding chunks are missing or stale ({shown}); run "
            f"python -m tasks.embed --run {run} --chunk N for each, then the probes again")
    return np.concatenate(parts)


# --- neighbours.parquet ---------------------------------------------------------------------

def neighbours_fingerprint(cfg: AuditConfig, manifest: pd.DataFrame) -> str:
    """Changes with the embeddings, the given labels, knn_k, duplicate_threshold and
    NEIGHBOURS_VERSION."""
    h = hashlib.sha256(json.dumps([NEIGHBOURS_VERSION, cfg.knn_k,
                                   cfg.duplicate_threshold]).encode())
    for c in range(n_chunks(len(manifest), cfg.embed_chunk_size)):
        h.update(chunk_fingerprint(cfg, manifest, c).encode())
    h.update(pd.util.hash_pandas_object(manifest["label"], index=False).to_numpy().tobytes())
    return h.hexdigest()[:24]


def write_neighbours(run: str, frame: pd.DataFrame, fingerprint: str) -> str:
    """Write neighbours.parquet (`id` and NEIGHBOUR_COLUMNS); returns its URI."""
    table = pa.Table.from_pandas(frame[["id", *NEIGHBOUR_COLUMNS]], preserve_index=False)
    meta = {**(table.schema.metadata or {}), b"fingerprint": fingerprint.encode()}
    uri = runs.neighbours_uri(run)
    write_parquet(uri, table.replace_schema_metadata(meta))
    return uri


def existing_neighbours_fingerprint(run: str) -> str | None:
    """The fingerprint recorded in the run's neighbours.parquet, or None."""
    uri = runs.neighbours_uri(run)
    if not storage.exists(uri):
        return None
    schema = pq.read_schema(io.BytesIO(storage.read_bytes(uri)))
    return (schema.metadata or {}).get(b"fingerprint", b"").decode() or None


def neighbour_table(run: str, cfg: AuditConfig, manifest: pd.DataFrame) -> pa.Table | None:
    """The neighbour columns of an embedding-mode run as an Arrow table whose row i is image
    id i (ids are the manifest rows 0..N-1), typed as the results carry them, for merge to
    take each written chunk's rows from; None for a training-mode run, or when
    neighbours.parquet is missing or stale (logged). `manifest` needs `key`, `etag` and
    `label`."""
    if cfg.method != "embeddings":
        return None
    if existing_neighbours_fingerprint(run) != neighbours_fingerprint(cfg, manifest):
        log.warning("%s is missing or stale; results have no neighbour columns (run python "
                    "-m tasks.probe --run %s, then merge again)", runs.neighbours_uri(run), run)
        return None
    table = pq.read_table(pa.BufferReader(storage.read_bytes(runs.neighbours_uri(run))),
                          columns=["id", *NEIGHBOUR_COLUMNS])
    n = len(manifest)
    ids = table.column("id").to_numpy()
    agreement, outlier = np.full(n, np.nan), np.full(n, np.nan)
    agreement[ids] = table.column("knn_agreement").to_numpy(zero_copy_only=False)
    outlier[ids] = table.column("outlier_score").to_numpy(zero_copy_only=False)
    group = np.zeros(n, dtype=np.int64)
    grouped = np.zeros(n, dtype=bool)
    col = table.column("duplicate_group")
    grouped[ids] = col.is_valid().to_numpy(zero_copy_only=False)
    group[ids] = col.fill_null(0).to_numpy()
    conflict = np.zeros(n, dtype=bool)
    conflict[ids] = table.column("duplicate_conflict").fill_null(False).to_numpy(
        zero_copy_only=False)
    knn_label = np.full(n, None, dtype=object)
    knn_label[ids] = table.column("knn_label").to_numpy(zero_copy_only=False)
    return pa.table({"knn_agreement": agreement, "knn_label": pa.array(knn_label, pa.string()),
                     "outlier_score": outlier,
                     "duplicate_group": pa.array(group, mask=~grouped),
                     "duplicate_conflict": conflict})


# --- the report -----------------------------------------------------------------------------

def _numbers(results: pd.DataFrame, column: str) -> pd.Series:
    return pd.to_numeric(results[column].replace("", None), errors="coerce")


def neighbour_sections(results: pd.DataFrame) -> dict[str, Any] | None:
    """What the report's "Duplicates and label conflicts" and "Outliers" sections show, from
    a results frame (as read back from results.csv); None when it has no neighbour columns."""
    if not set(NEIGHBOUR_COLUMNS) <= set(results.columns):
        return None
    group = _numbers(results, "duplicate_group")
    conflict = results["duplicate_conflict"].astype(str).str.lower().isin(["true", "1"])
    frame = pd.DataFrame({"name": results["filename"].astype(str),
                          "label": results["label"].astype(str), "group": group,
                          "conflict": conflict,
                          "agreement": _numbers(results, "knn_agreement"),
                          "outlier": _numbers(results, "outlier_score")})
    dup = frame[frame["group"].notna()]
    groups = []
    for gid, members in dup.groupby("group", sort=False):
        groups.append({"group": int(gid), "conflict": bool(members["conflict"].any()),
                       "labels": sorted(set(members["label"])),
                       "members": members[["name", "label"]].sort_values("name")
                       .to_dict("records")})
    groups.sort(key=lambda g: (not g["conflict"], -len(g["members"]), g["group"]))
    outliers = frame[frame["outlier"].notna()].sort_values(["outlier", "name"],
                                                           ascending=[False, True])
    return {
        "n_groups": len(groups), "n_duplicates": len(dup),
        "n_conflicts": sum(g["conflict"] for g in groups),
        "groups": groups[:REPORT_GROUPS_MAX],
        "more_groups": max(0, len(groups) - REPORT_GROUPS_MAX),
        "outliers": outliers.head(REPORT_OUTLIERS_MAX).to_dict("records"),
        "median_outlier": float(frame["outlier"].median()) if len(outliers) else math.nan,
    }

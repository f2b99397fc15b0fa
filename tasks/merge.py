"""Pool the shards' out-of-sample predictions per image and score every label.

Per image: `num_preds`, the votes per class, `corrected_label` (majority vote, ties broken
by mean probability), `%` (vote share of `corrected_label`, 0-100), `label_quality` (mean
out-of-sample probability of the given label), `suggested_quality` (that of
`corrected_label`), and from `tasks.decide` (after cleanlab's noise estimate):
`p_label_wrong`, `p_suggestion`, `is_label_issue` (p_label_wrong > 1/2, the majority vote
names another class and `label_quality < max_label_quality`, default 1: off; in embedding
mode also fewer than half of the image's nearest neighbours carry its label) and `tier`.

Memory (`merge_memory_gb`): the shards are streamed, each read once (one download on S3), and
the manifest is hashed once for their fingerprints. Images are pooled in buckets of
consecutive ids, each in a dense images x classes workspace (vote counts and probability
sums) sized so that a bucket fits the budget (`bucket_size`); between buckets only a few
numbers per image are kept (label, prediction count, label quality, flags, sort keys). With
one bucket everything stays in memory; with more, each shard's rows are spilled to local
Arrow files per bucket (read back once per pass), and the results are routed to parts of
the output order, each sorted and written in turn.

cleanlab's noise estimate runs in passes over the buckets (`_BatchedFilter`): per class the
mean self-confidence as threshold, then per image the cell of the confident joint it counts
in. That is what `cleanlab.count.compute_confident_joint` computes (cleanlab 2.9), with the
same arithmetic on the same numbers, so the estimate is exact at any size: tests check it
against cleanlab itself (ties, classes without images), the whole merge against the dense
in-memory `score`, and the bucketed merge against the in-memory one (byte-identical
results.csv).
Nothing is approximated beyond what the shards hold: beyond `FULL_PROBS_MAX_CLASSES` classes a
shard keeps each prediction's top `TOP_K` classes and its given label, the other classes count
as 0 (as before), and predictions.parquet keeps each image's top `TOP_K` pooled classes
(`topk_idx`, `topk_prob`, highest first) instead of all of them (`mean_probs`).

Results are written by streaming, in row groups: results.csv (the bytes pandas' `to_csv` wrote
for the same rows) and predictions.parquet, both sorted most suspicious first.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks import decide, runs, storage
from tasks.config import AuditConfig
from tasks.embeddings import NEIGHBOUR_COLUMNS, neighbour_table
from tasks.errors import MissingFileError, UserError
from tasks.index import DatasetError
from tasks.plan import plan_repeats, planned_test
from tasks.shards import (
    FINGERPRINT_COLUMNS,
    FULL_PROBS_MAX_CLASSES,
    TOP_K,
    fingerprint_base,
    read_shards,
    shard_rows,
)

log = logging.getLogger(__name__)

RESULT_COLUMNS = ["filename", "label", "corrected_label", "num_preds", "%", "label_quality",
                  "is_label_issue", "suggested_quality", "votes", "id", "tier", "p_label_wrong",
                  "p_suggestion"]
# cleanlab 2.9's CONFIDENT_THRESHOLDS_LOWER_BOUND (cleanlab.internal.constants; a test checks
# it), here so that a merge does not import cleanlab (and scipy, scikit-learn).
_CL_THRESHOLD_FLOOR = 2e-6

# Memory model of the merge (bytes), checked with benchmarks/scale_bench.py.
BASE_BYTES = 350 << 20  # Python, numpy, pandas, pyarrow and cleanlab
# per image, kept for the whole merge (labels, counts, flags, sort keys, the other classes'
# largest probabilities for p_suggestion)
IMAGE_BYTES = 120 + 4 * decide.OTHERS + 8
POSTERIOR_CHUNK = 1 << 18  # images per call of decide.posterior (float64 temporaries)
BUCKET_IMAGE_BYTES = 700  # per image of a bucket: its result row, sorted and written
BUCKET_CELL_BYTES = 16  # per image x class of a bucket: workspace, mean probabilities written
TOPK_IMAGE_BYTES = 800  # per image beyond FULL_PROBS_MAX_CLASSES: its top-k classes written
MAX_BUCKETS = 256
CHUNK_CELLS = 1 << 21  # images x classes scored at a time
WRITE_ROWS = 1 << 17  # rows per CSV write and Parquet row group


class MissingShardsError(UserError, RuntimeError):
    """Too few repeats produced shards; the message lists the missing repeats."""

    def __init__(self, message: str, missing: list[int]) -> None:
        super().__init__(message)
        self.missing = missing


# --- pooling ------------------------------------------------------------------------------

class _Pool:
    """Vote counts and probability sums of the images with ids lo..hi-1 (a dense workspace)."""

    def __init__(self, lo: int, hi: int, num_classes: int,
                 reuse: _Pool | None = None) -> None:
        """`reuse`: a pool at least as large whose memory to reuse (the pages of a new array
        are faulted in on first touch, which costs more than zeroing used ones)."""
        self.lo, self.hi = lo, hi
        self.means = False  # prob_sum holds sums; True once `_Merge._chunks` made them means
        if reuse is None:
            self.prob_sum = np.zeros((hi - lo, num_classes))
            self.votes = np.zeros((hi - lo, num_classes), dtype=np.uint16)
        else:
            self.prob_sum, self.votes = reuse.prob_sum[:hi - lo], reuse.votes[:hi - lo]
            self.prob_sum.fill(0.0)
            self.votes.fill(0)

    def add(self, ids: np.ndarray, pred: np.ndarray, probs: np.ndarray,
            topk_idx: np.ndarray | None = None, given: np.ndarray | None = None,
            p_given: np.ndarray | None = None) -> None:
        """Add one shard's rows: `probs` of every class, or of the classes in `topk_idx`
        plus the given label's probability (the other classes count as 0)."""
        li = ids - self.lo
        # A shard holds each image once (its ids ascending): plain fancy-index adds suffice.
        once = len(li) < 2 or bool((np.diff(li) > 0).all())
        if topk_idx is None:
            if once:
                rows = np.take(self.prob_sum, li, axis=0)
                rows += probs
                self.prob_sum[li] = rows
            else:
                np.add.at(self.prob_sum, li, probs)
        else:
            assert given is not None and p_given is not None
            width = self.prob_sum.shape[1]
            hit = topk_idx == given[:, None]  # the given label's slot holds p_given
            values = np.where(hit, p_given[:, None], probs).reshape(-1)
            flat = (li[:, None] * width + topk_idx).reshape(-1)
            miss = ~hit.any(axis=1)
            flat_given = li[miss] * width + given[miss]
            cells = self.prob_sum.reshape(-1)
            if once:  # a class named twice in a row counts once, as in a dense row
                cells[flat] += values
                cells[flat_given] += p_given[miss]
            else:
                np.add.at(cells, flat, values)
                np.add.at(cells, flat_given, p_given[miss])
        if once:
            self.votes[li, pred] += 1
        else:
            np.add.at(self.votes, (li, pred), 1)


def aggregate(n_images: int, labels: np.ndarray, frames: Iterable[pd.DataFrame],
              num_classes: int) -> dict[str, np.ndarray]:
    """Per-image vote counts, mean probabilities and prediction counts of in-memory frames
    (`id`, `pred`, `probs` of every class), all images at once."""
    pool = _Pool(0, n_images, num_classes)
    for df in frames:
        pool.add(df["id"].to_numpy(), df["pred"].to_numpy(), np.stack(df["probs"].to_numpy()))
    num_preds = pool.votes.sum(1, dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_probs = pool.prob_sum / num_preds[:, None]
    return {"votes": pool.votes, "mean_probs": mean_probs, "num_preds": num_preds}


# --- scoring ------------------------------------------------------------------------------

def _vote_scores(labels: np.ndarray, votes: np.ndarray, safe_probs: np.ndarray,
                 num_preds: np.ndarray) -> dict[str, np.ndarray]:
    """Row by row: corrected label, vote share, label quality and the suggested label's
    probability, from vote counts and mean probabilities (0 where there is no prediction)."""
    n = len(labels)
    predicted = num_preds > 0
    # Majority vote; ties broken by the mean probability (tiny weight, below one vote).
    corrected = np.argmax(votes + safe_probs * 1e-3, axis=1)
    corrected[~predicted] = labels[~predicted]
    rows = np.arange(n)
    with np.errstate(invalid="ignore", divide="ignore"):
        pct = np.where(predicted, votes[rows, corrected] / num_preds * 100, np.nan)
    quality = np.where(predicted, safe_probs[rows, labels], np.nan)
    suggested_quality = np.where(predicted, safe_probs[rows, corrected], np.nan)
    return {"corrected": corrected, "pct": pct, "quality": quality,
            "suggested_quality": suggested_quality}


def _scaled(probs: np.ndarray) -> np.ndarray:
    """Rows scaled to sum to 1."""
    return probs / probs.sum(1, keepdims=True).clip(min=1e-12)


def score(labels: np.ndarray, votes: np.ndarray, mean_probs: np.ndarray,
          num_preds: np.ndarray, max_label_quality: float = 1.0) -> dict[str, np.ndarray]:
    """corrected label, vote share, label quality, the posterior's two columns and the
    label-issue flag per image (every image at once, in memory, with cleanlab's own
    `compute_confident_joint` for the noise estimate)."""
    predicted = num_preds > 0
    safe_probs = np.nan_to_num(mean_probs, nan=0.0)
    s = _vote_scores(labels, votes, safe_probs, num_preds)
    k = safe_probs.shape[1]
    counts = np.bincount(labels[predicted], minlength=k)
    joint = np.diag(counts)
    present = np.unique(labels[predicted])
    if len(present) >= 2:
        from cleanlab.count import compute_confident_joint

        remap = np.full(k, -1)
        remap[present] = np.arange(len(present))
        sub = _scaled(safe_probs[predicted][:, present])
        joint = np.zeros((k, k), dtype=np.int64)
        joint[np.ix_(present, present)] = compute_confident_joint(
            remap[labels[predicted]], sub, calibrate=False)
    noise, _ = decide.noise_rates(decide.noise_joint(joint, counts))
    s["p_label_wrong"], s["p_suggestion"] = decide.posterior(
        s["quality"], s["suggested_quality"], s["corrected"] != labels, noise, k,
        int(predicted.sum()), *decide.other_classes(safe_probs, labels, s["corrected"]))
    s["flagged"] = (np.nan_to_num(s["p_label_wrong"]) > 0.5) & _disagrees(
        s, labels, max_label_quality)
    return s


def too_few_predictions(num_preds: np.ndarray, cfg: AuditConfig) -> str | None:
    """Why no image can be relabelled when none reaches `min_preds` predictions, else None."""
    most = int(np.max(num_preds, initial=0))
    if most >= cfg.min_preds:
        return None
    if cfg.split_strategy == "rounds":
        more = (f"n_repeats to at least {cfg.folds * cfg.min_preds} ({cfg.min_preds} rounds "
                f"of {cfg.folds} folds)")
    else:
        more = f"n_repeats (each repeat predicts about {cfg.test_split:.0%} of the images)"
    return (f"no image can be relabelled: every image has at most {most} "
            f"prediction{'' if most == 1 else 's'}, fewer than min_preds {cfg.min_preds}; "
            f"raise {more} or lower min_preds")


class _BatchedFilter:
    """cleanlab's confident joint over the present classes in passes over batches of images,
    with cleanlab's arithmetic on the same numbers: per class the mean self-confidence as the
    threshold (pass 1, `self_confidence`), then per image its cell of the joint and whether
    cleanlab's `num_label_issues` counts it (pass 2, `count`)."""

    def __init__(self, present: np.ndarray, num_classes: int) -> None:
        self.present = present
        self.all_present = len(present) == num_classes
        self.remap = np.full(num_classes, -1)
        self.remap[present] = np.arange(len(present))
        self.thresholds: np.ndarray | None = None
        # cleanlab's confident joint over the present classes (rows given, columns the
        # confidently predicted class), counted by `count`.
        self.joint = np.zeros((len(present), len(present)), dtype=np.int64)

    def scaled(self, probs: np.ndarray) -> np.ndarray:
        """`_confident_learning`'s input: over the present classes, rows scaled to sum 1."""
        sub = probs if self.all_present else probs[:, self.present]
        return sub / sub.sum(1, keepdims=True).clip(min=1e-12)

    def self_confidence(self, labels: np.ndarray, sub: np.ndarray) -> np.ndarray:
        """Per image, the probability of its given label in `sub` (from `scaled`): cleanlab's
        score."""
        return sub[np.arange(len(labels)), self.remap[labels]]

    def set_thresholds(self, labels: np.ndarray, self_conf: np.ndarray) -> None:
        """cleanlab's confident thresholds: per class the mean self-confidence (every image's,
        in image order), clipped from below."""
        lab = self.remap[labels]
        order = np.argsort(lab, kind="stable")
        bounds = np.searchsorted(lab[order], np.arange(len(self.present) + 1))
        means = [np.mean(self_conf[order[a:b]]) for a, b in itertools.pairwise(bounds)]
        self.thresholds = np.clip(means, a_min=_CL_THRESHOLD_FLOOR, a_max=None)

    def full_joint(self) -> np.ndarray:
        """The confident joint over every class (classes without images: zero rows)."""
        k = len(self.remap)
        out = np.zeros((k, k), dtype=np.int64)
        out[np.ix_(self.present, self.present)] = self.joint
        return out

    def count(self, labels: np.ndarray, sub: np.ndarray) -> None:
        """Add the images of `sub` (from `scaled`) to the confident joint: an image counts in
        (given, guess) when some class is above its threshold; guess is the most probable
        of those (cleanlab's rule)."""
        assert self.thresholds is not None
        lab = self.remap[labels]
        confident = sub >= self.thresholds - 1e-6
        n_confident = confident.sum(axis=1)
        guess = np.where(n_confident > 1, sub.argmax(axis=1), confident.argmax(axis=1))
        some = n_confident > 0
        width = len(self.present)
        self.joint += np.bincount(lab[some] * width + guess[some],
                                  minlength=width * width).reshape(width, width)


# --- text columns -------------------------------------------------------------------------

def _votes_text(votes: np.ndarray, classes: pa.Array) -> pa.Array:
    """Per image (row of vote counts): `class:count` for each class voted for, most votes
    first (ties in class order), joined by `;`; empty without votes."""
    rows, cols = np.nonzero(votes)
    counts = votes[rows, cols].astype(np.int64)
    order = np.lexsort((cols, -counts, rows))
    rows, cols, counts = rows[order], cols[order], counts[order]
    tokens = pc.binary_join_element_wise(classes.take(pa.array(cols)),
                                         pc.cast(pa.array(counts), pa.string()), ":")
    offsets = np.zeros(len(votes) + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=len(votes)), out=offsets[1:])
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), tokens), ";")


def _csv_quote(value: str) -> str:
    """One field as Python's csv writer (pandas' `to_csv`) writes it."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([value])
    return buf.getvalue()[:-1]


_CSV_SPECIAL = re.compile(rb'[,"\r\n]')


def _csv_strings(arr: pa.Array) -> pa.Array:
    """A string column as CSV fields: quoted where the csv module quotes (rare rows)."""
    data = arr.buffers()[2]
    if data is None or not _CSV_SPECIAL.search(memoryview(data)):
        return arr  # no byte anywhere that could need quoting
    special = pc.match_substring_regex(arr, r'[,"\r\n]')
    if not pc.any(special).as_py():
        return arr
    quoted = [_csv_quote(v) for v in pc.filter(arr, special).to_pylist()]
    return pc.replace_with_mask(arr, special, pa.array(quoted, arr.type))


def _csv_floats(x: np.ndarray) -> pa.Array:
    """Floats as pandas' `to_csv` writes them (numpy's repr; empty for NaN): Arrow's
    shortest round-trip text where the two agree (0 and 1e-4 <= |x| < 1e6, with `.0` on
    whole numbers), numpy's own for the rest."""
    text = pc.cast(pa.array(x), pa.string())
    ax = np.abs(x)
    plain = (x == 0) | ((ax >= 1e-4) & (ax < 1e6))
    whole = plain & (np.floor(x) == x)
    if whole.any():
        text = pc.if_else(pa.array(whole), pc.binary_join_element_wise(text, ".0", ""), text)
    other = ~plain & ~np.isnan(x)
    if other.any():
        text = pc.replace_with_mask(text, pa.array(other),
                                    pa.array(x[other].astype(str).tolist(), pa.string()))
    nan = np.isnan(x)
    if nan.any():
        text = pc.if_else(pa.array(nan), "", text)
    return text


def _csv_bytes(table: pa.Table, columns: list[str] | None = None) -> memoryview:
    """The CSV lines (no header) of `columns` (default RESULT_COLUMNS) of a results table,
    as pandas' `to_csv` writes them (a missing value as an empty field)."""
    fields = []
    for name in columns or RESULT_COLUMNS:
        col = table.column(name).combine_chunks()
        if pa.types.is_floating(col.type):
            fields.append(_csv_floats(col.to_numpy(zero_copy_only=False)))
        elif pa.types.is_boolean(col.type):
            fields.append(pc.if_else(col, "True", "False"))
        elif pa.types.is_integer(col.type):
            fields.append(pc.fill_null(pc.cast(col, pa.string()), ""))
        else:  # a null would make the whole line null: empty, as for the other types
            fields.append(_csv_strings(pc.fill_null(col, "")))
    fields = [f.cast(pa.large_string()) for f in fields]
    comma, empty, newline = (pa.scalar(t, pa.large_string()) for t in (",", "", "\n"))
    lines = pc.binary_join_element_wise(pc.binary_join_element_wise(*fields, comma), empty,
                                        newline)
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int64)
    start, end = offsets[lines.offset], offsets[lines.offset + len(lines)]
    return memoryview(lines.buffers()[2])[start:end]


# --- spilling -----------------------------------------------------------------------------

class _Spill:
    """Arrow tables routed to numbered parts and read back per part in the order added: kept
    in memory for a single part, written to Arrow IPC files under `folder` otherwise."""

    def __init__(self, parts: int, folder: Path) -> None:
        self.parts, self.folder = parts, folder
        self._memory: list[pa.Table] = []
        self._writers: dict[int, Any] = {}

    def add(self, part: int, table: pa.Table) -> None:
        if self.parts == 1:
            self._memory.append(table)
            return
        if part not in self._writers:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._writers[part] = pa.ipc.new_stream(str(self.folder / f"{part}.arrow"),
                                                    table.schema)
        self._writers[part].write_table(table)

    def route(self, table: pa.Table, part_of: np.ndarray) -> None:
        """Add each row of `table` to part `part_of[row]`."""
        if self.parts == 1:
            self.add(0, table)
            return
        order = None if np.all(part_of[:-1] <= part_of[1:]) else np.argsort(part_of,
                                                                             kind="stable")
        if order is not None:
            table, part_of = table.take(pa.array(order)), part_of[order]
        bounds = np.searchsorted(part_of, np.arange(self.parts + 1))
        for part in np.flatnonzero(np.diff(bounds)):
            self.add(int(part), table.slice(bounds[part], bounds[part + 1] - bounds[part]))

    def read(self, part: int, keep: bool = False) -> Iterator[pa.Table]:
        """The tables of one part, in the order added; its file is removed after reading
        unless `keep`."""
        if self.parts == 1:
            yield from self._memory
            if not keep:
                self._memory = []
            return
        writer = self._writers.pop(part, None)
        if writer is not None:
            writer.close()
        path = self.folder / f"{part}.arrow"
        if not path.exists():
            return
        with pa.OSFile(str(path)) as f:
            for batch in pa.ipc.open_stream(f):
                yield pa.Table.from_batches([batch])
        if not keep:
            path.unlink()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


# --- the merge ----------------------------------------------------------------------------

def _read_manifest(run: str) -> tuple[pq.ParquetFile, list[str]]:
    """The run's manifest (read lazily, by columns) and class names."""
    uri = storage.join(run, "manifest.parquet")
    if not storage.exists(uri):
        raise DatasetError(f"no manifest at {uri}; run the index step first")
    classes = json.loads(storage.read_text(storage.join(run, "classes.json")))
    return pq.ParquetFile(storage.local_path(uri)), classes


def _hash_batches(manifest: pq.ParquetFile) -> Iterator[pa.RecordBatch]:
    return manifest.iter_batches(batch_size=1 << 18, columns=FINGERPRINT_COLUMNS)


def bucket_size(n_images: int, num_classes: int, memory_gb: float,
                key_bytes: int = 0) -> int:
    """Images per bucket for a merge within `memory_gb` (`key_bytes`: the manifest's file
    names and labels, held throughout): at least one, at most `MAX_BUCKETS` buckets."""
    room = memory_gb * (1 << 30) - BASE_BYTES - n_images * IMAGE_BYTES - key_bytes
    per_image = num_classes * BUCKET_CELL_BYTES + BUCKET_IMAGE_BYTES
    if num_classes > FULL_PROBS_MAX_CLASSES:
        per_image += TOPK_IMAGE_BYTES
    size = max(1, int(room // per_image), math.ceil(n_images / MAX_BUCKETS))
    return min(size, max(1, n_images))


class _ResultsWriter:
    """results.csv (`columns`) and predictions.parquet (every column of the tables) under
    `folder`, written chunk by chunk in order."""

    def __init__(self, folder: Path, columns: list[str]) -> None:
        self.csv_path = folder / "results.csv"
        self.parquet_path = folder / "predictions.parquet"
        self.columns = columns
        self._csv = self.csv_path.open("wb")
        self._csv.write((",".join(columns) + "\n").encode())
        self._parquet: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(str(self.parquet_path), table.schema,
                                             use_dictionary=["label", "corrected_label"])
        for start in range(0, table.num_rows, WRITE_ROWS):
            part = table.slice(start, WRITE_ROWS)
            self._csv.write(_csv_bytes(part, self.columns))
            self._parquet.write_table(part)

    def close(self) -> None:
        self._csv.close()
        if self._parquet is not None:
            self._parquet.close()


class _Merge:
    """The state of one merge: the manifest's columns, the bucket layout and what is kept
    per image between the passes."""

    def __init__(self, run: str) -> None:
        self.run = run
        self.cfg = runs.read_config(run)
        manifest, self.classes = _read_manifest(run)
        self.base = fingerprint_base(self.cfg, _hash_batches(manifest))  # once per merge
        table = manifest.read(columns=["id", "key", "label", "label_idx"])
        self.n, self.k = table.num_rows, len(self.classes)
        if not np.array_equal(table.column("id").to_numpy(), np.arange(self.n)):
            raise DatasetError(f"{run}: manifest ids are not 0..{self.n - 1} in order; "
                               "re-run the index step")
        self.keys = table.column("key").combine_chunks()
        self.label_names = table.column("label").combine_chunks()
        self.labels = table.column("label_idx").to_numpy().astype(np.int64)
        del table
        self.class_names = pa.array(self.classes, pa.string())
        self.size = bucket_size(self.n, self.k, self.cfg.merge_memory_gb,
                                self.keys.nbytes + self.label_names.nbytes)
        starts = list(range(0, self.n, self.size))
        self.buckets = list(zip(starts, [*starts[1:], self.n], strict=True))
        self.dense_out = self.k <= FULL_PROBS_MAX_CLASSES
        self.num_preds = np.zeros(self.n, dtype=np.int64)
        self.found, self.missing = 0, []
        self._workspace: _Pool | None = None
        self.in_memory_pool: _Pool | None = None
        # Per image, set bucket by bucket: what the flags and the sort order need.
        self.quality = np.full(self.n, np.nan)
        self.disagree = np.zeros(self.n, dtype=bool)
        self.corrected = np.zeros(self.n, dtype=np.int32)
        self.pct = np.full(self.n, np.nan, dtype=np.float32)
        self.suggested_quality = np.full(self.n, np.nan, dtype=np.float32)
        self.tier = np.full(self.n, 2, dtype=np.int8)  # set after pass 2 (`tasks.decide`)
        self.p_wrong = np.full(self.n, np.nan)  # ... as are the posterior's two columns
        self.p_suggestion = np.full(self.n, np.nan)
        self.others = np.zeros((self.n, min(decide.OTHERS, self.k)), dtype=np.float32)
        self.rest = np.zeros(self.n)  # ... and the rest's sum (`decide.other_classes`)
        # method embeddings: the neighbour columns by id, appended to the results' columns
        self.neighbours = None
        if self.cfg.method == "embeddings":
            self.neighbours = neighbour_table(
                run, self.cfg, manifest.read(columns=["key", "etag", "label"]).to_pandas())
        self.columns = RESULT_COLUMNS + (NEIGHBOUR_COLUMNS if self.neighbours is not None else [])

    @property
    def in_memory(self) -> bool:
        return len(self.buckets) == 1

    # pass 0 ---------------------------------------------------------------------------
    def read_shards(self, spill: _Spill) -> None:
        """Stream the shards once: count predictions per image and pool every row (in
        memory) or spill it to its bucket."""
        pool = self.in_memory_pool = _Pool(0, self.n, self.k) if self.in_memory else None
        for spec, table in read_shards(self.run, plan_repeats(self.cfg), self.base):
            if table is None:
                self.missing.append(spec.repeat)
                continue
            table = table.select([c for c in table.column_names if c != "repeat"])
            rows = shard_rows(table, self.k, self.n, runs.shard_uri(self.run, spec.repeat))
            self.num_preds += np.bincount(rows.ids, minlength=self.n)
            if pool is not None:
                pool.add(rows.ids, rows.pred, rows.probs, rows.topk_idx, rows.given,
                         rows.p_given)
            else:
                spill.route(table.replace_schema_metadata(None), rows.ids // self.size)
            self.found += 1

    def pool(self, spill: _Spill, b: int) -> _Pool:
        """The workspace of bucket `b`: in memory the one pooled while reading (it serves
        every pass), else rebuilt from the bucket's spilled shard rows."""
        if self.in_memory_pool is not None:
            return self.in_memory_pool
        lo, hi = self.buckets[b]
        if self._workspace is None:
            self._workspace = _Pool(0, self.size, self.k)
        pool = _Pool(lo, hi, self.k, reuse=self._workspace)
        for table in spill.read(b, keep=True):
            rows = shard_rows(table, self.k, self.n, f"spill of bucket {b}")
            pool.add(rows.ids, rows.pred, rows.probs, rows.topk_idx, rows.given, rows.p_given)
        return pool

    def _chunks(self, pool: _Pool) -> Iterator[tuple[int, int, np.ndarray]]:
        """(a, b, means) for row chunks a..b of a workspace, whose probability sums are turned
        into means in place on the first pass: `prob_sum / num_preds`, NaN where there is
        no prediction (seen by the caller first), then 0."""
        step = max(1, CHUNK_CELLS // self.k)
        npred = self.num_preds[pool.lo:pool.hi]
        for a in range(0, pool.hi - pool.lo, step):
            b = min(a + step, pool.hi - pool.lo)
            means = pool.prob_sum[a:b]
            if not pool.means:
                with np.errstate(invalid="ignore", divide="ignore"):
                    np.divide(means, npred[a:b, None], out=means)
            yield a, b, means
            if not pool.means:
                _zero_nan(means)
        pool.means = True

    # pass 1 ---------------------------------------------------------------------------
    def score_bucket(self, pool: _Pool, filt: _BatchedFilter,
                     keep: Path | None) -> tuple[pa.Table, np.ndarray]:
        """The result columns (all but `is_label_issue`) of one bucket's images and the
        self-confidences of its predicted images (for cleanlab's filter); sets the bucket's
        parts of the per-image flags. `keep`: a file for the probabilities cleanlab's filter
        reads in pass 2."""
        lo, hi = pool.lo, pool.hi
        lab, npred = self.labels[lo:hi], self.num_preds[lo:hi]
        predicted = npred > 0
        s = {key: np.empty(hi - lo) for key in ("pct", "quality", "suggested_quality")}
        s["corrected"] = np.empty(hi - lo, dtype=np.int64)
        if self.dense_out:
            out = np.empty((hi - lo, self.k), dtype=np.float32)
        else:
            out_idx = np.empty((hi - lo, TOP_K), dtype=np.int32)
            out = np.empty((hi - lo, TOP_K), dtype=np.float32)
        self_conf = np.empty(int(predicted.sum()))
        done = 0
        for a, b, means in self._chunks(pool):
            if self.dense_out:
                out[a:b] = means  # NaN rows where there is no prediction
            if not self.dense_out:
                out_idx[a:b], out[a:b] = _top_classes(means, npred[a:b] > 0)
            for key, value in _vote_scores(lab[a:b], pool.votes[a:b], means,
                                           npred[a:b]).items():
                s[key][a:b] = value
            self.others[lo + a:lo + b], self.rest[lo + a:lo + b] = decide.other_classes(
                means, lab[a:b], s["corrected"][a:b])
            p = predicted[a:b]
            sub = filt.scaled(_scaled(means[p]))
            self_conf[done:done + len(sub)] = filt.self_confidence(lab[a:b][p], sub)
            done += len(sub)
            if keep is not None:
                with keep.open("ab") as f:
                    f.write(sub.tobytes())
        self.disagree[lo:hi] = _disagrees(s, lab, self.cfg.max_label_quality)
        quality = np.round(s["quality"], 5)
        self.quality[lo:hi] = quality
        self.corrected[lo:hi] = s["corrected"]
        self.pct[lo:hi] = np.round(s["pct"], 2)
        self.suggested_quality[lo:hi] = np.round(s["suggested_quality"], 5)
        columns = {
            "filename": self.keys.slice(lo, hi - lo),
            "label": self.label_names.slice(lo, hi - lo),
            "corrected_label": self.class_names.take(pa.array(s["corrected"])),
            "num_preds": pa.array(npred),
            "%": pa.array(np.round(s["pct"], 2)),
            "label_quality": pa.array(quality),
            "suggested_quality": pa.array(np.round(s["suggested_quality"], 5)),
            "votes": _votes_text(pool.votes, self.class_names),
            "id": pa.array(np.arange(lo, hi)),
        }
        if self.dense_out:
            columns["mean_probs"] = _list_array(out)
        else:
            columns["topk_idx"], columns["topk_prob"] = _list_array(out_idx), _list_array(out)
        return pa.table(columns), self_conf

    # pass 2 (bucketed) ----------------------------------------------------------------
    def count_bucket(self, spill: _Spill, b: int, filt: _BatchedFilter,
                     kept: Path | None) -> None:
        """Add bucket `b`'s images to cleanlab's confident joint, from the probabilities
        pass 1 kept, or from the workspace."""
        lo, hi = self.buckets[b]
        lab, npred = self.labels[lo:hi], self.num_preds[lo:hi]
        if kept is None:
            pool = self.pool(spill, b)
            for a, z, means in self._chunks(pool):
                p = npred[a:z] > 0
                filt.count(lab[a:z][p], filt.scaled(_scaled(means[p])))
            return
        lab = lab[npred > 0]
        width = len(filt.present)
        step = max(1, CHUNK_CELLS // width)
        with kept.open("rb") as f:
            for a in range(0, len(lab), step):
                rows = lab[a:a + step]
                filt.count(rows, np.fromfile(f, count=len(rows) * width).reshape(len(rows),
                                                                                 width))
        kept.unlink()

    def order(self, flags: np.ndarray) -> np.ndarray:
        """Row order of the results: `sort_most_suspicious` on the per-image keys (the tier,
        then label quality, then file name)."""
        keys = self.keys
        if len(keys) > 1 and not pc.all(pc.less(keys.slice(0, len(keys) - 1),
                                               keys.slice(1))).as_py():
            rank = np.empty(self.n, dtype=np.int64)
            rank[pc.sort_indices(keys).to_numpy()] = np.arange(self.n)
        else:
            rank = np.arange(self.n)  # the index writes the manifest sorted by key
        return np.lexsort((rank, np.where(np.isnan(self.quality), 2.0, self.quality),
                           self.tier))


def _zero_nan(means: np.ndarray) -> None:
    """NaN (no prediction) to 0, in place: `np.nan_to_num` for probabilities."""
    np.copyto(means, 0.0, where=np.isnan(means))


def _top_classes(means: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row the `TOP_K` classes of highest mean probability, highest first (NaN
    probabilities where there is no prediction)."""
    part = np.argpartition(-means, TOP_K - 1, axis=1)[:, :TOP_K]
    order = np.argsort(-np.take_along_axis(means, part, 1), axis=1, kind="stable")
    idx = np.take_along_axis(part, order, 1)
    probs = np.take_along_axis(means, idx, 1).astype(np.float32)
    probs[~predicted] = np.nan
    return idx, probs


def _list_array(matrix: np.ndarray) -> pa.Array:
    """A rows x width matrix as an Arrow list column."""
    offsets = np.arange(0, matrix.size + 1, max(1, matrix.shape[1]), dtype=np.int64)
    if matrix.shape[1] == 0:
        offsets = np.zeros(len(matrix) + 1, dtype=np.int64)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                    pa.array(matrix.reshape(-1)))


def _disagrees(s: dict[str, np.ndarray], labels: np.ndarray,
               max_label_quality: float) -> np.ndarray:
    """Row by row: the vote names another class and the label quality is below
    `max_label_quality`; an image is flagged when this holds and `p_label_wrong > 1/2`."""
    return ((s["corrected"] != labels)
            & (np.nan_to_num(s["quality"], nan=1.0) < max_label_quality))


def merge_run(run: str) -> str:
    """Merge the shards of a run into predictions.parquet and results.csv; returns the
    results URI. Raises MissingShardsError when coverage is below `min_coverage`."""
    m = _Merge(run)
    cfg = m.cfg
    planned = planned_test(cfg, m.labels)
    specs = plan_repeats(cfg)
    log.info("merge: %d images x %d classes in %d bucket(s) of up to %d images "
             "(merge_memory_gb %g)", m.n, m.k, len(m.buckets), m.size, cfg.merge_memory_gb)
    with tempfile.TemporaryDirectory(prefix="acl-merge-") as tmp:
        shards = _Spill(len(m.buckets), Path(tmp, "shards"))
        m.read_shards(shards)
        missing = m.missing
        covered = (m.num_preds > 0) & planned
        coverage = covered.sum() / max(1, planned.sum())
        if missing:
            log.warning("missing shards for repeats %s (%d of %d)", missing, len(missing),
                        len(specs))
        if coverage < cfg.min_coverage or not m.found:
            shards.close()
            redo = (f"Re-run those repeats (python -m tasks.train --run {run} --repeat N)"
                    if cfg.method == "train" else
                    f"Re-run the probes (python -m tasks.probe --run {run}; they name any "
                    "embedding chunk to redo with python -m tasks.embed)")
            raise MissingShardsError(
                f"only {coverage:.1%} of images have a prediction (min_coverage "
                f"{cfg.min_coverage:.0%}); missing repeats: {missing}. {redo} and merge "
                "again", missing)
        if why := too_few_predictions(m.num_preds, cfg):
            log.warning("%s", why)
        predicted = m.num_preds > 0
        results = _Spill(len(m.buckets), Path(tmp, "results"))
        filt = _BatchedFilter(np.unique(m.labels[predicted]), m.k)
        # Bucketed, pass 2 reads what pass 1 kept of each bucket, unless rebuilding the
        # bucket reads less (top-k shards against the dense probabilities of many classes).
        kept = [None if m.in_memory or m.k > FULL_PROBS_MAX_CLASSES else Path(tmp, f"{b}.f64")
                for b in range(len(m.buckets))]
        self_conf = []
        for b in range(len(m.buckets)):
            table, conf = m.score_bucket(m.pool(shards, b), filt, kept[b])
            results.add(b, table)
            self_conf.append(conf)
        conf_all = np.concatenate(self_conf)
        if all(k is not None for k in kept):
            m._workspace = None  # pass 2 reads the kept probabilities only
        label_counts = np.bincount(m.labels[predicted], minlength=m.k)
        confident_joint = np.diag(label_counts)
        if len(filt.present) >= 2:
            filt.set_thresholds(m.labels[predicted], conf_all)
            for b in range(len(m.buckets)):
                m.count_bucket(shards, b, filt, kept[b])
            confident_joint = filt.full_joint()
        del conf_all, self_conf
        m.in_memory_pool = m._workspace = None
        pa.default_memory_pool().release_unused()  # Arrow keeps freed memory otherwise
        shards.close()
        joint = decide.noise_joint(confident_joint, label_counts)
        noise, _ = decide.noise_rates(joint)
        for a in range(0, m.n, POSTERIOR_CHUNK):  # elementwise: bounded temporaries
            b = min(a + POSTERIOR_CHUNK, m.n)
            m.p_wrong[a:b], m.p_suggestion[a:b] = decide.posterior(
                m.quality[a:b], m.suggested_quality[a:b], m.corrected[a:b] != m.labels[a:b],
                noise, m.k, int(predicted.sum()), m.others[a:b], m.rest[a:b])
        m.others = m.rest = None
        m.p_wrong, m.p_suggestion = np.round(m.p_wrong, 5), np.round(m.p_suggestion, 5)
        flags = (np.nan_to_num(m.p_wrong) > 0.5) & m.disagree
        voted = None
        if m.neighbours is not None:  # method embeddings: not where the neighbours back it
            flags &= ~decide.backed_by_neighbours(
                m.neighbours.column("knn_agreement").to_numpy(zero_copy_only=False))
            voted = decide.neighbours_vote_for(
                m.neighbours.column("knn_label").to_numpy(zero_copy_only=False),
                np.asarray(m.classes, dtype=object)[m.corrected])
        m.tier = decide.tiers(flags, m.quality, noise * predicted.sum())
        summary = decide.summary(cfg, m.classes, labels=m.labels, num_preds=m.num_preds,
                                 corrected=m.corrected, p_label_wrong=m.p_wrong,
                                 p_suggestion=m.p_suggestion, tier=m.tier, joint=joint,
                                 voted=voted)
        writer = _ResultsWriter(Path(tmp), m.columns)
        _write_sorted(m, results, flags, Path(tmp, "sorted"), writer)
        writer.close()
        out = runs.results_uri(run)
        storage.write_text(summary_uri(run), json.dumps(summary, indent=2) + "\n")
        storage.write_file(storage.join(run, "predictions.parquet"), writer.parquet_path)
        storage.write_file(out, writer.csv_path)
        if cfg.results_path:  # a copy, and beside it the run it came from (relabel reads it)
            storage.write_file(cfg.results_path, writer.csv_path)
            storage.write_text(run_sidecar_uri(cfg.results_path),
                               json.dumps({"run": run}) + "\n")
    log.info("merged %d shards (%d missing): %d images, %d with a prediction (%.1f%% of all "
             "images, %.1f%% of the %d the plan holds out), %d flagged as label issues; "
             "wrote %s", m.found, len(missing), m.n, int(covered.sum()),
             100 * covered.sum() / max(1, m.n), 100 * coverage, int(planned.sum()),
             int(flags.sum()), out)
    for line in decide.summary_lines(summary):
        if line.startswith("WARNING: "):  # the log's level says it
            log.warning("%s", line.removeprefix("WARNING: "))
        else:
            log.info("%s", line)
    return out


def _write_sorted(m: _Merge, results: _Spill, flags: np.ndarray, folder: Path,
                  writer: _ResultsWriter) -> None:
    """Write the result rows most suspicious first: from memory, or (bucketed) by routing
    each bucket's rows to parts of the output order and sorting each part."""
    order = m.order(flags)

    tier_names = pa.array(decide.TIERS, pa.string())

    def with_flags(table: pa.Table) -> pa.Table:
        ids = table.column("id").to_numpy()
        table = table.add_column(RESULT_COLUMNS.index("is_label_issue"), "is_label_issue",
                                 pa.array(flags[ids]))
        table = table.append_column("tier", tier_names.take(pa.array(m.tier[ids])))
        table = table.append_column("p_label_wrong", pa.array(m.p_wrong[ids]))
        table = table.append_column("p_suggestion", pa.array(m.p_suggestion[ids]))
        if m.neighbours is not None:
            rows = m.neighbours.take(pa.array(ids))
            for name in NEIGHBOUR_COLUMNS:
                table = table.append_column(name, rows.column(name))
        return table

    if m.in_memory:
        table = with_flags(pa.concat_tables(list(results.read(0))))
        for start in range(0, m.n, WRITE_ROWS):
            writer.write(table.take(pa.array(order[start:start + WRITE_ROWS])))
        return
    position = np.empty(m.n, dtype=np.int64)
    position[order] = np.arange(m.n)
    parts = _Spill(len(m.buckets), folder)
    for b in range(len(m.buckets)):
        for table in results.read(b):
            for start in range(0, table.num_rows, WRITE_ROWS):
                chunk = with_flags(table.slice(start, WRITE_ROWS))
                pos = position[chunk.column("id").to_numpy()]
                parts.route(chunk.append_column("_pos", pa.array(pos)), pos // m.size)
    for part in range(len(m.buckets)):
        table = pa.concat_tables(list(parts.read(part))).combine_chunks()
        rows = np.argsort(table.column("_pos").to_numpy())
        table = table.drop_columns(["_pos"])
        for start in range(0, len(rows), WRITE_ROWS):
            writer.write(table.take(pa.array(rows[start:start + WRITE_ROWS])))
        del table
        pa.default_memory_pool().release_unused()


def summary_uri(run: str) -> str:
    """Where the merge writes the run summary (`tasks.decide.summary`)."""
    return storage.join(run, "summary.json")


def read_summary(run: str) -> dict | None:
    """The run summary, or None for a run merged before summaries existed."""
    uri = summary_uri(run)
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_text(uri))


def sort_most_suspicious(results: pd.DataFrame) -> pd.DataFrame:
    """By tier (issue, review, ok; results without tiers: flagged first), then by label
    quality (lowest first), then file name; unpredicted images last within their tier."""
    key = results["label_quality"].fillna(2.0)
    rank = (results["tier"].map({t: i for i, t in enumerate(decide.TIERS)})
            if "tier" in results.columns else ~results["is_label_issue"])
    return (results.assign(_flag=rank, _q=key)
            .sort_values(["_flag", "_q", "filename"], kind="stable")
            .drop(columns=["_flag", "_q"]).reset_index(drop=True))


class ResultsError(UserError, ValueError):
    """A results CSV that cannot be read; the message names the file, and the row and column
    of a bad value."""


# Column -> how it is parsed: "bool" (true/false, 1/0, yes/no, any case), "int" (a count),
# "tier" (one of tasks.decide.TIERS, or empty),
# or the (low, high) range of a number (empty is missing).
_TYPED_COLUMNS: dict[str, str | tuple[float, float]] = {
    "is_label_issue": "bool", "num_preds": "int", "%": (0, 100), "label_quality": (0, 1),
    "suggested_quality": (0, 1), "tier": "tier", "p_label_wrong": (0, 1), "p_suggestion": (0, 1),
    # method embeddings (tasks.embeddings.NEIGHBOUR_COLUMNS); outlier_score is a cosine distance
    "knn_agreement": (0, 1), "outlier_score": (0, 2), "duplicate_group": "group",
    "duplicate_conflict": "bool"}
_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def _parse_column(frame: pd.DataFrame, column: str, kind: str | tuple[float, float],
                  uri: str) -> pd.Series:
    """One typed column, strictly: the first bad value is an error naming its line (the header
    is line 1) and filename."""
    text = frame[column].astype(str).str.strip()
    if kind == "tier":  # empty: not known (a hand-made CSV); is_label_issue decides
        value = text.str.lower()
        bad = ~value.isin(decide.TIERS) & (value != "")
        expected = " or ".join(decide.TIERS) + " (or empty)"
    elif kind == "bool":
        lower = text.str.lower()
        bad = ~lower.isin(_TRUE | _FALSE)
        value = lower.isin(_TRUE)
        expected = "true or false (or 1/0, yes/no)"
    else:
        number = pd.to_numeric(text.where(text != "", None), errors="coerce")
        if kind in ("int", "group"):  # group: empty for an image in no group
            missing = text == "" if kind == "group" else pd.Series(False, index=text.index)
            bad = ~missing & (number.isna() | ~np.isfinite(number) | (number < 0)
                              | (number % 1 != 0))
            if kind == "int":
                value = number.where(~bad, 0).astype(np.int64)
                expected = "a whole number of at least 0"
            else:
                value = number.where(~bad & ~missing).astype("Int64")
                expected = "a whole number of at least 0 (or empty)"
        else:
            low, high = kind
            bad = ((number.isna() & ~text.str.lower().isin(["", "nan"]))
                   | (number < low) | (number > high))
            value = number.astype(np.float64)
            expected = f"a number from {low} to {high} (or empty)"
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        name = frame["filename"].iloc[pos] if "filename" in frame.columns else ""
        raise ResultsError(f"{uri} line {pos + 2} ({name or 'no filename'}): {column} "
                           f"{frame[column].iloc[pos]!r} is not {expected}; fix that cell")
    return value


def read_results(uri: str) -> pd.DataFrame:
    """A results CSV as written by `merge_run` (or edited by hand): the columns of
    `_TYPED_COLUMNS` that it has are parsed strictly, and a value that is not of its column's
    kind is a ResultsError naming its line."""
    if not storage.exists(uri):
        raise MissingFileError(f"results CSV {uri} does not exist")
    try:
        frame = pd.read_csv(io.BytesIO(storage.read_bytes(uri)), keep_default_na=False,
                            dtype=str, encoding="utf-8")
    except (ValueError, pd.errors.ParserError) as err:  # UnicodeDecodeError is a ValueError
        raise ResultsError(f"{uri} is not a results CSV ({type(err).__name__}); pass the "
                           "results.csv of an audit") from None
    if "filename" not in frame.columns:
        raise ResultsError(f"{uri} is not a results CSV (no filename column); pass the "
                           "results.csv of an audit")
    for column, kind in _TYPED_COLUMNS.items():
        if column in frame.columns:
            frame[column] = _parse_column(frame, column, kind, uri)
    if "id" in frame.columns:
        frame["id"] = _parse_column(frame, "id", "int", uri)
    frame.attrs["source"] = uri  # how later checks name this file
    return frame


def run_sidecar_uri(results_copy: str) -> str:
    """Where a results copy (`results_path`) records the run it came from."""
    return f"{results_copy}.run.json"


def read_run_sidecar(results_copy: str) -> str | None:
    """The run URI recorded beside a results copy, or None when there is no record."""
    uri = run_sidecar_uri(results_copy)
    if not storage.exists(uri):
        return None
    try:
        run = json.loads(storage.read_text(uri))["run"]
    except (ValueError, TypeError, KeyError):
        run = None
    if not isinstance(run, str) or not run:
        raise ResultsError(f"{uri} does not name a run (expected {{\"run\": \"<folder>\"}}); "
                           "delete it and pass the results.csv inside the run folder")
    return run

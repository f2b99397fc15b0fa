"""Index a class-folder dataset: one manifest row per usable image, a list of skipped files.

Layout: `<root>/<class>/<image>` (deeper folders below a class are kept, the class is the
first folder). Hidden files and folders are ignored; files that are not images, are empty,
do not decode, or have unsafe keys are skipped and listed with the reason, never fatal, as
is whatever the listing could not use (names that are not UTF-8, symbolic links that leave
the root or point nowhere, unreadable folders: see `tasks.storage`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing
import os
import re
import tempfile
import threading
import time
import unicodedata
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from tasks import images, storage
from tasks.config import AuditConfig
from tasks.errors import UserError
from tasks.storage import unsafe_key_reason

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
MANIFEST_COLUMNS = ["id", "key", "label", "label_idx", "size", "etag"]
WORKERS_ENV = "ACL_INDEX_WORKERS"  # processes that check images (default: one per core)
CHECK_ROWS = 2048  # listing entries a worker checks per task
MANIFEST_ROW_GROUP = 1 << 17
PROGRESS_SECONDS = 5.0
LISTING_SCHEMA = pa.schema([("key", pa.large_string()), ("size", pa.int64()),
                            ("etag", pa.large_string()), ("problem", pa.large_string())])


class DatasetError(UserError, ValueError):
    """The dataset cannot be audited as it is; the message says why and what to do."""


def _manifest_schema() -> pa.Schema:
    """The manifest's Arrow schema, pandas metadata included, as a DataFrame with the
    manifest's dtypes converts to."""
    empty = pd.DataFrame({"id": pd.Series(dtype="int64"), "key": pd.Series(dtype="str"),
                          "label": pd.Series(dtype="str"),
                          "label_idx": pd.Series(dtype="int32"),
                          "size": pd.Series(dtype="int64"), "etag": pd.Series(dtype="str")})
    return pa.Schema.from_pandas(empty, preserve_index=False)


class DatasetIndex:
    """The result of indexing: usable images (`table`, Arrow; `manifest`, the same as a
    DataFrame), class names (sorted), skipped files."""

    def __init__(self, manifest: pd.DataFrame | pa.Table, classes: list[str],
                 skipped: pd.DataFrame) -> None:
        self.table = (manifest if isinstance(manifest, pa.Table)
                      else pa.Table.from_pandas(manifest, preserve_index=False))
        self.classes = classes
        self.skipped = skipped

    @property
    def manifest(self) -> pd.DataFrame:
        """The manifest as a DataFrame (converted on each access)."""
        return self.table.to_pandas()


class Listing:
    """Every entry under a dataset root, sorted by key, held as Arrow columns (key, size,
    etag, problem: see `storage.ObjectInfo`) rather than one Python object per file.
    Iterating yields `ObjectInfo`s, a batch at a time."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table

    @classmethod
    def from_pages(cls, pages: Iterable[list[storage.ObjectInfo]]) -> Listing:
        """A listing of pages of entries in any order (sorted here, by key as UTF-8 bytes,
        as a bucket lists them)."""
        batches = [_listing_batch(page) for page in pages]
        table = pa.Table.from_batches(batches, LISTING_SCHEMA)
        return cls(table.sort_by("key") if table.num_rows else table)

    def __len__(self) -> int:
        return self.table.num_rows

    def __iter__(self) -> Iterator[storage.ObjectInfo]:
        for batch in self.table.to_batches(max_chunksize=CHECK_ROWS):
            for row in zip(*(c.to_pylist() for c in batch.columns), strict=True):
                yield storage.ObjectInfo(*row)

    def __getitem__(self, i: int) -> storage.ObjectInfo:
        return storage.ObjectInfo(*(self.table.column(c)[i].as_py()
                                    for c in LISTING_SCHEMA.names))


def _listing_batch(page: list[storage.ObjectInfo]) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [pa.array([i.key for i in page], pa.large_string()),
         pa.array([i.size for i in page], pa.int64()),
         pa.array([i.etag for i in page], pa.large_string()),
         pa.array([i.problem for i in page], pa.large_string())], schema=LISTING_SCHEMA)


def as_listing(listing: Listing | Iterable[storage.ObjectInfo]) -> Listing:
    """`listing` as a `Listing` (a list of ObjectInfo is sorted by key)."""
    return listing if isinstance(listing, Listing) else Listing.from_pages([list(listing)])


class _Progress:
    """A log line every PROGRESS_SECONDS: count done (of total), rate and time left."""

    def __init__(self, verb: str, total: int | None = None) -> None:
        self.verb, self.total, self.done = verb, total, 0
        self.t0 = self.last = time.perf_counter()

    def add(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last < PROGRESS_SECONDS:
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        if self.total is None:
            log.info("%s %s files (%s files/s)", self.verb, f"{self.done:,}", f"{rate:,.0f}")
            return
        left = (self.total - self.done) / max(rate, 1e-9)
        log.info("%s %s/%s files (%s files/s, ETA %dm%02ds)", self.verb, f"{self.done:,}",
                 f"{self.total:,}", f"{rate:,.0f}", left // 60, left % 60)


def _classify(info: storage.ObjectInfo) -> tuple[str | None, str | None]:
    """(label, None) for a candidate image, (None, reason) to skip it, (None, None) to ignore."""
    parts = info.key.split("/")
    if info.problem:  # found by the listing but unusable: a dangling link, a non-UTF-8 name
        return None, None if any(p.startswith(".") for p in parts) else info.problem
    reason = unsafe_key_reason(info.key)  # first: an unsafe key is reported even if hidden
    if reason:
        return None, f"unsafe key: {reason}"
    if any(p.startswith(".") for p in parts):
        return None, None  # hidden files and folders (.DS_Store, .ipynb_checkpoints)
    if len(parts) < 2:
        return None, "not inside a class folder"
    ext = "." + parts[-1].rsplit(".", 1)[-1].lower() if "." in parts[-1] else ""
    if ext not in IMAGE_EXTENSIONS:
        return None, f"not an image file (extension {ext or 'none'!r})"
    if info.size == 0:
        return None, "empty file (0 bytes)"
    return parts[0], None


_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def decode_problem(data: bytes) -> str | None:
    """Why these bytes are not a usable image, or None when they decode."""
    try:
        img = images.open_rgb(data)  # decoded as the trainer decodes it
        if img.width < 1 or img.height < 1:
            return "image has no pixels"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        text = _OBJECT_REPR.sub("", str(err)).strip()  # PIL names its buffer's address
        return f"does not decode as an image ({type(err).__name__}: {text[:80]})"
    except Image.DecompressionBombError as err:
        return f"image too large ({err})"
    return None


def _check_file(path: str) -> tuple[str | None, str]:
    """(problem or None, content md5) for one local file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:  # no permission, or removed since the listing
        return f"cannot be read ({type(err).__name__}: {err.strerror or err})", ""
    return decode_problem(data), hashlib.md5(data, usedforsecurity=False).hexdigest()


def list_dataset(data_path: str) -> Listing:
    """Every entry under the dataset root (cheap: no content is read), page by page into
    Arrow columns. An s3:// root with no objects under it is an error (StorageError), like
    a missing local folder."""
    if not storage.is_s3(data_path) and not Path(data_path).is_dir():
        raise DatasetError(f"data_path {data_path!r} is not a folder")
    progress = _Progress("listed")

    def pages() -> Iterator[list[storage.ObjectInfo]]:
        for page in storage.list_pages(data_path):
            yield page
            progress.add(len(page))

    return Listing.from_pages(pages())


def listing_fingerprint(listing: Listing | Iterable[storage.ObjectInfo]) -> str:
    """A short hash of keys, sizes and change markers: changes when the dataset changes."""
    h = hashlib.sha256()
    for batch in as_listing(listing).table.to_batches(max_chunksize=1 << 16):
        sizes = pc.cast(batch.column("size"), pa.large_string())
        nul, newline = pa.scalar("\0", pa.large_string()), pa.scalar("\n", pa.large_string())
        entries = pc.binary_join_element_wise(batch.column("key"), sizes, batch.column("etag"),
                                              nul)
        empty = pa.scalar("", pa.large_string())
        lines = pc.binary_join_element_wise(entries, empty, newline)  # key\0size\0etag\n
        h.update(_joined(lines))
    return h.hexdigest()[:16]


def _joined(strings: pa.Array) -> bytes:
    """The values of a large_string array without nulls, concatenated."""
    if not len(strings):
        return b""
    offsets = np.frombuffer(strings.buffers()[1], dtype=np.int64)
    lo, hi = offsets[strings.offset], offsets[strings.offset + len(strings)]
    return strings.buffers()[2].to_pybytes()[lo:hi]


def _check_chunk(data_path: str, keys: list[str], sizes: list[int], etags: list[str],
                 problems: list[str]) -> tuple[list[int], list[str], list[tuple[str, str]],
                                               list[tuple[str, str]], int]:
    """Classify and check one chunk of listing entries (in a worker process): (positions
    of the usable images, their etags, entries skipped as listed, images skipped after
    reading them, how many were hidden)."""
    s3 = storage.is_s3(data_path)
    candidates: list[int] = []
    listed: list[tuple[str, str]] = []
    hidden = 0
    for i, row in enumerate(zip(keys, sizes, etags, problems, strict=True)):
        label, reason = _classify(storage.ObjectInfo(*row))
        if label is not None:
            candidates.append(i)
        elif reason is not None:
            listed.append((keys[i], reason))
        else:
            hidden += 1
    paths = storage.fetch_many([storage.join(data_path, keys[i]) for i in candidates],
                               [etags[i] for i in candidates])
    kept: list[int] = []
    kept_etags: list[str] = []
    failed: list[tuple[str, str]] = []
    for i, path in zip(candidates, paths, strict=True):
        problem, md5 = _check_file(path)
        if problem:
            failed.append((keys[i], problem))
        else:
            kept.append(i)
            kept_etags.append(etags[i] if s3 else md5)
    return kept, kept_etags, listed, failed, hidden


def _start_worker(s3_env: dict[str, str]) -> None:
    """A check worker reaches the object store with the settings `storage.configure_s3`
    gave this process (a spawned worker inherits the environment, not those)."""
    os.environ.update(s3_env)


def index_workers() -> int:
    """Processes that check images: `ACL_INDEX_WORKERS`, default one per core."""
    value = os.environ.get(WORKERS_ENV, "")
    if value and not (value.isdigit() and int(value) >= 1):
        raise DatasetError(f"{WORKERS_ENV}={value!r}: give a whole number of processes, >= 1")
    return int(value) if value else (os.cpu_count() or 1)


def _chunk_args(table: pa.Table, start: int, rows: int) -> list[list]:
    part = table.slice(start, rows)
    return [part.column(c).to_pylist() for c in LISTING_SCHEMA.names]


def _checked_chunks(data_path: str, table: pa.Table, workers: int,
                    rows: int) -> Iterator[tuple[int, tuple]]:
    """(start row, `_check_chunk` result) for each chunk of `rows` listing entries, in
    order; chunks go to `workers` processes, a few at a time, when there is more than one."""
    starts = range(0, table.num_rows, rows)
    if workers <= 1 or len(starts) <= 1:
        for start in starts:
            yield start, _check_chunk(data_path, *_chunk_args(table, start, rows))
        return
    # Forked where this process runs no other thread (fast, and a script without a
    # __main__ guard works); spawned where it does, since a fork copies locks other threads
    # may hold.
    method = "fork" if threading.active_count() == 1 else "spawn"
    pool = ProcessPoolExecutor(max_workers=min(workers, len(starts)),
                               mp_context=multiprocessing.get_context(method),
                               initializer=_start_worker, initargs=(storage.subprocess_env(),))
    try:
        todo = iter(starts)
        pending: deque[tuple[int, Future]] = deque()

        def submit() -> None:
            start = next(todo, None)
            if start is not None:
                pending.append((start, pool.submit(_check_chunk, data_path,
                                                   *_chunk_args(table, start, rows))))

        for _ in range(3 * workers):  # enough queued that no worker waits
            submit()
        while pending:
            start, future = pending.popleft()
            result = future.result()
            submit()
            yield start, result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def index_dataset(cfg: AuditConfig, listing: Listing | Iterable[storage.ObjectInfo] | None = None,
                  workers: int | None = None, chunk_rows: int = CHECK_ROWS) -> DatasetIndex:
    """Scan `cfg.data_path`, verify every candidate image decodes (in `workers` processes,
    default `index_workers()`), and check the dataset is big enough for the requested
    splits. Raises DatasetError with a one-line reason."""
    table = (list_dataset(cfg.data_path) if listing is None else as_listing(listing)).table
    workers = workers or index_workers()
    parts: list[pa.Table] = []
    listed: list[tuple[str, str]] = []
    failed: list[tuple[str, str]] = []
    hidden = 0
    progress = _Progress("checked", table.num_rows)
    for start, (kept, etags, listed_part, failed_part, hidden_part) in _checked_chunks(
            cfg.data_path, table, workers, chunk_rows):
        rows = table.slice(start, chunk_rows).select(["key", "size"]).take(
            pa.array(kept, pa.int64()))
        parts.append(rows.append_column("etag", pa.array(etags, pa.large_string())))
        listed += listed_part
        failed += failed_part
        hidden += hidden_part
        progress.add(min(chunk_rows, table.num_rows - start))
    kept_rows = (pa.concat_tables(parts) if parts else
                 pa.table({"key": pa.array([], pa.large_string()),
                           "size": pa.array([], pa.int64()),
                           "etag": pa.array([], pa.large_string())})).combine_chunks()
    keys = kept_rows.column("key")
    labels = pc.list_element(pc.split_pattern(keys, "/", max_splits=1), 0)
    classes = sorted(pc.unique(labels).to_pylist())
    _check_classes(cfg, classes, kept_rows.num_rows)
    label_idx = pc.cast(pc.index_in(labels, value_set=pa.array(classes, pa.large_string())),
                        pa.int32())
    manifest = pa.Table.from_arrays(
        [pa.array(np.arange(kept_rows.num_rows)), keys, labels, label_idx,
         kept_rows.column("size"), kept_rows.column("etag")], schema=_manifest_schema())
    if kept_rows.num_rows > 1 and not pc.all(pc.less(keys[:-1], keys[1:])).as_py():
        # Sorted already when the listing was; a listing given in another order is sorted
        # here, and the ids follow the sorted keys.
        manifest = manifest.take(pc.sort_indices(manifest, [("key", "ascending")]))
        manifest = manifest.set_column(0, manifest.schema.field("id"),
                                       pa.array(np.arange(manifest.num_rows)))
    skipped = listed + failed
    skipped_df = pd.DataFrame(skipped, columns=["filename", "reason"])

    for name, reason in skipped:
        log.warning("skipped %r: %s", name, reason)
    counts = dict(zip(*(c.to_pylist() for c in pc.value_counts(labels).flatten()),
                      strict=True))
    log.info("indexed %d images in %d classes (%s); skipped %d, ignored %d hidden",
             manifest.num_rows, len(classes), ", ".join(f"{c}: {counts[c]}" for c in classes),
             len(skipped), hidden)
    return DatasetIndex(manifest=manifest, classes=classes, skipped=skipped_df)


def _file_md5(path: str) -> str:
    """Content MD5 of a local file, or '' when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return hashlib.md5(f.read(), usedforsecurity=False).hexdigest()
    except OSError:
        return ""


def check_resumable(run_uri: str, data_path: str,
                    listing: Listing | Iterable[storage.ObjectInfo], workers: int = 8) -> None:
    """Before a run resumes, check that the dataset still holds every image of its manifest
    with the same size and content (S3: the listed ETag; local: the content MD5, so an edit
    that kept size and modification time is found too). Raises DatasetError naming the run,
    how many images differ and one of them; images added since are logged, not indexed."""
    manifest = pq.read_table(io.BytesIO(storage.read_bytes(
        storage.join(run_uri, "manifest.parquet"))), columns=["key", "size", "etag"])
    table = as_listing(listing).table
    usable = table.filter(pc.equal(table.column("problem"), ""))
    manifest = manifest.cast(pa.schema([("key", pa.large_string()), ("size", pa.int64()),
                                        ("etag", pa.large_string())])).combine_chunks()
    keys = manifest.column("key").chunk(0) if manifest.num_rows else pa.array([], pa.large_string())
    at = pc.index_in(keys, value_set=usable.column("key"))  # null where not listed
    differs = pc.not_equal(usable.column("size").take(at), manifest.column("size"))
    gone = keys.filter(pc.fill_null(differs, True)).to_pylist()
    changed: list[str] = []
    if not gone:
        if storage.is_s3(data_path):
            now = usable.column("etag").take(at)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                now = pa.array(pool.map(_file_md5, (storage.join(data_path, k.as_py())
                                                    for k in keys)), pa.large_string())
        changed = keys.filter(pc.not_equal(now, manifest.column("etag"))).to_pylist()
    run_id = storage.basename(run_uri)
    redo = ("its manifest and predictions are stale: start a new run (pass a new --run-id, "
            "or drop --run-id to use the one derived from the dataset as it is now)")
    if gone:
        raise DatasetError(f"run {run_id!r} cannot resume: {len(gone)} of its {len(keys)} "
                           f"images are gone from {data_path} or changed size since it was "
                           f"indexed (e.g. {gone[0]!r}); {redo}")
    if changed:
        raise DatasetError(f"run {run_id!r} cannot resume: {len(changed)} of its "
                           f"{len(keys)} images changed content since it was indexed "
                           f"(e.g. {changed[0]!r}); {redo}")
    skipped = pa.array(read_skipped_names(run_uri), pa.large_string())
    known = pc.or_(pc.is_in(table.column("key"), value_set=keys),
                   pc.is_in(table.column("key"), value_set=skipped))
    new = [info.key for info in Listing(table.filter(pc.invert(known)))
           if _classify(info)[0] is not None]
    if new:
        log.warning("%d images were added to %s since run %s was indexed and are not part of "
                    "it (e.g. %r); start a new run to audit them", len(new), data_path,
                    run_id, new[0])


def read_skipped_names(run_uri: str) -> list[str]:
    """The file names in a run's skipped.csv (none when it is absent)."""
    uri = storage.join(run_uri, "skipped.csv")
    if not storage.exists(uri):
        return []
    skipped = pd.read_csv(io.BytesIO(storage.read_bytes(uri)), dtype=str, keep_default_na=False)
    return skipped["filename"].tolist() if "filename" in skipped else []


def _check_classes(cfg: AuditConfig, classes: list[str], n: int) -> None:
    """Fail on datasets that cannot be audited: too few classes or images, clashing names."""
    if len(classes) < 2:
        found = f"found {len(classes)}" + (f" ({classes[0]!r})" if classes else "")
        raise DatasetError(
            f"{cfg.data_path}: need at least 2 class folders with usable images, {found}; "
            "expected <root>/<class>/<image>"
        )
    folded: dict[str, str] = {}
    for c in classes:
        norm = unicodedata.normalize("NFC", c).strip().casefold()
        if norm in folded:
            raise DatasetError(
                f"class folders {folded[norm]!r} and {c!r} differ only in case, spaces or "
                "unicode form; merge or rename them"
            )
        folded[norm] = c
        if c != c.strip():
            log.warning("class folder %r has leading or trailing spaces", c)
    n_test = n // cfg.folds if cfg.split_strategy == "rounds" else round(cfg.test_split * n)
    n_val = round(cfg.val_split * n)
    n_train = n - n_test - n_val
    if n_test < 1 or (cfg.val_split > 0 and n_val < 1) or n_train < len(classes):
        raise DatasetError(
            f"{n} usable images are too few for test_split {cfg.test_split} and val_split "
            f"{cfg.val_split} (would give {n_train} train / {n_val} val / {n_test} test); "
            "add images or lower the splits"
        )


def write_index(index: DatasetIndex, run_uri: str) -> None:
    """Write manifest.parquet (in row groups), classes.json and skipped.csv into the run
    folder."""
    import json

    with tempfile.TemporaryDirectory(prefix="acl-index-") as tmp:
        path = Path(tmp) / "manifest.parquet"
        with pq.ParquetWriter(path, index.table.schema) as writer:
            for batch in index.table.to_batches(max_chunksize=MANIFEST_ROW_GROUP):
                writer.write_batch(batch, row_group_size=MANIFEST_ROW_GROUP)
        storage.write_file(storage.join(run_uri, "manifest.parquet"), path)
    storage.write_text(storage.join(run_uri, "skipped.csv"), index.skipped.to_csv(index=False))
    storage.write_text(storage.join(run_uri, "classes.json"), json.dumps(index.classes))


def read_manifest(run_uri: str) -> tuple[pd.DataFrame, list[str]]:
    """The manifest and class names written by `write_index`."""
    import json

    uri = storage.join(run_uri, "manifest.parquet")
    if not storage.exists(uri):
        raise DatasetError(f"no manifest at {uri}; run the index step first")
    manifest = pd.read_parquet(io.BytesIO(storage.read_bytes(uri)))
    classes = json.loads(storage.read_text(storage.join(run_uri, "classes.json")))
    return manifest, classes

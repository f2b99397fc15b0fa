"""Relabel a dataset from an audit's results, safely, with a journal and an undo.

A row moves when it is flagged (`is_label_issue`), `corrected_label != label`,
`p_suggestion > sensitivity / 100` and `num_preds >= min_preds`: an image the audit does not
flag is never moved, however the votes fell. Or the plan comes from a reviewer's decisions
file (tasks/decisions.py): exactly the `accept` and `other` rows move, whatever the thresholds
say; the same safety checks apply. The journal (the whole plan, and where it came from) is
written before anything moves.
Each move is: copy (server-side on S3) to `<root>/<corrected_label>/<name>`, verify the
copy's size and checksum against the source, then delete the source (on S3 the sources of
verified copies are deleted DELETE_BATCH at a time, so a killed relabel can leave both
copies of a few files until the re-run or undo). An existing object
is never overwritten: a clash gets a deterministic suffix. Every step is idempotent and its
state is read back from the store, so re-running an interrupted relabel finishes it, and
`undo` reverses a journal the same way; a moved file that was deleted by hand since is
reported (where it was, where it came from) and recorded in the journal, and undo restores
everything else. The results are validated before planning (one row per file, suggestions
that are classes of the run), and the next relabel or undo removes the temporary files a
killed one left in the class folders.
At scale (hundreds of thousands of moves) planning and moving keep a bounded number of
requests in flight (`storage.parallelism`: the S3 connection pool; local folders move one
file at a time), the journal is written once, streamed, and never per move (the store is
the record of each move's progress), and the log gets one progress line every
PROGRESS_SECONDS (done/total, objects/s, ETA) instead of one per move.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path, PurePosixPath
from typing import TypeVar

import numpy as np
import pandas as pd

from tasks import storage
from tasks.decide import neighbours_vote_for, relabel_ceiling_values
from tasks.errors import MissingFileError, StorageError, UserError
from tasks.storage import ObjectInfo, unsafe_key_reason

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 5.0  # one progress line per this many seconds of moving
PLAN_LOGGED = 20  # moves a relabel lists one per line (a dry run lists all; the journal too)
JOURNAL_BATCH = 10_000  # journal lines encoded and written at a time
DELETE_BATCH = 1000  # sources of verified S3 copies deleted per request
_MD5 = re.compile(r"[0-9a-f]{32}")
LIST_PAGE = 1000  # keys per page of an S3 listing


class RelabelError(UserError, RuntimeError):
    """A move cannot be done safely; nothing was deleted."""


class GoneError(RelabelError):
    """A move whose file is at neither end (deleted by hand since), or changed there."""


JOURNAL_STATES = ("started", "complete", "undoing", "undone")


@dataclass(frozen=True)
class Move:
    """One planned move of an image between class folders, keys relative to the root."""

    src: str
    dst: str
    label: str
    corrected_label: str
    pct: float
    num_preds: int
    size: int
    etag: str
    md5: str = ""  # content MD5 at plan time (journals written before it had none)


def relabel_ceiling(results: pd.DataFrame, min_preds: int) -> pd.Series:
    """Per results row, the sensitivity below which it is relabelled: at sensitivity `s` a
    row moves exactly when `s < relabel_ceiling` (the one relabel rule,
    `tasks.decide.relabel_ceiling_values`; `select_rows` and the report's slider both compare
    against it). NaN for a row that never moves: not flagged as a label issue,
    `corrected_label == label`, `num_preds < min_preds`, or (results with a `knn_label`
    column: embedding mode) `knn_label != corrected_label`. Otherwise the least `s` at which
    `p_suggestion > s / 100` fails; a missing probability counts as -1."""
    voted = (neighbours_vote_for(results["knn_label"].to_numpy(),
                                 results["corrected_label"].to_numpy())
             if "knn_label" in results.columns else None)
    ceiling = relabel_ceiling_values(
        results["is_label_issue"].astype(bool).to_numpy(),
        (results["corrected_label"] != results["label"]).to_numpy(),
        results["num_preds"].to_numpy(), min_preds,
        pd.to_numeric(results["p_suggestion"], errors="coerce").to_numpy(np.float64), voted)
    return pd.Series(ceiling, index=results.index, name="relabel_ceiling")


def select_rows(results: pd.DataFrame, sensitivity: float, min_preds: int) -> pd.DataFrame:
    """Rows to relabel: flagged as a label issue, `corrected_label != label`,
    `p_suggestion > sensitivity / 100` (the probability that the suggested label is the true
    one, `tasks.decide.posterior`) and `num_preds >= min_preds`; that is, the rows whose
    `relabel_ceiling` is above `sensitivity`."""
    needed = ["label", "corrected_label", "p_suggestion", "num_preds", "is_label_issue"]
    missing = [c for c in needed if c not in results.columns]
    if missing:
        raise RelabelError(f"the results lack column(s) {', '.join(missing)}; relabel reads "
                           "the results.csv of an audit (python -m tasks audit writes it; "
                           "one merged before p_suggestion existed: run the same audit again, "
                           "it reuses the trained repeats and only merges)")
    return results[relabel_ceiling(results, min_preds) > sensitivity]


def _where(root: str) -> str:
    """How messages name the dataset root: a bucket or a folder."""
    return "bucket" if storage.is_s3(root) else "folder"


def validate_results(results: pd.DataFrame, classes: Collection[str]) -> None:
    """Refuse results that would make an unfinishable or harmful plan, naming the first bad
    row (its line in the CSV, the header being line 1): a file listed twice, an unsafe
    filename, a label that is not the file's class folder, or a `corrected_label` that is
    hidden, unsafe or not one of `classes` (a hidden folder would drop the image from the
    next audit)."""
    source = results.attrs.get("source", "the results")
    known = set(classes)
    seen: dict[str, int] = {}
    for pos, (name, label, corrected) in enumerate(zip(
            results["filename"].astype(str), results["label"].astype(str),
            results["corrected_label"].astype(str), strict=True)):
        line = pos + 2
        if name in seen:
            why = f"a second row for this file (the first is line {seen[name]}); keep one"
        elif reason := unsafe_key_reason(name):
            why = f"unsafe filename: {reason}"
        elif name.split("/")[0] != label:
            why = f"label {label!r} is not the file's class folder {name.split('/')[0]!r}"
        elif corrected.startswith(".") or unsafe_key_reason(corrected) or "/" in corrected:
            why = (f"corrected_label {corrected!r} is not a usable class folder name (hidden "
                   "or unsafe); write one of the run's classes")
        elif corrected not in known:
            why = (f"corrected_label {corrected!r} is not a class of this run "
                   f"({', '.join(sorted(known))})")
        else:
            seen[name] = line
            continue
        raise RelabelError(f"{source} line {line} ({name}): {why}; nothing was moved")


def _fit_name(stem: str, suffix: str, ext: str) -> str:
    """`stem + suffix + ext` with the stem cut so that the name fits storage.NAME_MAX bytes
    (and the extension dropped into the cut part when even an empty stem does not fit)."""
    room = storage.NAME_MAX - len(os.fsencode(suffix + ext))
    if room < 1:
        stem, ext = stem + ext, ""
        room = storage.NAME_MAX - len(os.fsencode(suffix))
    return storage.cut_name(stem, room) + suffix + ext


@dataclass(frozen=True)
class Decided:
    """A validated decisions file: the rows it moves (results rows whose `corrected_label`
    is the decided class), its URI and sha256, and how many rows took each decision."""

    rows: pd.DataFrame
    uri: str
    sha256: str
    counts: dict[str, int]


def read_decided(decisions_uri: str, results: pd.DataFrame, classes: list[str],
                 run_id: str | None = None) -> Decided:
    """Read a decisions file and check it against the run (`validate_decisions`: unknown
    files or classes, repeated rows, another run's file, a label the results no longer
    give). Raises DecisionsError naming the row; reads only, so nothing has moved."""
    from tasks.decisions import DECISIONS, DecisionsError, parse_decisions, validate_decisions

    if not storage.exists(decisions_uri):
        raise DecisionsError(f"decisions file {decisions_uri} does not exist")
    data = storage.read_bytes(decisions_uri)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DecisionsError(f"{decisions_uri} is not UTF-8 text: save it again as CSV "
                             "(UTF-8)") from None
    decisions = parse_decisions(text, source=decisions_uri)
    moves = validate_decisions(decisions, results, classes, run_id)
    position = pd.Series(results.index, index=results["filename"].astype(str))
    rows = results.loc[position[moves["filename"]].to_numpy()].copy()
    rows["corrected_label"] = moves["new_label"].to_numpy()
    counts = decisions["decision"].value_counts()
    return Decided(rows=rows, uri=decisions_uri, sha256=hashlib.sha256(data).hexdigest(),
                   counts={d: int(counts.get(d, 0)) for d in DECISIONS})


def _check_same_decisions(header: dict, decided: Decided, journal_uri: str) -> None:
    """Refuse to apply a decisions file over a started or complete relabel planned from
    anything else (thresholds, or other decisions)."""
    state = header.get("state")
    if state in ("started", "complete") and header.get("decisions_sha256") != decided.sha256:
        source = header.get("decisions") or "the thresholds"
        raise RelabelError(f"{journal_uri} holds a {state} relabel planned from {source}; "
                           f"undo it first (python -m tasks undo --journal {journal_uri}), "
                           f"then apply {decided.uri}")


def _target_key(src: str, corrected: str, suffix: str = "") -> str:
    """`src` (a checked key: class folder first) in the folder `corrected`, its file name
    with `suffix` before the extension."""
    parts = src.split("/")
    if suffix:
        name = PurePosixPath(parts[-1])
        parts[-1] = _fit_name(name.stem, suffix, name.suffix)
    return "/".join([corrected, *parts[1:]])


def _listed(root: str, pairs: list[tuple[str, str]], class_sizes: dict[str, int] | None,
            workers: int) -> dict[str, ObjectInfo] | None:
    """On S3, when listing the class folders the moves touch takes fewer requests than two
    HEADs per move (by `class_sizes`, images per class), the listed objects among the
    sources and candidate destinations (key relative to `root` -> info); None otherwise, or
    when a listing fails (planning then asks file by file)."""
    if not storage.is_s3(root) or not class_sizes:
        return None
    folders = sorted({src.split("/")[0] for src, _ in pairs} | {c for _, c in pairs})
    pages = sum(max(1, -(-class_sizes.get(f, 0) // LIST_PAGE)) for f in folders)
    if pages >= 2 * len(pairs):
        return None
    wanted = {key for src, corrected in pairs
              for key in (src, _target_key(src, corrected), _suffixed_key(src, corrected))}

    def listing(folder: str) -> dict[str, ObjectInfo]:
        found = (replace(info, key=f"{folder}/{info.key}")
                 for info in storage.list_objects(storage.join(root, folder)))
        return {info.key: info for info in found if info.key in wanted}

    known: dict[str, ObjectInfo] = {}
    try:
        for _, _, part in _in_parallel(listing, folders, workers):
            known.update(part)
    except StorageError as err:
        log.info("listing the class folders failed (%s); checking file by file", err)
        return None
    return known


def _look(root: str, src: str, corrected: str, known: dict[str, ObjectInfo] | None,
          md5_etags: bool) -> tuple[ObjectInfo | None, str, bool]:
    """What planning needs to know of one source: its head (or its entry in the listing
    `known`), its content MD5 (the head's ETag locally; on S3 a single-part ETag where
    `md5_etags` says the store's are MD5s, else the MD5 of the downloaded content), and
    whether its plain destination is taken."""
    src_uri, dst = storage.join(root, src), _target_key(src, corrected)
    info = storage.head(src_uri) if known is None else known.get(src)
    if info is None:
        return None, "", False
    md5 = (info.etag if not storage.is_s3(root) or (md5_etags and _MD5.fullmatch(info.etag))
           else _content_md5(src_uri))
    taken = storage.exists(storage.join(root, dst)) if known is None else dst in known
    return info, md5, taken


def _suffixed_key(src: str, corrected: str) -> str:
    """The destination of a move whose plain destination is taken."""
    tag = hashlib.sha1(src.encode(), usedforsecurity=False).hexdigest()[:8]
    return _target_key(src, corrected, f".relabel-{tag}")


def plan_moves(root: str, rows: pd.DataFrame, workers: int | None = None,
               class_sizes: dict[str, int] | None = None) -> list[Move]:
    """Moves for the selected rows, with a source check and clash-free destinations. The
    store is read with `workers` requests in flight (default: `storage.parallelism`); on
    S3, with `class_sizes` (images per class folder), by listing the class folders involved
    where that takes fewer requests than asking file by file."""
    records = rows.to_dict("records")
    pairs = [(str(row["filename"]), str(row["corrected_label"])) for row in records]
    for pair in pairs:
        for key in pair:
            reason = unsafe_key_reason(key)
            if reason:
                raise RelabelError(f"refusing to relabel {key!r}: {reason}")
    workers = storage.parallelism(root) if workers is None else workers
    known = _listed(root, pairs, class_sizes, workers) if pairs else None
    # One HEAD tells whether this store's single-part ETags are MD5s (no KMS or customer-key
    # encryption); a source that is an exception fails its move's check and is kept.
    md5_etags = bool(pairs) and storage.is_s3(root) and storage.etags_are_md5(
        storage.join(root, pairs[0][0]))
    progress = Progress("planned", "files checked", len(pairs))
    looked: list[tuple[ObjectInfo | None, str, bool]] = [(None, "", False)] * len(pairs)
    # With the listing and MD5 ETags, looking needs no request: threads would only add cost.
    for i, _, found in _in_parallel(lambda p: _look(root, *p, known, md5_etags), pairs,
                                    1 if known is not None and md5_etags else workers):
        looked[i] = found
        progress.step()
    moves: list[Move] = []
    taken: set[str] = set()
    for row, (src, corrected), (info, md5, plain_taken) in zip(records, pairs, looked,
                                                               strict=True):
        if info is None:
            raise RelabelError(f"{storage.join(root, src)} is missing; was the dataset changed "
                               "since the audit?")
        dst = _target_key(src, corrected)
        if dst in taken or plain_taken:
            dst = _suffixed_key(src, corrected)
            if dst in taken or (storage.exists(storage.join(root, dst)) if known is None
                                else dst in known):
                raise RelabelError(f"both {_target_key(src, corrected)!r} and {dst!r} exist")
        taken.add(dst)
        moves.append(Move(src=src, dst=dst, label=str(row["label"]), corrected_label=corrected,
                          pct=float(row["%"]), num_preds=int(row["num_preds"]),
                          size=info.size, etag=info.etag, md5=md5))
    progress.finish()
    return moves


def _content_md5(uri: str) -> str:
    return hashlib.md5(storage.read_bytes(uri), usedforsecurity=False).hexdigest()


def _same(info: storage.ObjectInfo | None, uri: str, move: Move) -> bool:
    """True when the object at `uri` (head `info`) holds the planned content: same size and
    ETag, or, when the ETag differs (a server-side copy of a multipart or encrypted object
    gets a new one), same content MD5."""
    if info is None or info.size != move.size:
        return False
    if info.etag == move.etag:
        return True
    return bool(move.md5) and _content_md5(uri) == move.md5


def _move_one(root: str, move: Move, src_key: str, dst_key: str,
              delete: Callable[[str], None] | None = None) -> str:
    """Bring one move to its end state; returns what was done. Idempotent. The source goes
    through `delete` once its copy is verified (a batch may delete it later)."""
    src_uri, dst_uri = storage.join(root, src_key), storage.join(root, dst_key)
    src, dst = storage.head(src_uri), storage.head(dst_uri)
    if src is None and _same(dst, dst_uri, move):
        return "already done"
    if src is None:
        raise GoneError(f"{src_uri} and {dst_uri} are both missing or changed; this tool "
                        f"deleted neither copy: check the {_where(root)} (undo restores every "
                        "other file)")
    if not _same(src, src_uri, move):
        raise GoneError(f"{src_uri} changed since the plan (size/checksum differ); skipping "
                        "is unsafe, re-audit instead")
    if dst is None:
        storage.copy(src_uri, dst_uri)
        dst = storage.head(dst_uri)
    if not _same(dst, dst_uri, move):
        raise RelabelError(f"copy {dst_uri} does not match {src_uri} (size/checksum); "
                           "source kept")
    (delete or storage.delete)(src_uri)
    return "moved"


def _move_fast(root: str, move: Move, src_key: str, dst_key: str,
               delete: Callable[[str], None] | None = None) -> str:
    """`_move_one` in fewer requests where the store checks both ends itself (S3): a copy made
    only if the source is still the planned version and the destination is free, verified by
    the ETag the copy reports (else a HEAD and the MD5), then the delete. Anything else (the
    source gone or changed, the destination taken, an error) goes to `_move_one`, which reads
    both ends and decides."""
    src_uri, dst_uri = storage.join(root, src_key), storage.join(root, dst_key)
    try:
        etag = storage.copy(src_uri, dst_uri, expect=ObjectInfo(src_key, move.size, move.etag))
    except StorageError:
        return _move_one(root, move, src_key, dst_key, delete)
    if etag != move.etag and not _same(storage.head(dst_uri), dst_uri, move):
        raise RelabelError(f"copy {dst_uri} does not match {src_uri} (size/checksum); "
                           "source kept")
    (delete or storage.delete)(src_uri)
    return "moved"


class _Deletes:
    """The sources of verified copies, deleted DELETE_BATCH at a time on S3 (one DeleteObjects
    request each, sent in the background while the copies go on; one batch in flight) and at
    once locally. Thread-safe; `flush` sends what is pending, and unless `wait` is False
    waits until every batch sent is deleted. A failed batch raises at the next `flush`."""

    def __init__(self, batched: bool) -> None:
        self.batched, self.pending, self.lock = batched, [], threading.Lock()
        self.sending: Future[None] | None = None
        self.pool = ThreadPoolExecutor(max_workers=1) if batched else None

    def add(self, uri: str) -> None:
        if not self.batched:
            storage.delete(uri)
            return
        with self.lock:
            self.pending.append(uri)

    def full(self) -> bool:
        return len(self.pending) >= DELETE_BATCH

    def _settle(self) -> None:
        sending, self.sending = self.sending, None
        if sending is not None:
            sending.result()

    def flush(self, wait: bool = True) -> None:
        with self.lock:
            batch, self.pending = self.pending, []
        try:
            self._settle()
        finally:
            if batch and self.pool is not None:
                self.sending = self.pool.submit(storage.delete_many, batch)
        if wait:
            self._settle()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def _duration(seconds: float) -> str:
    """`42s`, `3m 05s` or `2h 07m`."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    return f"{whole // 3600}h {whole // 60 % 60:02d}m"


class Progress:
    """Progress of `total` steps in the log: a line every PROGRESS_SECONDS (done/total,
    objects/s, ETA) and one at the end, instead of a line per step."""

    def __init__(self, what: str, unit: str, total: int) -> None:
        self.what, self.unit, self.total, self.done = what, unit, total, 0
        self.t0 = self.last = time.monotonic()

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS and self.done < self.total:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            log.info("%s %s/%s %s, %.0f objects/s, ETA %s", self.what, f"{self.done:,}",
                     f"{self.total:,}", self.unit, rate,
                     _duration((self.total - self.done) / max(rate, 1e-9)))

    def finish(self) -> None:
        secs = time.monotonic() - self.t0
        if self.total:
            log.info("%s %s/%s %s in %s, %.0f objects/s", self.what, f"{self.done:,}",
                     f"{self.total:,}", self.unit, _duration(secs),
                     self.done / max(secs, 1e-9))


T = TypeVar("T")
R = TypeVar("R")


def _in_parallel(fn: Callable[[T], R], items: Iterable[T], workers: int,
                 ) -> Iterator[tuple[int, T, R]]:
    """(position, item, fn(item)) for every item, in the order they finish, with at most
    `workers` calls running (serially, in order, for one). The first error stops new calls,
    waits for the running ones and is raised."""
    if workers <= 1:
        for i, item in enumerate(items):
            yield i, item, fn(item)
        return
    todo = enumerate(items)
    done: queue.SimpleQueue[Future[R]] = queue.SimpleQueue()  # futures as they finish
    pending: dict[Future[R], tuple[int, T]] = {}
    pool = ThreadPoolExecutor(max_workers=workers)

    def fill() -> None:
        for i, item in todo:
            future = pool.submit(fn, item)
            pending[future] = (i, item)
            future.add_done_callback(done.put)
            if len(pending) >= 4 * workers:  # bounded: never a future per move at once
                return

    try:
        fill()
        while pending:
            future = done.get()
            i, item = pending.pop(future)
            yield i, item, future.result()
            fill()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_MOVE_TYPES = {f.name: (int, float) if f.type == "float" else
               {"int": int, "str": str}[str(f.type)] for f in fields(Move)}


class Journal:
    """The relabel journal: a header line and one line per planned move (JSONL)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def write(self, header: dict, moves: list[Move]) -> None:
        """Write the whole journal atomically, encoded JOURNAL_BATCH lines at a time into a
        local file that is then uploaded (streamed), never held as one string."""
        names = [f.name for f in fields(Move)]
        with tempfile.TemporaryDirectory(prefix="relabel-journal-") as tmp:
            path = Path(tmp) / "journal.jsonl"
            with path.open("w", encoding="utf-8") as f:
                f.write(json.dumps(header) + "\n")
                for a in range(0, len(moves), JOURNAL_BATCH):
                    f.write("".join(
                        json.dumps({"type": "move", **{k: getattr(m, k) for k in names}}) + "\n"
                        for m in moves[a:a + JOURNAL_BATCH]))
            storage.write_file(self.uri, path)

    def _bad(self, what: str) -> RelabelError:
        return RelabelError(f"{self.uri} is not a relabel journal ({what}); pass the "
                            "relabel-journal.jsonl of a run")

    def read(self) -> tuple[dict, list[Move]]:
        """The header and the moves; anything this tool would not have written (not JSON
        lines, no header fields, a move with missing or mistyped fields or an unsafe key)
        is a RelabelError naming the file and line."""
        if not storage.exists(self.uri):
            raise MissingFileError(f"journal {self.uri} does not exist")
        try:
            text = storage.read_text(self.uri)
        except UnicodeDecodeError:
            raise self._bad("UnicodeDecodeError") from None
        numbered = [(n, x) for n, x in enumerate(text.splitlines(), 1) if x.strip()]
        if not numbered:
            raise self._bad("the file is empty")
        records = []
        for n, line in numbered:
            try:
                records.append((n, json.loads(line)))
            except ValueError as err:  # line 1: not JSON lines at all; later: a damaged line
                raise self._bad(type(err).__name__ if n == numbered[0][0]
                                else f"{type(err).__name__} at line {n}") from None
        header = records[0][1]
        if (not isinstance(header, dict) or header.get("type") != "header"
                or not isinstance(header.get("root"), str) or not header["root"]
                or header.get("state", "started") not in JOURNAL_STATES):
            raise self._bad("no header line with type, root and state")
        return header, [self._move(n, x) for n, x in records[1:]]

    def _move(self, line: int, record: object) -> Move:
        if not isinstance(record, dict) or record.get("type") != "move":
            raise self._bad(f"line {line} is not a move")
        values = {k: v for k, v in record.items() if k != "type"}
        bad = [k for k, kind in _MOVE_TYPES.items()
               if (k in values or k != "md5")
               and (not isinstance(values.get(k), kind) or isinstance(values.get(k), bool))]
        bad += [k for k in values if k not in _MOVE_TYPES]
        if bad:
            raise self._bad(f"line {line}: field(s) {', '.join(bad)} missing or mistyped")
        for key in (values["src"], values["dst"]):
            if reason := unsafe_key_reason(key):
                raise self._bad(f"line {line}: unsafe key {key!r}: {reason}")
        return Move(**values)

    def set_state(self, state: str, **extra: object) -> None:
        """Record a new state (and any `extra` header fields) in the header."""
        header, moves = self.read()
        header.update(state=state, updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      **extra)
        self.write(header, moves)


def _distinct(moves: list[Move]) -> list[Move]:
    """The moves a relabel can have made: the first per source and per destination (a journal
    written from results that listed a file twice holds a second move of the same source,
    which never ran)."""
    srcs: set[str] = set()
    dsts: set[str] = set()
    out = []
    for m in moves:
        if m.src in srcs or m.dst in dsts:
            log.warning("journal: skipping a second move of %s -> %s (it never ran)", m.src,
                        m.dst)
            continue
        srcs.add(m.src)
        dsts.add(m.dst)
        out.append(m)
    return out


def _clean_temporaries(root: str, moves: list[Move]) -> None:
    """Remove the temporary files a killed relabel or undo left beside its targets."""
    targets = [storage.join(root, key) for m in moves for key in (m.src, m.dst)]
    removed = storage.remove_temp_files(targets)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted relabel or undo", removed)


def _chained(moves: list[Move]) -> bool:
    """True when a move's destination is another's source (plans never make one, but a
    hand-written journal could): those must run in order."""
    return not {m.src for m in moves}.isdisjoint(m.dst for m in moves)


def _execute(root: str, moves: list[Move], reverse: bool, workers: int | None = None,
             ) -> tuple[dict[str, int], list[dict]]:
    """Bring every move to its end state (its start state with `reverse`), `workers` at a
    time (default: `storage.parallelism`). A relabel stops at the first problem (the moves
    already running finish); an undo goes on past files that are gone or changed and returns
    them in the order of `moves` (`src`: where the file belongs, `dst`: where it was moved,
    `reason`)."""
    workers = storage.parallelism(root) if workers is None else workers
    chained = _chained(moves)  # in order, each source gone before the next move
    if workers > 1 and chained:
        workers = 1
    step = _move_fast if storage.is_s3(root) else _move_one
    deletes = _Deletes(batched=storage.is_s3(root) and not chained)

    def run(m: Move) -> tuple[str, GoneError | None]:
        src, dst = (m.dst, m.src) if reverse else (m.src, m.dst)
        try:
            return step(root, m, src, dst, deletes.add), None
        except GoneError as err:
            if not reverse:
                raise
            return "not restored", err

    counts: dict[str, int] = {}
    gone: list[tuple[int, dict]] = []
    progress = Progress("undo" if reverse else "relabel", "moves", len(moves))
    try:
        for i, m, (done, err) in _in_parallel(run, moves, workers):
            if err is not None:
                log.warning("cannot restore %s: %s", m.src, err)
                gone.append((i, {"src": m.src, "dst": m.dst, "reason": str(err)}))
            counts[done] = counts.get(done, 0) + 1
            progress.step()
            if deletes.full():
                deletes.flush(wait=False)
        deletes.flush()
    except BaseException:
        for _ in range(2):  # the copies made are verified: delete their sources, then stop
            try:  # (a failed batch raises before the last one is waited for: wait again)
                deletes.flush()
                break
            except StorageError as err:
                log.warning("the sources of the last verified copies were not deleted (%s); "
                            "a re-run deletes them", err)
        raise
    finally:
        deletes.close()
    progress.finish()
    return counts, [x for _, x in sorted(gone, key=lambda g: g[0])]


def relabel(results: pd.DataFrame, root: str, journal_uri: str, sensitivity: float,
            min_preds: int, dry_run: bool = False,
            classes: Collection[str] | None = None,
            decided: Decided | None = None, workers: int | None = None) -> list[Move]:
    """Relabel `root` from `results` (the rows `select_rows` picks, or with `decided` exactly
    the decided rows); resumes an unfinished journal at `journal_uri`. `classes` are the
    run's (default: the results' given labels, as every class folder has images); the results
    are validated against them before planning. Moves run `workers` at a time (default:
    `storage.parallelism`, 16 on S3, 1 locally). Returns the moves
    (planned only, with `dry_run`)."""
    journal = Journal(journal_uri)
    if storage.exists(journal_uri):
        header, moves = journal.read()
        if decided is not None:
            _check_same_decisions(header, decided, journal_uri)
        state = header.get("state", "started")
        if state == "started":
            log.info("resuming interrupted relabel from %s (%d moves)", journal_uri, len(moves))
            if not dry_run:
                _clean_temporaries(header["root"], moves)
                counts, _ = _execute(header["root"], _distinct(moves), reverse=False,
                                     workers=workers)
                journal.set_state("complete")
                log.info("relabel finished: %s", counts)
            return moves
        if state == "undoing":
            raise RelabelError(f"{journal_uri}: an undo was interrupted; run undo again to "
                               "finish it before relabelling")
        if state == "complete":
            log.info("%s: this relabel is already complete (%d moves); undo it first to plan "
                     "again", journal_uri, len(moves))
            return moves
    select_rows(results, sensitivity, min_preds)  # names missing columns first
    validate_results(results, sorted(set(results["label"].astype(str)))
                     if classes is None else classes)
    rows = select_rows(results, sensitivity, min_preds) if decided is None else decided.rows
    sizes = results["label"].astype(str).value_counts()
    moves = plan_moves(root, rows, workers, {str(k): int(v) for k, v in sizes.items()})
    for m in moves if dry_run else moves[:PLAN_LOGGED]:
        log.info("%s %s -> %s (%s)", "would move" if dry_run else "move", m.src, m.dst,
                 "decided" if decided else f"{m.pct:.0f}% of {m.num_preds} predictions")
    if not dry_run and len(moves) > PLAN_LOGGED:
        log.info("... and %s more moves (the journal %s lists every one)",
                 f"{len(moves) - PLAN_LOGGED:,}", journal_uri)
    if decided is None:
        log.info("%d images %s at sensitivity %s, min_preds %d", len(moves),
                 "would move" if dry_run else "to move", sensitivity, min_preds)
        source = {"plan": "thresholds", "sensitivity": sensitivity, "min_preds": min_preds}
    else:
        log.info("%d images %s as decided in %s (%s)", len(moves),
                 "would move" if dry_run else "to move", decided.uri,
                 ", ".join(f"{n} {d}" for d, n in decided.counts.items()))
        source = {"plan": "decisions", "decisions": decided.uri,
                  "decisions_sha256": decided.sha256}
    if dry_run or not moves:
        return moves
    # An absolute local root, so that undo works from any working directory.
    journal_root = root if storage.is_s3(root) else os.path.abspath(root)
    journal.write({"type": "header", "root": journal_root, "state": "started", **source,
                   "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, moves)
    counts, _ = _execute(root, moves, reverse=False, workers=workers)
    journal.set_state("complete")
    log.info("relabel finished: %s; journal %s", counts, journal_uri)
    return moves


def undo(journal_uri: str, workers: int | None = None) -> list[Move]:
    """Reverse every move of a journal (finishing an interrupted relabel or undo first),
    `workers` at a time (default: `storage.parallelism`).
    Files that are gone or changed since are skipped, listed in the header
    (`not_restored`) and reported in one RelabelError after everything else is restored;
    undo again retries just those."""
    journal = Journal(journal_uri)
    header, moves = journal.read()
    root = header["root"]
    todo = _distinct(moves)
    if header.get("state") == "undone":
        left = {(x.get("src"), x.get("dst")) for x in header.get("not_restored") or []
                if isinstance(x, dict)}
        if not left:
            log.info("%s was already undone", journal_uri)
            return moves
        todo = [m for m in todo if (m.src, m.dst) in left]
        log.info("%s was undone except %d file(s); trying those again", journal_uri, len(todo))
    journal.set_state("undoing")
    _clean_temporaries(root, todo)
    counts, gone = _execute(root, list(reversed(todo)), reverse=True, workers=workers)
    journal.set_state("undone", not_restored=gone)
    log.info("undo finished: %s", counts)
    if gone:
        shown = "; ".join(f"{x['src']} (moved to {x['dst']})" for x in gone[:3])
        more = f" and {len(gone) - 3} more" if len(gone) > 3 else ""
        raise RelabelError(
            f"undo restored all but {len(gone)} of {len(todo)} file(s), which are gone or "
            f"changed in the {_where(root)} {root}: {shown}{more}; they are listed in "
            f"{journal_uri} (not_restored), and undo again retries them")
    return moves


def write_corrected_manifest(results: pd.DataFrame, out_uri: str, sensitivity: float,
                             min_preds: int, rows: pd.DataFrame | None = None) -> int:
    """Non-destructive mode: a CSV of every image with the label to use (from `rows`, e.g.
    a decisions file's, else the rows `select_rows` picks); returns how many labels
    change."""
    rows = select_rows(results, sensitivity, min_preds) if rows is None else rows
    table = results[["filename", "label"]].copy()
    table["new_label"] = table["label"]
    table.loc[rows.index, "new_label"] = rows["corrected_label"]
    table["changed"] = table["new_label"] != table["label"]
    storage.write_text(out_uri, table.to_csv(index=False))
    log.info("wrote %s: %d of %d labels changed", out_uri, int(table["changed"].sum()), len(table))
    return int(table["changed"].sum())


def find_run(results_uri: str) -> str:
    """The run folder of a results CSV: the folder holding it (`<run>/results.csv`), or the
    run recorded beside a copy at `results_path` (`<copy>.run.json`, written by merge)."""
    from tasks.merge import read_run_sidecar, run_sidecar_uri

    folder = storage.parent(results_uri)
    if storage.exists(storage.join(folder, "config.json")):
        return folder
    run = read_run_sidecar(results_uri)
    if run is None:
        raise RelabelError(
            f"{results_uri} is not in a run folder and {run_sidecar_uri(results_uri)} (which "
            "merge writes beside a results_path copy) does not exist: pass the results.csv "
            "in the audit's run folder, <work_uri>/runs/<run_id>/results.csv")
    if not storage.exists(storage.join(run, "config.json")):
        raise RelabelError(f"{run_sidecar_uri(results_uri)} names the run {run}, which has no "
                           "config.json: pass the results.csv in the audit's run folder")
    return run


def check_trusted(run: str, force: bool) -> None:
    """Refuse (RelabelError, one line) a run whose summary's guard says the audit cannot be
    trusted, unless `force` (then log a warning). A run without summary.json passes."""
    from tasks.merge import read_summary, summary_uri

    summary = read_summary(run)
    guard = (summary or {}).get("guard") or {"trusted": True}
    if guard.get("trusted", True):
        return
    why = "; ".join(guard.get("reasons") or ["no reason recorded"])
    if force:
        log.warning("relabelling although the audit cannot be trusted (--force): %s", why)
        return
    raise RelabelError(f"relabel refused: the audit cannot be trusted ({why}; "
                       f"{summary_uri(run)}). {guard.get('remedy', '')}; or relabel anyway with "
                       "--force (config: force_relabel)")


def run_classes(run: str) -> list[str]:
    """The classes of a run (its classes.json, written by the index step)."""
    uri = storage.join(run, "classes.json")
    if not storage.exists(uri):
        raise MissingFileError(f"{uri} does not exist: the run's index step did not finish; "
                               "re-run the audit")
    classes = json.loads(storage.read_text(uri))
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise RelabelError(f"{uri} is not a list of class names; re-run the audit")
    return classes


def relabel_results(results_uri: str, sensitivity: float | None = None,
                    min_preds: int | None = None, dry_run: bool = False,
                    decisions_uri: str | None = None, force: bool = False) -> str | None:
    """Relabel from a run's results CSV (or its copy at `results_path`) with the run's
    relabel_mode and thresholds (or the given overrides), or, with `decisions_uri`, exactly
    as a reviewer's decisions file says (validated first). Returns the journal URI (move) or
    corrected-labels.csv URI (manifest); None for a dry run, and when nothing was selected to
    move (no journal). Threshold moves are refused when the run's model-quality guard says
    the audit cannot be trusted, unless `force`; a reviewer's decisions are not (a person
    chose each move)."""
    from tasks import runs
    from tasks.merge import read_results

    overrides = [n for n, v in (("sensitivity", sensitivity), ("min_preds", min_preds))
                 if v is not None]
    if decisions_uri is not None and overrides:
        raise RelabelError(f"the thresholds ({', '.join(overrides)}) do not apply to a "
                           f"decisions file ({decisions_uri}): it names each image to move; "
                           "drop them")
    if not storage.exists(results_uri):
        raise MissingFileError(f"results CSV {results_uri} does not exist")
    run = find_run(results_uri)
    cfg = runs.read_config(run)
    if decisions_uri is None:
        check_trusted(run, force or cfg.force_relabel)
    sensitivity = cfg.sensitivity if sensitivity is None else sensitivity
    min_preds = cfg.min_preds if min_preds is None else min_preds
    results = read_results(results_uri)
    classes = run_classes(run)
    decided = None
    if decisions_uri is not None:
        decided = read_decided(decisions_uri, results, classes, storage.basename(run))
    if cfg.relabel_mode == "manifest":
        select_rows(results, sensitivity, min_preds)  # names missing columns first
        validate_results(results, classes)
        rows = select_rows(results, sensitivity, min_preds) if decided is None else decided.rows
        if dry_run:
            log.info("%d labels would change in corrected-labels.csv", len(rows))
            return None
        out = storage.join(run, "corrected-labels.csv")
        write_corrected_manifest(results, out, sensitivity, min_preds, rows=rows)
        return out
    journal = runs.journal_uri(run)
    moves = relabel(results, cfg.data_path, journal, sensitivity, min_preds, dry_run=dry_run,
                    classes=classes, decided=decided)
    return journal if moves and not dry_run else None

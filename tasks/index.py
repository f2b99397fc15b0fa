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
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pandas as pd
from PIL import Image, UnidentifiedImageError

from tasks import images, storage
from tasks.config import AuditConfig
from tasks.errors import UserError
from tasks.storage import unsafe_key_reason

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
MANIFEST_COLUMNS = ["id", "key", "label", "label_idx", "size", "etag"]


class DatasetError(UserError, ValueError):
    """The dataset cannot be audited as it is; the message says why and what to do."""


@dataclass
class DatasetIndex:
    """The result of indexing: usable images, class names (sorted), skipped files."""

    manifest: pd.DataFrame
    classes: list[str]
    skipped: pd.DataFrame


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


def decode_problem(data: bytes) -> str | None:
    """Why these bytes are not a usable image, or None when they decode."""
    try:
        img = images.open_rgb(data)  # decoded as the trainer decodes it
        if img.width < 1 or img.height < 1:
            return "image has no pixels"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return f"does not decode as an image ({type(err).__name__}: {str(err)[:80]})"
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


def list_dataset(data_path: str) -> list[storage.ObjectInfo]:
    """Every object under the dataset root (cheap: no content is read). An s3:// root
    with no objects under it is an error (StorageError), like a missing local folder."""
    if not storage.is_s3(data_path):
        from pathlib import Path

        if not Path(data_path).is_dir():
            raise DatasetError(f"data_path {data_path!r} is not a folder")
    return list(storage.list_objects(data_path))


def listing_fingerprint(listing: list[storage.ObjectInfo]) -> str:
    """A short hash of keys, sizes and change markers: changes when the dataset changes."""
    h = hashlib.sha256()
    for info in listing:
        h.update(f"{info.key}\0{info.size}\0{info.etag}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def index_dataset(cfg: AuditConfig, listing: list[storage.ObjectInfo] | None = None,
                  workers: int = 8) -> DatasetIndex:
    """Scan `cfg.data_path`, verify every candidate image decodes, and check the dataset is
    big enough for the requested splits. Raises DatasetError with a one-line reason."""
    listing = list_dataset(cfg.data_path) if listing is None else listing
    candidates: list[tuple[storage.ObjectInfo, str]] = []
    skipped: list[dict[str, str]] = []
    hidden = 0
    for info in listing:
        label, reason = _classify(info)
        if label is not None:
            candidates.append((info, label))
        elif reason is not None:
            skipped.append({"filename": info.key, "reason": reason})
        else:
            hidden += 1

    uris = [storage.join(cfg.data_path, info.key) for info, _ in candidates]
    paths = storage.fetch_many(uris, [info.etag for info, _ in candidates])
    with ThreadPoolExecutor(max_workers=workers) as pool:
        checks = list(pool.map(_check_file, paths))

    rows = []
    for (info, label), (problem, md5) in zip(candidates, checks, strict=True):
        if problem:
            skipped.append({"filename": info.key, "reason": problem})
        else:
            rows.append({"key": info.key, "label": label, "size": info.size,
                         "etag": info.etag if storage.is_s3(cfg.data_path) else md5})

    classes = sorted({r["label"] for r in rows})
    _check_classes(cfg, classes, rows)
    class_idx = {c: i for i, c in enumerate(classes)}
    manifest = pd.DataFrame(rows, columns=["key", "label", "size", "etag"])
    manifest = manifest.sort_values("key", kind="stable").reset_index(drop=True)
    manifest.insert(0, "id", range(len(manifest)))
    manifest.insert(3, "label_idx", manifest["label"].map(class_idx).astype("int32"))
    skipped_df = pd.DataFrame(skipped, columns=["filename", "reason"])

    for row in skipped:
        log.warning("skipped %r: %s", row["filename"], row["reason"])
    counts = manifest["label"].value_counts().reindex(classes)
    log.info("indexed %d images in %d classes (%s); skipped %d, ignored %d hidden",
             len(manifest), len(classes),
             ", ".join(f"{c}: {n}" for c, n in counts.items()), len(skipped), hidden)
    return DatasetIndex(manifest=manifest, classes=classes, skipped=skipped_df)


def _file_md5(path: str) -> str:
    """Content MD5 of a local file, or '' when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return hashlib.md5(f.read(), usedforsecurity=False).hexdigest()
    except OSError:
        return ""


def check_resumable(run_uri: str, data_path: str, listing: list[storage.ObjectInfo],
                    workers: int = 8) -> None:
    """Before a run resumes, check that the dataset still holds every image of its manifest
    with the same size and content (S3: the listed ETag; local: the content MD5, so an edit
    that kept size and modification time is found too). Raises DatasetError naming the run,
    how many images differ and one of them; images added since are logged, not indexed."""
    manifest, _ = read_manifest(run_uri)
    listed = {info.key: info for info in listing if not info.problem}
    gone = [k for k, size in zip(manifest["key"], manifest["size"], strict=True)
            if k not in listed or listed[k].size != size]
    changed: list[str] = []
    if not gone:
        keys, etags = manifest["key"].tolist(), manifest["etag"].tolist()
        if storage.is_s3(data_path):
            now = [listed[k].etag for k in keys]
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                now = list(pool.map(_file_md5, [storage.join(data_path, k) for k in keys]))
        changed = [k for k, old, new in zip(keys, etags, now, strict=True) if old != new]
    run_id = storage.basename(run_uri)
    redo = ("its manifest and predictions are stale: start a new run (pass a new --run-id, "
            "or drop --run-id to use the one derived from the dataset as it is now)")
    if gone:
        raise DatasetError(f"run {run_id!r} cannot resume: {len(gone)} of its {len(manifest)} "
                           f"images are gone from {data_path} or changed size since it was "
                           f"indexed (e.g. {gone[0]!r}); {redo}")
    if changed:
        raise DatasetError(f"run {run_id!r} cannot resume: {len(changed)} of its "
                           f"{len(manifest)} images changed content since it was indexed "
                           f"(e.g. {changed[0]!r}); {redo}")
    skipped = set(read_skipped_names(run_uri))
    known = set(manifest["key"])
    new = [info.key for info in listing if info.key not in known and info.key not in skipped
           and _classify(info)[0] is not None]
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


def _check_classes(cfg: AuditConfig, classes: list[str], rows: list[dict]) -> None:
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
    n = len(rows)
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
    """Write manifest.parquet, classes.json and skipped.csv into the run folder."""
    import json

    buf = io.BytesIO()
    index.manifest.to_parquet(buf, index=False)
    storage.write_bytes(storage.join(run_uri, "manifest.parquet"), buf.getvalue())
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

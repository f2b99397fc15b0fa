"""FFCV fast path: one `.beton` per run, and a batch source that reads it.

`build_beton(run)` writes `<run>/dataset.beton` once from the manifest: every image decoded
and resized exactly as the plain loader does it (RGB, the model's resize and crop), stored as a
JPEG-compressed `RGBImageField`, with the label and the manifest row as `IntField`s. A
sidecar `<run>/dataset.beton.json` records what it was built from; a later call with the
same manifest and image size is a no-op, so every repeat reuses the one file.
`tasks.audit.prepare_run` (the CLI audit's first step and the DAG's `index` task) builds it
where FFCV is installed, and the DAG's `build_beton` pod (`python -m tasks.ffcv_data --run
RUN`) where it is not, so parallel trainers do not race to build it.

`FfcvBatches` has the interface of `tasks.train.Batches`: it yields (uint8 Bx3xHxW,
labels, row positions); crop, flip and normalisation happen afterwards in `Augment`, so
both sources train with the same semantics.

Only the public FFCV API is used: `DatasetWriter`, `RGBImageField`, `IntField`, `Loader`
(`indices=`, `order=`), decoders and `ToTensor`/`ToTorchImage`/`ToDevice`/`Squeeze`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from tasks import storage
from tasks.config import FFCV_MISSING, AuditConfig, ffcv_installed
from tasks.images import FileImages, Preprocess

log = logging.getLogger(__name__)

BETON_NAME = "dataset.beton"
JPEG_QUALITY = 90


def require_ffcv() -> None:
    """Raise the one-line install hint when FFCV is missing in this process."""
    if not ffcv_installed():
        raise RuntimeError(FFCV_MISSING)


def beton_uri(run: str) -> str:
    """Where a run keeps its FFCV dataset."""
    return storage.join(run, BETON_NAME)


def beton_fingerprint(manifest: pd.DataFrame, prep: Preprocess | int) -> str:
    """Changes when the images, their order or their stored size or crop change."""
    tag = prep.tag() if isinstance(prep, Preprocess) else str(prep)
    h = hashlib.sha256(f"{tag}:{JPEG_QUALITY}:".encode())
    h.update(pd.util.hash_pandas_object(manifest[["id", "key", "label_idx", "etag"]],
                                        index=False).to_numpy().tobytes())
    return h.hexdigest()[:24]


def write_beton(paths: list[str], labels: np.ndarray, prep: Preprocess | int, out: str,
                workers: int = 2) -> None:
    """Write a local .beton of `paths` (fields image, label, row) at `out`, decoded with a
    model's `prep` (or a size: whole-image resize)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter

    prep = prep if isinstance(prep, Preprocess) else Preprocess(prep)
    size = prep.crop
    fields = {
        "image": RGBImageField(write_mode="jpg", max_resolution=size, jpeg_quality=JPEG_QUALITY),
        "label": IntField(),
        "row": IntField(),
    }
    # Pages must hold the largest sample; FFCV's default (8 MiB per worker) bloats small sets.
    page_size = max(MIN_PAGE_SIZE, 1 << (12 * size * size - 1).bit_length())
    writer = DatasetWriter(out, fields, page_size=page_size, num_workers=max(1, workers))
    # The plain loader's decoding and resizing, so both paths see the same pixels.
    writer.from_indexed_dataset(FileImages(paths, labels, prep), chunksize=256)


def _upload(local: str, uri: str) -> None:
    """Put a finished local file at `uri` atomically."""
    if storage.is_s3(uri):
        # The storage layer uploads bytes; a streaming upload would suit very large datasets.
        storage.write_bytes(uri, Path(local).read_bytes())
    else:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        os.replace(local, uri)


def build_beton(run: str, cfg: AuditConfig, manifest: pd.DataFrame,
                force: bool = False) -> str:
    """Build `<run>/dataset.beton` unless an up-to-date one exists; returns its URI.
    The file is written locally (next to its destination for a local run, in a temporary
    folder for s3://) and then moved or uploaded, so readers never see a partial file."""
    require_ffcv()
    uri = beton_uri(run)
    meta_uri = uri + ".json"
    from tasks.models import config_transform

    prep = config_transform(cfg)
    fingerprint = beton_fingerprint(manifest, prep)
    if not force and storage.exists(uri) and storage.exists(meta_uri):
        meta = json.loads(storage.read_text(meta_uri))
        if meta.get("fingerprint") == fingerprint:
            log.info("reusing %s (%d images at %d px)", uri, meta["images"], meta["image_size"])
            return uri
    uris = [storage.join(cfg.data_path, k) for k in manifest["key"]]
    paths = storage.fetch_many(uris)
    labels = manifest["label_idx"].to_numpy(np.int64)
    tmp_dir = None if storage.is_s3(uri) else storage.parent(uri)
    if tmp_dir:
        Path(tmp_dir).mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=f".{BETON_NAME}.", suffix=".tmp")
    os.close(fd)
    t0 = time.perf_counter()
    try:
        write_beton(paths, labels, prep, tmp, workers=max(cfg.num_workers, 1))
        seconds = time.perf_counter() - t0
        size = Path(tmp).stat().st_size
        _upload(tmp, uri)
    finally:
        Path(tmp).unlink(missing_ok=True)
    meta: dict[str, Any] = {"fingerprint": fingerprint, "images": len(paths),
                            "image_size": prep.crop, "resize": prep.resize,
                            "jpeg_quality": JPEG_QUALITY,
                            "bytes": size, "seconds": round(seconds, 2)}
    storage.write_text(meta_uri, json.dumps(meta, indent=2))
    log.info("built %s: %d images at %d px, %.1f MiB in %.1fs (%.0f img/s)", uri, len(paths),
             prep.crop, size / 2**20, seconds, len(paths) / max(seconds, 1e-9))
    return uri


def ensure_beton(run: str, cfg: AuditConfig) -> str | None:
    """Build the run's .beton when `cfg.ffcv` is on (idempotent); None otherwise."""
    if not cfg.ffcv:
        return None
    from tasks.index import read_manifest

    manifest, _ = read_manifest(run)
    return build_beton(run, cfg, manifest)


class FfcvBatches:
    """Batches from a run's .beton through FFCV's Loader, with `Batches`' interface.

    One Loader per (rows, shuffle) pair is built on first use and kept, so its compiled
    pipeline and its per-epoch random order are reused across epochs."""

    def __init__(self, beton_path: str, labels: np.ndarray, cfg: AuditConfig,
                 device: torch.device | str = "cpu", batches_ahead: int = 3,
                 os_cache: bool = True) -> None:
        self.path, self.labels, self.cfg = beton_path, labels, cfg
        self.device = torch.device(device)
        self.batches_ahead, self.os_cache = batches_ahead, os_cache
        self._loaders: dict[tuple[bytes, bool], Any] = {}

    def _loader(self, rows: np.ndarray, shuffle: bool, seed: int) -> Any:
        from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

        key = (np.asarray(rows, np.int64).tobytes(), shuffle)
        if key in self._loaders:
            return self._loaders[key]
        on_gpu = self.device.type == "cuda"
        image = [SimpleRGBImageDecoder(), ToTensor()]
        label = [IntDecoder(), ToTensor(), Squeeze(1)]
        if on_gpu:
            image.append(ToDevice(self.device, non_blocking=True))
            label.append(ToDevice(self.device, non_blocking=True))
        image.append(ToTorchImage(channels_last=True))
        loader = Loader(
            self.path, batch_size=self.cfg.batch_size,
            num_workers=max(1, self.cfg.num_workers),
            order=OrderOption.RANDOM if shuffle else OrderOption.SEQUENTIAL,
            seed=seed, indices=np.asarray(rows, np.int64), drop_last=False,
            os_cache=self.os_cache, batches_ahead=self.batches_ahead,
            pipelines={"image": image, "label": label,
                       "row": [IntDecoder(), ToTensor(), Squeeze(1)]},
        )
        self._loaders[key] = loader
        return loader

    def iterate(self, rows: np.ndarray, shuffle: bool, generator: torch.Generator,
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
        """Yield (images uint8 Bx3xHxW, labels, row positions) over `rows`; a random order
        per epoch when `shuffle` (seeded from `generator` when the loader is made)."""
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator)) if shuffle else 0
        # FFCV sets torch's CPU thread count to its own worker count (Compiler.set_num_threads)
        # in the Loader and at every epoch start; keep the trainer's setting.
        threads = torch.get_num_threads()
        loader = self._loader(rows, shuffle, seed)
        epoch = iter(loader)
        torch.set_num_threads(threads)
        for x, y, row in epoch:
            # FFCV reuses its batch buffers: copy the small fields before it refills them.
            yield x, y.long().clone(), row.numpy().astype(np.int64)
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m tasks.ffcv_data --run URI [--force] (e.g. as a pod in the
    trainer image, which has FFCV, before the trainers start)."""
    import argparse
    import sys

    from tasks import runs
    from tasks.index import read_manifest

    parser = argparse.ArgumentParser(prog="python -m tasks.ffcv_data",
                                     description="Build a run's FFCV dataset.beton.")
    parser.add_argument("--run", required=True, help="run folder URI (local or s3://)")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = runs.read_config(args.run)
        manifest, _ = read_manifest(args.run)
        build_beton(args.run, cfg, manifest, force=args.force)
    except Exception as err:  # one clear line for the task log
        log.debug("beton build failed", exc_info=True)
        log.error("building the .beton failed: %s: %s", type(err).__name__, err)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

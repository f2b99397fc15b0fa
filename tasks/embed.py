"""Embed one chunk of the manifest with a frozen backbone (method: embeddings).

The one embedding entrypoint, the same in a Kubernetes pod and in a local subprocess:

    python -m tasks.embed --run <run uri> --chunk <c>

It reads config.json and the manifest from the run folder, builds `model_name` with the
run's staged weights (`tasks.weights`) and its classifier replaced by the identity,
preprocesses each image as the trainers do (the model's resize, crop and normalisation),
and writes the L2-normalised
features of the chunk's images to `embeddings/chunk-NNNNN.parquet` atomically
(`tasks.embeddings` holds the format). A chunk file that exists with the same fingerprint
makes the call a no-op, so retries and resumed audits are safe.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tasks import runs, storage
from tasks.embeddings import (
    chunk_fingerprint,
    chunk_is_valid,
    chunk_rows,
    chunk_table,
    n_chunks,
    write_parquet,
)
from tasks.errors import UserError, run_step
from tasks.index import read_manifest
from tasks.models import build_model
from tasks.train import Augment, Batches, _autocast, pick_device
from tasks.weights import staged_weights

log = logging.getLogger("tasks.embed")


class ChunkError(UserError, ValueError):
    """A chunk number the run does not have."""


def backbone(model_name: str, weights: str | None, num_classes: int,
             image_size: int | None = None, label: str | None = None) -> nn.Module:
    """`model_name` with `weights` (a local state-dict file, or None) loaded and its last
    linear layer (the classifier head) replaced by the identity, in eval mode: it maps images
    to features. `image_size` and `label` as `build_model` takes them."""
    model = build_model(model_name, num_classes, weights, image_size, label=label)
    heads = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise ValueError(f"{model_name} has no linear classifier layer to remove")
    parent_name, _, attr = heads[-1].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Identity())
    return model.eval()


@torch.inference_mode()
def embed_batches(model: nn.Module, augment: Augment, batches: Batches,
                  device: torch.device) -> np.ndarray:
    """L2-normalised features (float32, N x dim) of every image of `batches`, in order."""
    rows = np.arange(len(batches.paths))
    out: np.ndarray | None = None
    for x, _, idx in batches.iterate(rows, shuffle=False, generator=torch.Generator()):
        with _autocast(device):
            feats = model(augment(x.to(device, non_blocking=True))).float()
        feats = F.normalize(feats.flatten(1), dim=1).cpu().numpy()
        if out is None:
            out = np.empty((len(rows), feats.shape[1]), dtype=np.float32)
        out[idx] = feats
    assert out is not None
    return out


def run_chunk(run: str, chunk: int, force: bool = False) -> str:
    """Embed chunk `chunk` of the run at `run` and write its file; returns the file's URI."""
    cfg = runs.read_config(run)
    manifest, classes = read_manifest(run)
    count = n_chunks(len(manifest), cfg.embed_chunk_size)
    if not 0 <= chunk < count:
        raise ChunkError(f"chunk {chunk} is out of range: the run has 0..{count - 1} "
                         f"(embed_chunk_size {cfg.embed_chunk_size}, {len(manifest)} images)")
    rows = chunk_rows(chunk, cfg.embed_chunk_size, len(manifest))
    out = runs.embedding_chunk_uri(run, chunk)
    fingerprint = chunk_fingerprint(cfg, manifest, chunk)
    label = f"chunk {chunk + 1}/{count}"
    if not force and chunk_is_valid(out, fingerprint, len(rows)):
        log.info("%s already done: %s", label, out)
        return out
    device = pick_device(cfg)
    if cfg.weights_request is None:  # small_cnn without a file, or model_weights: none
        log.warning("%s embeds with random weights, whose features are weak; set "
                    "model_weights to pretrained weights", cfg.model_name)
    log.info("%s: embedding %d images (rows %d-%d) with %s on %s", label, len(rows),
             rows[0], rows[-1], cfg.model_name, device)
    t0 = time.perf_counter()
    model = backbone(cfg.model_name, staged_weights(cfg, run), len(classes), cfg.input_size,
                     label=cfg.weights_request)
    model = model.to(device, memory_format=torch.channels_last)
    augment = Augment.for_config(cfg).to(device).eval()  # normalisation only
    keys = manifest["key"].to_numpy()[rows]
    uris = [storage.join(cfg.data_path, k) for k in keys]
    etags = (manifest["etag"].astype(str).to_numpy()[rows].tolist()
             if storage.is_s3(cfg.data_path) else None)
    paths = storage.fetch_many(uris, etags)
    labels = manifest["label_idx"].to_numpy(np.int64)[rows]
    emb = embed_batches(model, augment, Batches(paths, labels, cfg), device)
    table = chunk_table(manifest["id"].to_numpy()[rows], emb, fingerprint, chunk,
                        cfg.model_name)
    write_parquet(out, table)
    seconds = time.perf_counter() - t0
    log.info("%s done: %d images in %.1fs (%.0f img/s), %d dimensions; wrote %s", label,
             len(rows), seconds, len(rows) / max(seconds, 1e-9), emb.shape[1], out)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m tasks.embed --run URI --chunk C [--force]."""
    parser = argparse.ArgumentParser(prog="python -m tasks.embed",
                                     description="Embed one chunk of a run's images.")
    parser.add_argument("--run", required=True, help="run folder URI (local or s3://)")
    parser.add_argument("--chunk", required=True, type=int, help="chunk number, from 0")
    parser.add_argument("--force", action="store_true", help="embed even if the chunk exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                        format="%(asctime)s %(levelname)s %(message)s")
    return run_step(lambda: run_chunk(args.run, args.chunk, force=args.force),
                    f"chunk {args.chunk}", log, "its file was not written")


if __name__ == "__main__":
    sys.exit(main())

"""Tiny image datasets and folder snapshots for the core tests."""

from __future__ import annotations

import hashlib
import io
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.config import AuditConfig


def image_bytes(seed: int, fmt: str = "PNG", size: int = 12) -> bytes:
    """A small random RGB image, different for each seed."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def write_classes(root: Path, counts: dict[str, int], start: int = 0) -> list[str]:
    """`counts[c]` PNGs in `root/c/`; returns the keys written."""
    keys = []
    seed = start
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            key = f"{cls}/img-{i:03d}.png"
            (root / key).write_bytes(image_bytes(seed))
            keys.append(key)
            seed += 1
    return keys


def tiny_config(data_path: Path | str, work: Path | str, **extra) -> AuditConfig:
    """A config for seconds-long runs on tens of images."""
    values = {"data_path": str(data_path), "work_uri": str(work), "n_repeats": 2,
              "test_split": 0.5, "val_split": 0.1, "num_epochs": 1, "num_workers": 0,
              "batch_size": 32, "device": "cpu"}
    values.update(extra)
    return AuditConfig(**values)


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under root (hidden ones too): relative path -> (sha256, mode)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[path.relative_to(root).as_posix()] = (digest, stat.S_IMODE(path.stat().st_mode))
    return out

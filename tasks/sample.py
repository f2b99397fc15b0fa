"""Sample datasets with known label noise: Fashion-MNIST (Debian package
`dataset-fashion-mnist`) or, when it is absent, scikit-learn's digits.

Writes `<out>/<given class>/<name>.png` and `<out>.truth.csv`
(`filename,true_label,given_label`).
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from tasks.errors import UserError

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "ankle-boot"]
# Asymmetric noise: each class flips to one plausible neighbour (documented in the README).
FASHION_NEIGHBOUR = {"t-shirt": "shirt", "shirt": "t-shirt", "pullover": "coat",
                     "coat": "pullover", "sneaker": "sandal", "sandal": "sneaker",
                     "ankle-boot": "sneaker", "dress": "coat", "trouser": "dress", "bag": "t-shirt"}
DIGIT_NEIGHBOUR = {"0": "6", "1": "7", "2": "7", "3": "8", "4": "9", "5": "6", "6": "5",
                   "7": "1", "8": "3", "9": "4"}


class SampleError(UserError, ValueError):
    """A sample dataset cannot be written as asked; the message names the option."""


@dataclass
class CleanData:
    """Images (N x H x W uint8, grey), integer labels, class names."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    name: str


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_clean(source: str = "auto") -> CleanData:
    """All clean images of `fashion-mnist` (70,000) or `digits` (1,797); `auto` prefers
    Fashion-MNIST when its Debian package is installed."""
    have_fashion = (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists()
    if source in ("auto", "fashion-mnist") and have_fashion:
        images = np.concatenate([_read_idx(FASHION_MNIST_DIR / f"{p}-images-idx3-ubyte.gz")
                                 for p in ("train", "t10k")])
        labels = np.concatenate([_read_idx(FASHION_MNIST_DIR / f"{p}-labels-idx1-ubyte.gz")
                                 for p in ("train", "t10k")])
        return CleanData(images, labels.astype(np.int64), FASHION_CLASSES, "fashion-mnist")
    if source == "fashion-mnist":
        raise SampleError(
            f"Fashion-MNIST not found in {FASHION_MNIST_DIR}: apt-get install dataset-fashion-mnist"
        )
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)
    return CleanData(images, digits.target.astype(np.int64), [str(i) for i in range(10)], "digits")


def inject_noise(labels: np.ndarray, classes: list[str], noise: float, kind: str,
                 rng: np.random.Generator) -> np.ndarray:
    """Given labels: exactly round(noise * N) labels changed, chosen at random. `symmetric`
    flips to a uniformly random other class; `asymmetric` to the class's neighbour."""
    given = labels.copy()
    n_flip = round(noise * len(labels))
    flip = rng.choice(len(labels), size=n_flip, replace=False)
    k = len(classes)
    if kind == "symmetric":
        given[flip] = (labels[flip] + rng.integers(1, k, size=n_flip)) % k
    elif kind == "asymmetric":
        neighbour = FASHION_NEIGHBOUR if classes == FASHION_CLASSES else DIGIT_NEIGHBOUR
        target = np.array([classes.index(neighbour[c]) for c in classes])
        given[flip] = target[labels[flip]]
    else:
        raise SampleError(f"noise kind must be symmetric or asymmetric, got {kind!r}")
    return given


def draw_noisy(data: CleanData, n: int, noise: float, seed: int, kind: str = "symmetric",
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices of `n` images drawn from `data`, their true labels, their given labels with a
    fraction `noise` changed), all from one generator seeded with `seed`."""
    if not 2 <= n <= len(data.labels):
        raise SampleError(f"--n must be between 2 and {len(data.labels)} for {data.name}, got {n}")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(data.labels), size=n, replace=False))
    true = data.labels[pick]
    return pick, true, inject_noise(true, data.classes, noise, kind, rng)


def write_sample(out: str | Path, n: int, noise: float, seed: int, kind: str = "symmetric",
                 source: str = "auto") -> Path:
    """Write a class-folder PNG dataset of `n` images with a fraction `noise` of wrong labels,
    and `<out>.truth.csv`; returns the truth file path."""
    if not 0 <= noise < 1:
        raise SampleError(f"--noise must be in [0, 1), got {noise}")
    if seed < 0:
        raise SampleError(f"--seed must be 0 or more, got {seed}")
    out = Path(out)
    truth = out.with_name(out.name + ".truth.csv")
    if out.exists() and not out.is_dir():
        raise SampleError(f"{out} exists and is not a folder; choose another --out")
    if out.exists() and any(out.iterdir()):
        raise SampleError(f"{out} exists and is not empty; choose another --out")
    if truth.exists():
        raise SampleError(f"{truth} exists and would be overwritten; delete it or choose "
                          "another --out")
    data = load_clean(source)
    pick, true, given = draw_noisy(data, n, noise, seed, kind)
    for c in data.classes:
        (out / c).mkdir(parents=True, exist_ok=True)
    rows = []
    for i, src in enumerate(pick):
        name = f"{data.classes[given[i]]}/{data.name}-{src:05d}.png"
        Image.fromarray(data.images[src]).save(out / name, optimize=False, compress_level=1)
        rows.append((name, data.classes[true[i]], data.classes[given[i]]))
    pd.DataFrame(rows, columns=["filename", "true_label", "given_label"]).to_csv(truth, index=False)
    log.info("wrote %d %s images (%d labels changed, %s) to %s; truth in %s", n, data.name,
             int((true != given).sum()), kind, out, truth)
    return truth

"""Image decoding, without torch: one decoder and one dataset of image files, shared by the
plain loader (`tasks.train.Batches`) and the FFCV writer (`tasks.ffcv_data.write_beton`),
so both see the same pixels."""

from __future__ import annotations

import numpy as np
from PIL import Image


def decode_image(path: str, size: int) -> np.ndarray:
    """An image file as RGB uint8 HWC, resized to size x size."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
        return np.array(img, dtype=np.uint8)


class FileImages:
    """(image HxWx3 uint8, label, row) per file, decoded on access: a map-style dataset for
    torch's DataLoader (which collates it into B x H x W x 3 tensors) and FFCV's
    indexed-dataset writer."""

    def __init__(self, paths: list[str], labels: np.ndarray, size: int) -> None:
        self.paths, self.labels, self.size = paths, labels, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int]:
        return decode_image(self.paths[i], self.size), int(self.labels[i]), int(i)

"""Image decoding, without torch: one decoder and one dataset of image files, shared by the
plain loader (`tasks.train.Batches`), the FFCV writer (`tasks.ffcv_data.write_beton`), the
index's decode check and the report's thumbnails, so all of them see the same pixels.

The rule (`to_rgb`): EXIF orientation is applied; 16-bit grey (modes I;16, I;16B, I;16L and
32-bit integer I, read as 16-bit values) is scaled by 255/65535; float grey (F) is taken as
0-1 when all its values lie in [0, 1], else as 0-255, clipped; transparency is composited on
white; every other mode goes through PIL's conversion to RGB (16-bit RGB(A) files open as
8-bit RGB(A) in PIL, already scaled).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _grey_to_8bit(img: Image.Image) -> Image.Image:
    """A high-bit-depth grey image (I;16*, I, F) as 8-bit L, scaled by its mode's range."""
    arr = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        finite = arr[np.isfinite(arr)]
        unit = finite.size == 0 or (finite.min() >= 0 and finite.max() <= 1)
        arr = np.nan_to_num(arr, nan=0.0) * (255 if unit else 1)
    else:
        arr = arr * (255 / 65535)
    return Image.fromarray(np.rint(arr.clip(0, 255)).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """An opened image as an 8-bit RGB image (a new one; `img` is left as it is)."""
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith(("I", "F")):
        return _grey_to_8bit(img).convert("RGB")
    if img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def open_rgb(source: str | bytes) -> Image.Image:
    """The first frame of an image file (a path) or of its bytes, as `to_rgb` gives it."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
        img.seek(0)
        img.load()
        return to_rgb(img)


@dataclass(frozen=True)
class Preprocess:
    """How a model sees an image: `resize` None resizes the whole image to crop x crop
    (small_cnn); otherwise the shorter side is resized to `resize` and the centre crop x crop
    is kept (torchvision's Resize + CenterCrop). Then 0-1 scaling and (x - mean) / std."""

    crop: int
    resize: int | None = None
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet statistics
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"  # a PIL resampling filter name (bilinear, bicubic)

    def tag(self) -> str:
        """A short string that changes when the decoded pixels change (for fingerprints)."""
        if self.resize is None and self.interpolation == "bilinear":
            return str(self.crop)  # the plain squash resize keeps its old fingerprints
        return f"{self.crop}/{self.resize}/{self.interpolation}"


def decode_image(source: str | bytes, size: int, resize: int | None = None,
                 interpolation: str = "bilinear") -> np.ndarray:
    """An image file (a path, or its bytes) as RGB uint8 HWC, size x size: the whole image
    resized, or with `resize` its shorter side resized to `resize` and the centre cropped."""
    img = open_rgb(source)
    method = Image.Resampling[interpolation.upper()]
    if resize is None:
        if img.size != (size, size):
            img = img.resize((size, size), method, reducing_gap=None)
        return np.array(img, dtype=np.uint8)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resize * long / short)  # torchvision's Resize(int) rounding
    new = (resize, new_long) if w <= h else (new_long, resize)
    if new != img.size:
        img = img.resize(new, method, reducing_gap=None)
    left = round((new[0] - size) / 2.0)  # torchvision's CenterCrop
    top = round((new[1] - size) / 2.0)
    return np.array(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def decode_for(source: str | bytes, prep: Preprocess) -> np.ndarray:
    """`decode_image` with a model's `Preprocess`."""
    return decode_image(source, prep.crop, prep.resize, prep.interpolation)


class FileImages:
    """(image HxWx3 uint8, label, row) per file, decoded on access: a map-style dataset for
    torch's DataLoader (which collates it into B x H x W x 3 tensors) and FFCV's
    indexed-dataset writer. `prep` is a model's `Preprocess`, or a size (whole-image
    resize)."""

    def __init__(self, paths: list[str], labels: np.ndarray, prep: Preprocess | int) -> None:
        self.paths, self.labels = paths, labels
        self.prep = prep if isinstance(prep, Preprocess) else Preprocess(prep)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int]:
        return decode_for(self.paths[i], self.prep), int(self.labels[i]), int(i)

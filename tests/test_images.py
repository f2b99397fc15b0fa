"""tasks/images.py: one decoder for the trainer, the FFCV writer, the index and the report.
High-bit-depth images are scaled to 8 bits (never clipped at 255), EXIF orientation is
applied, and the report's thumbnail shows exactly the pixels the trainer is fed."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tasks.images import FileImages, decode_image, open_rgb
from tasks.report import thumbnail


def ramp16(h: int = 16, w: int = 16) -> np.ndarray:
    """A 16-bit grey ramp over the whole range, with values that are not multiples of 257."""
    return np.linspace(0, 65535, h * w).round().astype(np.uint16).reshape(h, w)


def scaled(arr16: np.ndarray) -> np.ndarray:
    """What a 16-bit grey image must decode to: 8-bit grey (v * 255 / 65535) as RGB."""
    grey = np.rint(arr16.astype(np.float64) * 255 / 65535).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def png48(arr: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one), written by hand."""
    h, w, _ = arr.shape
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def thumb_pixels(data: bytes) -> np.ndarray:
    """The pixels of the report's (lossless, small-image) thumbnail of `data`."""
    t = thumbnail(data)
    assert t.uri.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(t.uri.split(",", 1)[1]))) as img:
        return np.asarray(img.convert("RGB"))


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    arr = ramp16()
    path = tmp_path / "deep.png"
    path.write_bytes(save(Image.fromarray(arr), "PNG"))
    with Image.open(path) as img:
        assert img.mode == "I;16"  # what PIL gives for a 16-bit grey PNG
    out = decode_image(str(path), 16)
    assert out.dtype == np.uint8 and out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out, scaled(arr))
    assert (out == 255).mean() < 0.01  # convert("RGB") made most of them white
    # The same bytes decode the same way (the index checks bytes, the trainer reads paths).
    np.testing.assert_array_equal(decode_image(path.read_bytes(), 16), out)


@pytest.mark.parametrize("mode", ["I;16B", "I"])
def test_other_16bit_grey_modes_are_scaled(mode):
    arr = ramp16()
    if mode == "I":  # 32-bit integer grey (e.g. a TIFF or an older PIL's 16-bit PNG)
        img = Image.fromarray(arr.astype(np.int32), "I")
    else:
        img = Image.frombytes(mode, (16, 16), arr.astype(">u2").tobytes())
    data = save(img, "TIFF")
    with Image.open(io.BytesIO(data)) as back:
        assert back.mode == mode
    np.testing.assert_array_equal(decode_image(data, 16), scaled(arr))


@pytest.mark.parametrize(("top", "factor"), [(1.0, 255), (255.0, 1)])
def test_float_grey_is_read_as_0_1_or_0_255(top, factor):
    arr = np.linspace(0, top, 64, dtype=np.float32).reshape(8, 8)
    out = decode_image(save(Image.fromarray(arr, "F"), "TIFF"), 8)
    expect = np.rint(arr.astype(np.float64) * factor).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expect)
    assert out[..., 0].min() == 0 and out[..., 0].max() == 255


def test_16bit_rgb_png_keeps_its_colours():
    arr = np.stack([ramp16(), ramp16()[::-1], np.full((16, 16), 40000, np.uint16)], axis=2)
    out = decode_image(png48(arr), 16).astype(int)
    expect = np.rint(arr.astype(np.float64) * 255 / 65535).astype(int)
    assert np.abs(out - expect).max() <= 1  # PIL keeps the high byte of each channel
    assert out[..., 2].min() == out[..., 2].max() == 156


def exif_rotated_png() -> tuple[bytes, np.ndarray]:
    """A 12x6 PNG whose EXIF says 'rotate 90 degrees clockwise to display', and how it
    looks displayed."""
    arr = np.zeros((6, 12, 3), np.uint8)
    arr[:, :4] = (255, 0, 0)  # red left third
    arr[0, :] = (0, 0, 255)  # blue top row
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW
    shown = np.rot90(arr, k=-1)  # 12 tall, 6 wide
    return save(img, "PNG", exif=exif.tobytes()), np.ascontiguousarray(shown)


def test_exif_orientation_is_applied():
    data, shown = exif_rotated_png()
    with Image.open(io.BytesIO(data)) as img:
        assert img.size == (12, 6)  # stored 12 wide, 6 tall
    np.testing.assert_array_equal(np.asarray(open_rgb(data)), shown)
    resized = Image.fromarray(shown).resize((12, 12), Image.Resampling.BILINEAR,
                                            reducing_gap=None)
    np.testing.assert_array_equal(decode_image(data, 12), np.asarray(resized))


def test_transparency_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    out = decode_image(save(Image.fromarray(rgba, "RGBA"), "PNG"), 4)
    assert (out[:2] == (200, 0, 0)).all() and (out[2:] == 255).all()


def test_report_thumbnail_shows_the_trainers_input(tmp_path):
    """The trainer's input (Batches, the plain loader, and FileImages, which the FFCV writer
    and the streamed loader read) and the report's thumbnail agree, pixel for pixel, on a
    16-bit PNG, an EXIF-rotated PNG, a transparent PNG and a palette GIF."""
    pytest.importorskip("torch")
    from tasks.train import Batches
    from tests.datasets import tiny_config

    arr = ramp16(20, 20)
    rotated, _ = exif_rotated_png()
    rgba = np.random.default_rng(0).integers(0, 256, (20, 20, 4), dtype=np.uint8)
    files = {"deep.png": save(Image.fromarray(arr), "PNG"), "rotated.png": rotated,
             "alpha.png": save(Image.fromarray(rgba, "RGBA"), "PNG"),
             "palette.gif": save(Image.fromarray(rgba[..., :3]).convert("P"), "GIF")}
    paths = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    labels = np.zeros(len(paths), np.int64)
    for name, path in zip(files, paths, strict=True):
        thumb = thumb_pixels(files[name])
        if name == "rotated.png":  # 6 wide x 12 tall: the trainer squeezes it into a square
            assert thumb.shape[:2] == (12, 6)
            continue
        size = thumb.shape[0]
        batches = Batches([path], labels[:1], tiny_config(tmp_path / "data", tmp_path / "w",
                                                          image_size=size), in_memory=True)
        x, _, _ = next(batches.iterate(np.arange(1), False, None))
        fed = x[0].permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(fed, thumb, err_msg=name)
        np.testing.assert_array_equal(FileImages([path], labels, size)[0][0], thumb)
    np.testing.assert_array_equal(thumb_pixels(files["deep.png"]), scaled(arr))
    # The rotated image: the thumbnail is the displayed image, which the trainer resizes.
    np.testing.assert_array_equal(thumb_pixels(rotated), np.asarray(open_rgb(paths[1])))

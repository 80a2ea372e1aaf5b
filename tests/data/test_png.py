"""PNG decoding against an independent encoder (every filter type), real PNG files, and corrupt ones."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy

from fedfew_med.data.png import decode_png
from fedfew_med.data.readers import ReaderSet, read_image
from tests.data.sitekit import encode_png

# (colour type, bit depth, channels stored, filters used row by row)
FORMATS = [
    (0, 8, 1, (0,)),
    (0, 8, 1, (1,)),
    (0, 8, 1, (2,)),
    (0, 8, 1, (3,)),
    (0, 8, 1, (4,)),
    (0, 8, 1, (0, 1, 2, 3, 4)),
    (0, 16, 1, (0, 1, 2, 3, 4)),
    (0, 1, 1, (0, 1, 2, 3, 4)),
    (0, 4, 1, (4, 3, 2, 1, 0)),
    (2, 8, 3, (0, 1, 2, 3, 4)),
    (2, 16, 3, (4, 3)),
    (4, 8, 2, (1, 4)),
    (6, 8, 4, (3, 4, 2)),
    (6, 16, 4, (3, 4, 2)),
]


@pytest.mark.parametrize(("colour", "depth", "channels", "filters"), FORMATS)
def test_decoding_inverts_the_encoder(
    colour: int, depth: int, channels: int, filters: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(colour * 100 + depth)
    samples = rng.integers(0, 2**depth, size=(9, 13, channels)).astype(np.uint16 if depth == 16 else np.uint8)
    decoded = decode_png(encode_png(samples, colour_type=colour, bit_depth=depth, filters=filters))
    expected = samples[:, :, : 3 if channels >= 3 else 1]  # alpha dropped
    assert decoded.shape == (expected.shape[:2] if expected.shape[2] == 1 else expected.shape)
    np.testing.assert_array_equal(decoded.reshape(expected.shape), expected)


def test_palette_images_expand_to_rgb() -> None:
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 128, 255], [9, 9, 9]], dtype=np.uint8)
    index = np.random.default_rng(3).integers(0, 4, size=(7, 5)).astype(np.uint8)
    decoded = decode_png(encode_png(index, colour_type=3, bit_depth=2, palette=palette))
    np.testing.assert_array_equal(decoded, palette[index])


def test_real_png_shipped_with_scipy() -> None:
    """dots.png: 420 x 300 RGB written by a real encoder (Sub, Up and Paeth rows): black dots on white."""
    path = Path(scipy.__file__).parent / "ndimage" / "tests" / "dots.png"
    decoded = decode_png(path.read_bytes())
    assert decoded.shape == (300, 420, 3) and decoded.dtype == np.uint8
    colours = {tuple(c) for c in np.unique(decoded.reshape(-1, 3), axis=0)}
    assert colours == {(0, 0, 0), (255, 255, 255)}  # a wrong filter would smear other values in
    img = read_image(path, ReaderSet())
    assert tuple(img.shape) == (3, 420, 300)  # channel first, (W, H) like MONAI's PILReader
    np.testing.assert_array_equal(img[0].numpy(), decoded[:, :, 0].T)


def _good() -> bytes:
    return encode_png(np.arange(20, dtype=np.uint8).reshape(4, 5), colour_type=0)


def _interlaced() -> bytes:
    data = bytearray(_good())
    data[8 + 8 + 12] = 1  # IHDR interlace byte
    header = bytes(data[12:29])
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(data)


CORRUPT = [
    ("signature", lambda: b"GIF89a" + _good()[6:], "not a PNG file"),
    ("crc", lambda: _good()[:-20] + bytes([_good()[-20] ^ 1]) + _good()[-19:], "CRC mismatch"),
    ("truncated", lambda: _good()[:40], "truncated PNG"),
    ("no iend", lambda: _good()[:-12], "no IEND"),
    ("interlaced", _interlaced, "interlaced"),
]


@pytest.mark.parametrize(("make", "message"), [c[1:] for c in CORRUPT], ids=[c[0] for c in CORRUPT])
def test_corrupt_png_is_refused_with_a_reason(make: Callable[[], bytes], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_png(make())

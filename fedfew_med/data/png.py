"""PNG files read with the standard library (zlib) and numpy, behind MONAI's reader interface.

Pillow is not a dependency of fedfew-med, so MONAI's ``PILReader`` is not always
available; PNG is simple enough to decode exactly here (ISO/IEC 15948: chunks with
CRCs, one zlib stream, five per-row filters). Supported: grey, grey + alpha, RGB,
RGBA and palette images, bit depths 1-16, non-interlaced. Alpha is dropped (it is
not image content). :class:`PNGReader` follows ``PILReader``'s axis convention
(``reverse_indexing``): arrays are (W, H[, C]), like the other MONAI readers.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ImageReader
from monai.data.utils import is_supported_format
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from fedfew_med.site_config import MAX_VOXELS

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of every chunk, CRCs checked."""
    if not data.startswith(_SIGNATURE):
        raise ValueError("not a PNG file (bad signature)")
    out, pos = [], len(_SIGNATURE)
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError("truncated PNG (incomplete chunk header)")
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        payload = data[pos + 8 : pos + 8 + length]
        crc_bytes = data[pos + 8 + length : pos + 12 + length]
        if len(payload) != length or len(crc_bytes) != 4:
            raise ValueError(f"truncated PNG (chunk {kind!r} is cut short)")
        if zlib.crc32(kind + payload) != struct.unpack(">I", crc_bytes)[0]:
            raise ValueError(f"corrupt PNG (CRC mismatch in chunk {kind.decode('latin-1')})")
        out.append((kind, payload))
        pos += 12 + length
        if kind == b"IEND":
            return out
    raise ValueError("truncated PNG (no IEND chunk)")


def _unfilter(raw: bytes, height: int, stride: int, bpp: int) -> np.ndarray:
    """Undo the per-row filters; returns (height, stride) uint8."""
    if len(raw) != height * (stride + 1):
        raise ValueError(f"corrupt PNG (image data has {len(raw)} bytes, expected {height * (stride + 1)})")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.uint8)
    prior = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        kind, line = int(rows[y, 0]), rows[y, 1:]
        if kind == 0:  # None
            cur = line.copy()
        elif kind == 1:  # Sub: running sum along each byte lane, modulo 256
            lanes = np.pad(line, (0, (-stride) % bpp)).reshape(-1, bpp).astype(np.int64)
            cur = (np.cumsum(lanes, axis=0) % 256).astype(np.uint8).reshape(-1)[:stride]
        elif kind == 2:  # Up
            cur = line + prior  # uint8 arithmetic wraps modulo 256, as the filter requires
        elif kind in (3, 4):  # Average, Paeth: each byte depends on the one just decoded
            cur = np.frombuffer(
                _sequential(kind, bytearray(line.tobytes()), prior.tobytes(), bpp), dtype=np.uint8
            )
        else:
            raise ValueError(f"corrupt PNG (unknown filter type {kind} in row {y})")
        out[y] = cur
        prior = out[y]
    return out


def _sequential(kind: int, cur: bytearray, prev: bytes, bpp: int) -> bytearray:
    # plain Python ints on a bytearray: far faster than numpy for byte-by-byte recurrences
    for i in range(len(cur)):
        a = cur[i - bpp] if i >= bpp else 0
        b = prev[i]
        if kind == 3:
            cur[i] = (cur[i] + ((a + b) >> 1)) & 0xFF
            continue
        c = prev[i - bpp] if i >= bpp else 0
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        predictor = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
        cur[i] = (cur[i] + predictor) & 0xFF
    return cur


def decode_png(data: bytes) -> np.ndarray:
    """Decode a PNG file's bytes.

    Returns
    -------
    numpy.ndarray
        (H, W) for grey or (H, W, 3) for colour, uint8 (bit depth <= 8) or uint16; alpha dropped,
        palettes expanded to RGB, low bit depths left at their stored values (0..2**depth - 1).

    Raises
    ------
    ValueError
        For anything that is not a well-formed, supported PNG (the message says what).
    """
    chunks = _chunks(data)
    if not chunks or chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
        raise ValueError("corrupt PNG (first chunk is not a valid IHDR)")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    if colour not in _CHANNELS or depth not in _DEPTHS[colour] or compression or filtering:
        raise ValueError(f"unsupported PNG (colour type {colour}, bit depth {depth})")
    if interlace:
        raise ValueError("unsupported PNG (interlaced); re-save it without interlacing")
    if width == 0 or height == 0:
        raise ValueError("corrupt PNG (zero width or height)")
    if width * height > MAX_VOXELS:
        raise ValueError(f"PNG header declares {width} x {height} pixels, more than {MAX_VOXELS}")
    channels = _CHANNELS[colour]
    bits = channels * depth
    stride = (width * bits + 7) // 8
    expected = height * (stride + 1)
    try:  # never inflate more than the header promises (a small file can inflate to gigabytes)
        inflate = zlib.decompressobj()
        raw = inflate.decompress(b"".join(p for k, p in chunks if k == b"IDAT"), expected + 1)
    except zlib.error as exc:
        raise ValueError(f"corrupt PNG (image data does not decompress: {exc})") from None
    rows = _unfilter(raw, height, stride, max(1, bits // 8))
    samples: np.ndarray  # (H, W, channels)
    if depth == 16:
        samples = rows.view(">u2").astype(np.uint16).reshape(height, width, channels)
    elif depth == 8:
        samples = rows.reshape(height, width, channels)
    else:  # 1, 2, 4 bits: unpack, then keep the first `width` samples of every row
        per_byte = 8 // depth
        shifts = np.arange(per_byte - 1, -1, -1, dtype=np.uint8) * depth
        unpacked = (rows[:, :, None] >> shifts) & ((1 << depth) - 1)
        samples = unpacked.reshape(height, -1)[:, :width, None].astype(np.uint8)
    if colour == 3:
        palette = next((p for k, p in chunks if k == b"PLTE"), b"")
        if not palette or len(palette) % 3:
            raise ValueError("corrupt PNG (palette image without a valid PLTE chunk)")
        table = np.frombuffer(palette, dtype=np.uint8).reshape(-1, 3)
        if samples.max() >= len(table):
            raise ValueError("corrupt PNG (palette index outside the palette)")
        samples = table[samples[:, :, 0]]
    if colour in (4, 6):
        samples = samples[:, :, :-1]  # drop alpha
    return samples[:, :, 0] if samples.shape[2] == 1 else samples


class PNGReader(ImageReader):
    """MONAI reader for ``.png`` files (see :func:`decode_png`); several files stack as channels."""

    def verify_suffix(self, filename: Sequence[Any] | Any) -> bool:
        """True for ``.png`` names."""
        return bool(is_supported_format(filename, ["png"]))

    def read(self, data: Sequence[Any] | Any, **kwargs: Any) -> Any:
        """Decode each file; one array for one name, else a list."""
        arrays = [decode_png(Path(f"{name}").read_bytes()) for name in ensure_tuple(data)]
        return arrays[0] if len(arrays) == 1 else arrays

    def get_data(self, img: Any) -> tuple[np.ndarray, dict[str, Any]]:
        """(W, H[, C]) array (PILReader's ``reverse_indexing`` convention) and its metadata."""
        arrays = [np.moveaxis(a, 0, 1) for a in (img if isinstance(img, list) else [img])]
        first = arrays[0]
        if len(arrays) > 1 and (first.ndim != 2 or any(a.shape != first.shape for a in arrays)):
            raise ValueError(
                f"only grey PNG files of one shape stack as channels, got {[a.shape for a in arrays]}"
            )
        meta: dict[str, Any] = {
            MetaKeys.SPATIAL_SHAPE: np.asarray(first.shape[:2]),
            MetaKeys.SPACE: SpaceKeys.RAS,
        }
        if len(arrays) > 1:
            meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
            return np.stack(arrays, axis=0), meta
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = float("nan") if first.ndim == 2 else -1
        return first, meta

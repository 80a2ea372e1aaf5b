"""Small sites written to disk for the data tests: NIfTI, DICOM series, PNG + CSV, MSD, tabular.

Writers are independent of the code under test: PNG is encoded here (every filter
type, forward direction), DICOM is written with pydicom from explicit geometry,
NIfTI with nibabel from a known affine.
"""

from __future__ import annotations

import copy
import csv
import json
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

NAMES = ["no_tumor", "tumor"]

# --------------------------------------------------------------------------- TOML


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    raise TypeError(v)


def write_toml(path: Path, doc: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for section, table in doc.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml(v)}" for k, v in table.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def site_doc(
    kind: str, task: str, spatial_size: Sequence[int] = (8, 8), **sections: dict[str, Any]
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "site": {"name": "site0", "task": task},
        "source": {"kind": kind, "root": "."},
        "labels": {"names": list(NAMES)},
        "preprocessing": {"spatial_size": list(spatial_size)},
        "split": {"seed": 0, "val_fraction": 0.2, "test_fraction": 0.2},
    }
    if task == "tabular":
        doc["preprocessing"] = {"intensity": "zscore"}
    doc = copy.deepcopy(doc)
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    return doc


# --------------------------------------------------------------------------- PNG


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def _filter_row(kind: int, row: bytes, prior: bytes, bpp: int) -> bytes:
    out = bytearray()
    for i, x in enumerate(row):
        a = row[i - bpp] if i >= bpp else 0
        b = prior[i]
        c = prior[i - bpp] if i >= bpp else 0
        predictor = [0, a, b, (a + b) // 2, _paeth(a, b, c)][kind]
        out.append((x - predictor) % 256)
    return bytes([kind]) + bytes(out)


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def encode_png(
    samples: np.ndarray,
    *,
    colour_type: int,
    bit_depth: int = 8,
    filters: Sequence[int] = (0, 1, 2, 3, 4),
    palette: np.ndarray | None = None,
) -> bytes:
    """PNG bytes of (H, W) or (H, W, C) samples; row y uses filter ``filters[y % len(filters)]``."""
    arr = samples if samples.ndim == 3 else samples[:, :, None]
    height, width, channels = arr.shape
    if bit_depth == 16:
        rows = [arr[y].astype(">u2").tobytes() for y in range(height)]
    elif bit_depth == 8:
        rows = [arr[y].astype(np.uint8).tobytes() for y in range(height)]
    else:
        per_byte = 8 // bit_depth
        rows = []
        for y in range(height):
            vals = list(arr[y, :, 0]) + [0] * (-width % per_byte)
            packed = [
                sum(int(v) << (bit_depth * (per_byte - 1 - k)) for k, v in enumerate(vals[i : i + per_byte]))
                for i in range(0, len(vals), per_byte)
            ]
            rows.append(bytes(packed))
    bpp = max(1, channels * bit_depth // 8)
    prior = bytes(len(rows[0]))
    body = b""
    for y, row in enumerate(rows):
        body += _filter_row(filters[y % len(filters)], row, prior, bpp)
        prior = row
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    chunks = _chunk(b"IHDR", header)
    if palette is not None:
        chunks += _chunk(b"PLTE", palette.astype(np.uint8).tobytes())
    chunks += _chunk(b"IDAT", zlib.compress(body)) + _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def write_png(path: Path, grey: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(grey.astype(np.uint8), colour_type=0))
    return path


# --------------------------------------------------------------------------- NIfTI and DICOM

AFFINE = np.array([[-1.5, 0, 0, 10.0], [0, 1.5, 0, -20.0], [0, 0, 2.0, 5.0], [0, 0, 0, 1]])  # LAS


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def write_series(
    folder: Path,
    volume: np.ndarray,
    *,
    origin: Sequence[float],
    row_dir: Sequence[float],
    col_dir: Sequence[float],
    pixel_spacing: tuple[float, float],
    gap: float,
    order: Sequence[int] | None = None,
    uid_seed: str = "s",
) -> None:
    """Slices ``volume[:, :, k]`` (rows, cols) at ``origin + k * gap * normal``, written in ``order``.

    ``InstanceNumber`` follows the writing order, so a shuffled order also shuffles instance numbers.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rows, cols, n = volume.shape
    normal = np.cross(row_dir, col_dir)
    series_uid = generate_uid(entropy_srcs=[uid_seed, "series"])
    for number, k in enumerate(order if order is not None else range(n), start=1):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[uid_seed, str(k)])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID = "CT", series_uid
        ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid_seed, "study"])
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * gap * normal]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [
            float(pixel_spacing[0]),
            float(pixel_spacing[1]),
        ]  # (between rows, between columns)
        ds.SliceThickness = float(gap)
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(volume[:, :, k]).astype("<i2").tobytes()
        ds.save_as(folder / f"slice{number:03d}.dcm", enforce_file_format=True)


def coded_volume(rows: int, cols: int, n: int) -> np.ndarray:
    """Voxel (r, c, k) holds k * 256 + r * 16 + c, so a value says where it came from."""
    r, c, k = np.meshgrid(np.arange(rows), np.arange(cols), np.arange(n), indexing="ij")
    return (k * 256 + r * 16 + c).astype(np.int16)


# --------------------------------------------------------------------------- whole sites


def png_site(folder: Path, n: int = 12, size: tuple[int, int] = (10, 12), **sections: dict[str, Any]) -> Path:
    rows = []
    for i in range(n):
        grey = np.random.default_rng(i).integers(0, 255, size=size)
        write_png(folder / "img" / f"im{i:02d}.png", grey)
        rows.append({"image": f"img/im{i:02d}.png", "label": NAMES[i % 2] if i % 3 else str(i % 2)})
    write_csv(folder / "labels.csv", rows)
    doc = site_doc("images_csv", "classification", **{"source": {"csv": "labels.csv"}, **sections})
    return write_toml(folder / "site0.toml", doc)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def seg_volumes(folder: Path, n: int = 6, shape: tuple[int, int, int] = (10, 10, 6)) -> None:
    for i in range(n):
        rng = np.random.default_rng(100 + i)
        write_nifti(folder / "imagesTr" / f"case{i}.nii.gz", rng.normal(size=shape).astype(np.float32))
        mask = np.zeros(shape, dtype=np.uint8)
        mask[2 : 5 + i % 3, 3:7, 1:4] = 1
        write_nifti(folder / "labelsTr" / f"case{i}.nii.gz", mask)


def nifti_seg_site(folder: Path, n: int = 6, **sections: dict[str, Any]) -> Path:
    seg_volumes(folder, n)
    doc = site_doc("nifti_folder", "segmentation", spatial_size=(8, 8, 4), **sections)
    return write_toml(folder / "site0.toml", doc)


def msd_site(folder: Path, n: int = 5, **sections: dict[str, Any]) -> Path:
    seg_volumes(folder, n)
    entries = [
        {"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz"} for i in range(n)
    ]
    (folder / "dataset.json").write_text(json.dumps({"name": "toy", "training": entries, "test": []}))
    doc = site_doc("msd_datalist", "segmentation", spatial_size=(8, 8, 4), **sections)
    return write_toml(folder / "site0.toml", doc)


def dicom_site(folder: Path, n: int = 4, **sections: dict[str, Any]) -> Path:
    rows = []
    for i in range(n):
        write_series(
            folder / "series" / f"pat{i}",
            coded_volume(8, 8, 3) + i,
            origin=(0, 0, 10 * i),
            row_dir=(1, 0, 0),
            col_dir=(0, 1, 0),
            pixel_spacing=(0.8, 0.7),
            gap=2.5,
            uid_seed=f"pat{i}",
        )
        rows.append({"image": f"pat{i}", "label": i % 2})
    write_csv(folder / "labels.csv", rows)
    source = {"csv": "labels.csv", "images": "series"}
    doc = site_doc("dicom_series", "classification", spatial_size=(8, 8, 4), **{"source": source, **sections})
    return write_toml(folder / "site0.toml", doc)


def tabular_site(folder: Path, n: int = 30, **sections: dict[str, Any]) -> Path:
    rng = np.random.default_rng(7)
    rows = [
        {
            "age": round(float(rng.normal(60, 10)), 2),
            "psa": round(float(rng.gamma(2, 3)), 3),
            "grade": int(rng.integers(1, 5)),
            "label": NAMES[i % 2],
        }
        for i in range(n)
    ]
    write_csv(folder / "table.csv", rows)
    doc = site_doc("tabular_csv", "tabular", **{"source": {"csv": "table.csv"}, **sections})
    return write_toml(folder / "site0.toml", doc)

"""Generators of bad inputs: real files written with nibabel, pydicom, numpy and the PNG encoder
of :mod:`tests.data.sitekit`, then broken on purpose. Nothing here is committed as a binary.

A *site maker* writes a small valid site into a folder and returns its TOML; a *damage*
function breaks it in one way. :func:`rename` gives the site the name the tests look for.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import tomllib
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom

from tests.data import sitekit as kit

Maker = Callable[[Path], Path]
Damage = Callable[[Path], object]

SHAPE = (10, 10, 6)  # the volumes of kit.seg_volumes


# --------------------------------------------------------------------------- site makers (small, valid)


def png_site(folder: Path) -> Path:
    return kit.png_site(folder, n=6, size=(8, 8))


def nifti_site(folder: Path) -> Path:
    return kit.nifti_seg_site(folder, n=3)


def msd_site(folder: Path) -> Path:
    return kit.msd_site(folder, n=3)


def tabular_site(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return kit.tabular_site(folder, n=12)


def dicom_site(folder: Path, slices: int = 5) -> Path:
    """Three patients, one series of ``slices`` axial 6x6 slices 2.5 mm apart each; labels in a CSV."""
    rows = []
    for i in range(3):
        kit.write_series(
            folder / "series" / f"pat{i}",
            kit.coded_volume(6, 6, slices) + i,
            origin=(0, 0, 100 * i),
            row_dir=(1, 0, 0),
            col_dir=(0, 1, 0),
            pixel_spacing=(0.8, 0.7),
            gap=2.5,
            uid_seed=f"pat{i}",
        )
        rows.append({"image": f"pat{i}", "label": i % 2})
    kit.write_csv(folder / "labels.csv", rows)
    source = {"csv": "labels.csv", "images": "series"}
    doc = kit.site_doc("dicom_series", "classification", spatial_size=(6, 6, 4), source=source)
    return kit.write_toml(folder / "site0.toml", doc)


def dicom3_site(folder: Path) -> Path:
    return dicom_site(folder, slices=3)


def rename(toml: Path, name: str) -> None:
    """Give the site file's ``[site].name`` the value ``name``."""
    toml.write_text(toml.read_text().replace('name = "site0"', f'name = "{name}"', 1))


# --------------------------------------------------------------------------- byte-level damage


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def flip_bytes(path: Path, start: int, stop: int) -> None:
    """Invert bytes ``start:stop`` (negative values count from the end)."""
    data = bytearray(path.read_bytes())
    for i in range(*slice(start, stop).indices(len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def nifti_uncompressed_truncated(folder: Path) -> None:
    """case1 as a plain .nii whose voxel data is cut short."""
    (folder / "imagesTr/case1.nii.gz").unlink()
    kit.write_nifti(folder / "imagesTr/case1.nii", np.ones(SHAPE, np.float32))
    truncate(folder / "imagesTr/case1.nii", 0.7)


def nifti_huge_header(folder: Path) -> None:
    """case1 as a plain .nii whose header claims 30000**3 voxels (a few hundred bytes of data)."""
    (folder / "imagesTr/case1.nii.gz").unlink()
    path = kit.write_nifti(folder / "imagesTr/case1.nii", np.ones(SHAPE, np.float32))
    data = bytearray(path.read_bytes())
    data[42:48] = struct.pack("<3h", 30000, 30000, 30000)  # dim[1..3] of the NIfTI-1 header
    path.write_bytes(bytes(data))


def nifti_gz_lying_header(folder: Path) -> None:
    """case1 as a valid gzip stream whose NIfTI header claims (20, 20, 12) voxels; it holds (10, 10, 6)."""
    path = folder / "imagesTr/case1.nii.gz"
    plain = kit.write_nifti(folder / "case1.nii", np.ones(SHAPE, np.float32))
    data = bytearray(plain.read_bytes())
    data[42:48] = struct.pack("<3h", 20, 20, 12)  # dim[1..3] of the NIfTI-1 header
    path.write_bytes(gzip.compress(bytes(data)))
    plain.unlink()


def volume(folder: Path, name: str, array: np.ndarray, affine: np.ndarray = kit.AFFINE) -> None:
    kit.write_nifti(folder / name, array, affine)


def mask_of(folder: Path, name: str) -> np.ndarray:
    """The mask ``name`` as written, so that a test changes only its header."""
    return np.asarray(nib.load(folder / name).dataobj)


def relabel(folder: Path, name: str, change: Callable[[np.ndarray], object]) -> None:
    """Rewrite the mask ``name`` with the same voxels and ``change`` applied to a copy of its affine."""
    affine = kit.AFFINE.copy()
    change(affine)
    volume(folder, name, mask_of(folder, name), affine)


def series(volumes: int, seed: int = 0) -> np.ndarray:
    """A 4-D (X, Y, Z, T) image of ``volumes`` volumes on the grid of SHAPE."""
    return np.random.default_rng(seed).normal(size=(*SHAPE, volumes)).astype(np.float32)


def constant_png(folder: Path, name: str, value: int) -> None:
    kit.write_png(folder / "img" / name, np.full((8, 8), value))


def with_values(value: float, count: int = 1, dtype: type = np.float32) -> np.ndarray:
    array = np.zeros(SHAPE, dtype)
    array.flat[:count] = value
    return array


def extremes() -> np.ndarray:
    array = np.zeros(SHAPE, np.float32)
    array.flat[0], array.flat[1] = -3e38, 3e38  # finite, but max - min overflows float32
    return array


# --------------------------------------------------------------------------- DICOM


def dicom_edit(path: Path, **tags: Any) -> None:
    ds = pydicom.dcmread(path)
    for tag, value in tags.items():
        if value is None:
            delattr(ds, tag)
        else:
            setattr(ds, tag, value)
    ds.save_as(path)


def dicom_missing_middle_with_stated_spacing(folder: Path) -> None:
    """pat1 loses its middle slice; the two left are evenly spaced, but 5 mm, not the stated 2.5."""
    (folder / "series/pat1/slice002.dcm").unlink()
    for path in (folder / "series/pat1").iterdir():
        dicom_edit(path, SpacingBetweenSlices=2.5)


def dicom_without_files(folder: Path) -> None:
    series = folder / "series/pat2"
    for path in series.iterdir():
        path.unlink()
    (series / "README.txt").write_text("the export stopped here")


# --------------------------------------------------------------------------- 2-D images and CSV rows


def add_row(folder: Path, line: str, csv_name: str = "labels.csv") -> None:
    path = folder / csv_name
    path.write_text(path.read_text().rstrip("\n") + "\n" + line + "\n")


def listed_file(folder: Path, name: str, content: bytes) -> None:
    """A file under img/ with ``content``, listed in the CSV as a tumour image."""
    (folder / "img" / name).write_bytes(content)
    add_row(folder, f"img/{name},tumor")


def pickled_npy(folder: Path) -> None:
    np.save(folder / "img/obj.npy", np.array([{"patient": "x"}], dtype=object), allow_pickle=True)
    add_row(folder, "img/obj.npy,tumor")


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_with(width: int, height: int, pixels: bytes) -> bytes:
    """A grey 8-bit PNG with the given header size and raw (filtered) pixel bytes; CRCs valid."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(pixels)) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def replace_column(folder: Path, old: str, new: str, csv_name: str = "labels.csv") -> None:
    path = folder / csv_name
    header, rest = path.read_text().split("\n", 1)
    path.write_text(",".join(new if c == old else c for c in header.split(",")) + "\n" + rest)


def replace_text(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def no_series(folder: Path) -> None:
    """Every series folder gone, and the CSV left with its header only."""
    for series in (folder / "series").iterdir():
        shutil.rmtree(series)
    header_only(folder, "labels.csv")


def header_only(folder: Path, csv_name: str) -> None:
    path = folder / csv_name
    path.write_text(path.read_text().split("\n", 1)[0] + "\n")


def empty_datalist(folder: Path) -> None:
    (folder / "dataset.json").write_text('{"name": "toy", "training": [], "test": []}')


def msd_entry(folder: Path, image: str, label: str) -> None:
    import json

    doc = json.loads((folder / "dataset.json").read_text())
    doc["training"].append({"image": image, "label": label})
    (folder / "dataset.json").write_text(json.dumps(doc))


# --------------------------------------------------------------------------- paths out of the data root


def outside_file(folder: Path, name: str, make: Callable[[Path], object]) -> Path:
    """A file beside (not inside) the site's folder, made by ``make``."""
    target = folder.parent / f"{folder.name}-outside" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    make(target)
    return target


def symlink_out(folder: Path, inside: str, make: Callable[[Path], object]) -> None:
    """Replace ``inside`` (relative to the site folder) by a symlink to a file outside the folder."""
    link = folder / inside
    target = outside_file(folder, link.name, make)
    if link.exists() or link.is_symlink():
        link.unlink()
    os.symlink(target, link)


def symlinked_csv_row(folder: Path) -> None:
    symlink_out(folder, "img/link.png", lambda p: kit.write_png(p, np.zeros((8, 8))))
    add_row(folder, "img/link.png,tumor")


def symlinked_slice(folder: Path) -> None:
    def copy_slice(target: Path) -> None:
        shutil.copy(folder / "series/pat1/slice003.dcm", target)

    symlink_out(folder, "series/pat1/slice003.dcm", copy_slice)


# --------------------------------------------------------------------------- TOML


def edit_toml(toml: Path, change: Callable[[dict[str, Any]], object]) -> None:
    """Parse the site file, apply ``change`` to the document and write it back."""
    doc = tomllib.loads(toml.read_text())
    change(doc)
    kit.write_toml(toml, doc)


def set_key(section: str, key: str, value: Any) -> Callable[[Path], None]:
    """Damage: ``[section].key = value`` in the site file."""

    def damage(folder: Path) -> None:
        edit_toml(folder / "site0.toml", lambda d: d.setdefault(section, {}).__setitem__(key, value))

    return damage

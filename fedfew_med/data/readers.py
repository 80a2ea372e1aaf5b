"""Reading one image file (or DICOM series folder) with the MONAI reader its name calls for.

This is MONAI's ``LoadImaged`` with two differences, both on purpose. ``LoadImage``
tries every registered reader when the chosen one fails, so a DICOM folder that
:class:`~fedfew_med.data.dicom.SeriesDicomReader` rejects (mixed series, uneven
gaps) would be stacked silently by the stock ``PydicomReader``; here each path has
exactly one reader and its error is the error. And ``LoadImage`` builds every
default reader at each construction (logging a GPU-codec warning each time); here
only the five readers below exist.

=====================  ==========================================
path                   reader
=====================  ==========================================
folder                 ``SeriesDicomReader`` (one series, stacked)
``.nii``, ``.nii.gz``  ``NibabelReader``
``.png``               ``PNGReader`` (standard library)
``.npy``, ``.npz``     ``NumpyReader`` (no pickles)
``.jpg``, ``.bmp``...  ``PILReader``, only when Pillow is installed
anything else          ``SeriesDicomReader`` if it is a DICOM file
=====================  ==========================================
"""

from __future__ import annotations

import gzip
import math
import zlib
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from monai.data import ImageReader, MetaTensor, NibabelReader, NumpyReader
from monai.transforms import EnsureChannelFirst, MapTransform
from monai.transforms.io.array import switch_endianness
from monai.utils import ImageMetaKey, optional_import
from nibabel.filebasedimages import ImageFileError

from fedfew_med.data.dicom import SeriesDicomReader
from fedfew_med.data.png import PNGReader
from fedfew_med.site_config import MAX_VOXELS

_PIL_SUFFIXES = (".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


class ReaderSet:
    """One instance of each reader (readers keep state between ``read`` and ``get_data``)."""

    def __init__(self) -> None:
        self.nifti = NibabelReader()
        self.dicom = SeriesDicomReader()
        self.png = PNGReader()
        self.numpy = NumpyReader()
        pil_reader, has_pil = optional_import("monai.data", name="PILReader")
        self.pil: ImageReader | None = pil_reader() if has_pil and optional_import("PIL")[1] else None

    def for_path(self, path: Path) -> ImageReader:
        """The reader for ``path``; ``ValueError`` when there is none."""
        if path.is_dir():
            return self.dicom
        suffix = _suffix(path)
        if suffix in (".nii", ".nii.gz"):
            return self.nifti
        if suffix == ".png":
            return self.png
        if suffix in (".npy", ".npz"):
            return self.numpy
        if suffix in _PIL_SUFFIXES:
            if self.pil is None:
                raise ValueError(
                    f"reading {suffix!r} files needs Pillow, which is not installed; convert them to PNG"
                )
            return self.pil
        if path.is_file() and (suffix == ".dcm" or pydicom.misc.is_dicom(path)):
            return self.dicom
        if not path.exists():
            raise FileNotFoundError(f"no such file or folder: {path}")
        raise ValueError(f"unknown image format {suffix or path.name!r} (not NIfTI, DICOM, PNG or NumPy)")


def _check_gzip(path: Path) -> None:
    """Raise ``ValueError`` saying why when ``path`` is a ``.gz`` file whose stream is corrupt."""
    if not path.name.lower().endswith(".gz"):
        return
    try:
        with gzip.open(path) as fh:
            while fh.read(1 << 20):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"corrupt gzip file ({type(exc).__name__}: {exc})") from None


def read_image(path: str | Path | Sequence[str | Path], readers: ReaderSet) -> MetaTensor:
    """Read one image as a channel-first float32 ``MetaTensor`` (C, *spatial) with its affine.

    Several paths (an MSD entry listing one file per modality) are read by the first
    path's reader and stacked as channels.
    """
    paths = [Path(p) for p in ([path] if isinstance(path, (str, Path)) else path)]
    reader = readers.for_path(paths[0])
    names = [str(p) for p in paths]
    try:
        img = reader.read(names[0] if len(names) == 1 else names)
    except ImageFileError:  # nibabel hides a broken gzip stream behind "cannot work out file type"
        for p in paths:
            _check_gzip(p)
        raise
    if reader is readers.nifti:  # the header's shape, before a byte of voxel data is allocated
        for header_img in img if isinstance(img, list) else [img]:
            shape: tuple[int, ...] = tuple(int(n) for n in getattr(header_img, "shape", ()))
            if math.prod(shape) > MAX_VOXELS:
                raise ValueError(
                    f"the NIfTI header declares shape {shape} ({math.prod(shape):.3g} voxels), "
                    f"more than {MAX_VOXELS}; refusing to allocate it"
                )
    array, meta = reader.get_data(img)
    array = np.asarray(array, dtype=np.float32)  # also makes big-endian data native
    meta = switch_endianness(meta, "<")  # NIfTI headers may be big-endian; torch refuses those arrays
    meta[ImageMetaKey.FILENAME_OR_OBJ] = names[0]
    tensor = MetaTensor.ensure_torch_and_prune_meta(array, meta)
    out = EnsureChannelFirst()(tensor, meta_dict=meta)
    assert isinstance(out, MetaTensor)  # metadata tracking is on: MONAI's default, never switched off here
    return out


class ReadImaged(MapTransform):
    """Dictionary transform: replace the paths under ``keys`` with their images (see :func:`read_image`)."""

    def __init__(self, keys: Sequence[Hashable], readers: ReaderSet | None = None) -> None:
        super().__init__(keys)
        self.readers = readers or ReaderSet()
        self.failure = ""  # the last file that could not be read, and why (shown by repr)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            try:
                out[key] = read_image(out[key], self.readers)
            except Exception as exc:
                first = out[key] if isinstance(out[key], (str, Path)) else out[key][0]
                self.failure = f"{str(first)!r}: {type(exc).__name__}: {exc}"
                raise
        return out

    def __repr__(self) -> str:
        # MONAI re-raises a transform's error as "applying transform <repr>", which is all a
        # caller logging str(exc) sees: name the file that failed (a file that went bad mid-run)
        return f"ReadImaged(cannot read {self.failure})" if self.failure else "ReadImaged()"


def spacing_of(img: torch.Tensor) -> tuple[float, ...]:
    """Voxel size of an image read by :func:`read_image` (1.0 per axis when it has no affine)."""
    if isinstance(img, MetaTensor):
        return tuple(round(float(s), 6) for s in img.pixdim)
    return (1.0,) * (img.ndim - 1)

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

Two NIfTI defects are named here rather than left to the stock errors: a header that
declares more voxel data than the file holds (a truncated file or a lying header:
both sizes and the path are given, where nibabel's own message can stop at "from"),
and a 4th axis of several volumes (time, echoes, diffusion directions), which
MONAI would silently turn into channels. How the latter is read is the site's
choice, ``[preprocessing].volume_4d``: refused (the default), as channels, or by
its first volume.
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
from fedfew_med.site_config import MAX_VOXELS, Volume4D

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


class RefusedVolume(ValueError):
    """A readable image refused for its layout (a 4-D NIfTI under ``volume_4d = "refuse"``)."""


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


def _extra_volumes(shape: tuple[int, ...]) -> int:
    """Volumes along the axes after the three spatial ones of a NIfTI shape (1 for 2-D and 3-D)."""
    return math.prod(shape[3:])


def _short_data(path: Path, image: Any) -> str | None:
    """Why ``path`` cannot hold the voxel data its NIfTI header declares; ``None`` when it can.

    Also ``None`` when the file cannot be measured (a corrupt gzip stream): the reader's
    own error then says more.
    """
    header = image.header
    shape = tuple(int(n) for n in header.get_data_shape())
    dtype = header.get_data_dtype()
    # the proxy's offset is where nibabel reads from (a loaded header may say vox_offset 0)
    offset = int(getattr(image.dataobj, "offset", header.get_data_offset()))
    declared = math.prod(shape) * dtype.itemsize
    compressed = path.name.lower().endswith(".gz")
    try:
        if compressed:
            size = 0
            with gzip.open(path) as fh:
                while chunk := fh.read(1 << 20):
                    size += len(chunk)
        else:
            size = path.stat().st_size
    except (OSError, EOFError, zlib.error):
        return None
    held = max(size - offset, 0)
    if held >= declared:
        return None
    where = f"{path} holds only {held}" + (" once decompressed" if compressed else "")
    return (
        f"truncated file or lying header: the NIfTI header declares shape {shape} of {dtype.name}, "
        f"{declared} bytes of voxel data after its {offset}-byte header, but {where}"
    )


def _named_short_data(images: list[Any], paths: list[Path]) -> None:
    """Raise ``ValueError`` naming the first of ``paths`` that holds less data than its header declares."""
    for image, path in zip(images, paths, strict=True):
        why = _short_data(path, image)
        if why:
            raise ValueError(why) from None


def _nifti_volumes(images: list[Any], paths: list[Path], volume_4d: Volume4D) -> list[Any]:
    """Apply ``volume_4d`` to NIfTI images with several volumes beyond their 3 spatial axes.

    ``"channels"`` leaves them to MONAI (volumes become channels), ``"refuse"`` raises
    :class:`RefusedVolume`, ``"first"`` replaces each by an in-memory image of its first volume.
    """
    out = []
    for image, path in zip(images, paths, strict=True):
        shape = tuple(int(n) for n in image.shape)
        volumes = _extra_volumes(shape)
        if volumes == 1 or volume_4d == "channels":  # (X, Y, Z, 1) is a 3-D image: nothing to choose
            out.append(image)
            continue
        if volume_4d == "refuse":
            what = "image" if len(images) == 1 else f"image file {path.name}"  # which modality of several
            raise RefusedVolume(
                f"{what} is 4-D, shape {shape}: {volumes} volumes beyond its 3 spatial axes (a time series, "
                "echoes, diffusion directions?), and [preprocessing].volume_4d is 'refuse'; set it to "
                "'channels' (each volume one input channel) or 'first' (the first volume only)"
            )
        try:  # all of it, so that a truncated file is caught here as in every other read
            data = np.asanyarray(image.dataobj)
        except (OSError, ValueError):
            _named_short_data([image], [path])
            raise
        first = data[(slice(None),) * 3 + (0,) * (len(shape) - 3)]  # (X, Y, Z)
        out.append(type(image)(first, image.affine, image.header))
    return out


def read_image(
    path: str | Path | Sequence[str | Path], readers: ReaderSet, *, volume_4d: Volume4D = "refuse"
) -> MetaTensor:
    """Read one image as a channel-first float32 ``MetaTensor`` (C, *spatial) with its affine.

    Several paths (an MSD entry listing one file per modality) are read by the first
    path's reader and stacked as channels.

    Parameters
    ----------
    path
        The file, DICOM series folder, or list of files (one per channel).
    readers
        The readers to use (see :class:`ReaderSet`).
    volume_4d
        What to do with a NIfTI file holding several volumes along a 4th axis:
        ``"refuse"`` it, read the volumes as ``"channels"``, or keep the ``"first"``
        volume. Other formats are unaffected (an RGB PNG keeps its 3 channels).

    Raises
    ------
    RefusedVolume
        A 4-D NIfTI with ``volume_4d = "refuse"``.
    ValueError
        A file that declares more than :data:`~fedfew_med.site_config.MAX_VOXELS` voxels,
        or less voxel data than its header declares, among other reader failures.
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
    nifti = reader is readers.nifti
    images: list[Any] = img if isinstance(img, list) else [img]
    if nifti:  # the header's shape, before a byte of voxel data is allocated
        for header_img in images:
            shape: tuple[int, ...] = tuple(int(n) for n in getattr(header_img, "shape", ()))
            if math.prod(shape) > MAX_VOXELS:
                raise ValueError(
                    f"the NIfTI header declares shape {shape} ({math.prod(shape):.3g} voxels), "
                    f"more than {MAX_VOXELS}; refusing to allocate it"
                )
        images = _nifti_volumes(images, paths, volume_4d)
        img = images if isinstance(img, list) else images[0]
    try:
        array, meta = reader.get_data(img)
    except (OSError, ValueError):
        if nifti:
            _named_short_data(images, paths)
        raise
    array = np.asarray(array, dtype=np.float32)  # also makes big-endian data native
    meta = switch_endianness(meta, "<")  # NIfTI headers may be big-endian; torch refuses those arrays
    meta[ImageMetaKey.FILENAME_OR_OBJ] = names[0]
    tensor = MetaTensor.ensure_torch_and_prune_meta(array, meta)
    out = EnsureChannelFirst()(tensor, meta_dict=meta)
    assert isinstance(out, MetaTensor)  # metadata tracking is on: MONAI's default, never switched off here
    return out


class ReadImaged(MapTransform):
    """Dictionary transform: replace the paths under ``keys`` with their images (see :func:`read_image`)."""

    def __init__(
        self, keys: Sequence[Hashable], readers: ReaderSet | None = None, *, volume_4d: Volume4D = "refuse"
    ) -> None:
        super().__init__(keys)
        self.readers = readers or ReaderSet()
        self.volume_4d: Volume4D = volume_4d  # see read_image
        self.failure = ""  # the last file that could not be read, and why (shown by repr)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            try:
                out[key] = read_image(out[key], self.readers, volume_4d=self.volume_4d)
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

"""DICOM series folders stacked into volumes whose geometry can be trusted.

MONAI's ``PydicomReader`` stacks a folder's slices in ``InstanceNumber`` order,
silently skips slices without it, and stacks whatever the folder holds: several
series, localisers at different angles, series with missing slices. Each of those
gives a volume whose affine (taken from the first and last slice) is wrong for
some voxels. :class:`SeriesDicomReader` keeps ``PydicomReader``'s decoding and
affine (LPS → RAS, ``swap_ij``) but orders slices by their position along the
slice normal and refuses a folder that is not one evenly spaced stack.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from monai.data import PydicomReader
from monai.utils import MetaKeys, ensure_tuple

_RELATIVE_GAP_TOLERANCE = 0.01  # slice gaps may differ from their mean by 1 %
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def series_files(folder: Path) -> list[Path]:
    """The DICOM files of a series folder, sorted by name (``DICOMDIR`` and hidden files left out)."""
    files = [
        p
        for p in sorted(folder.iterdir())
        if p.is_file()
        and not p.name.startswith(".")
        and p.name.upper() != "DICOMDIR"
        and pydicom.misc.is_dicom(p)
    ]
    if not files:
        raise ValueError(f"no DICOM files in series folder {folder.name!r}")
    return files


def _geometry(slices: Sequence[Any], names: Sequence[str]) -> np.ndarray:
    """Check that ``slices`` form one evenly spaced stack; return the stacking order."""
    uids = sorted({str(getattr(s, "SeriesInstanceUID", "")) for s in slices})
    if len(uids) > 1:
        raise ValueError(
            f"the folder mixes {len(uids)} DICOM series (SeriesInstanceUID differs); keep one series per folder"
        )
    no_pixels = [n for s, n in zip(slices, names, strict=True) if not any(t in s for t in _PIXEL_TAGS)]
    if no_pixels:
        raise ValueError(f"slice {Path(no_pixels[0]).name} has no pixel data (no PixelData element)")
    for tag in ("ImagePositionPatient", "ImageOrientationPatient"):
        missing = [n for s, n in zip(slices, names, strict=True) if tag not in s]
        if missing:
            raise ValueError(f"slice {Path(missing[0]).name} has no {tag}, so the series cannot be stacked")
    orientations = np.array([[float(v) for v in s.ImageOrientationPatient] for s in slices])
    if not np.allclose(orientations, orientations[0], atol=1e-4):
        raise ValueError("slices have different ImageOrientationPatient (a localiser or a mixed folder?)")
    shapes = {(int(s.Rows), int(s.Columns)) for s in slices}
    if len(shapes) > 1:
        raise ValueError(f"slices have different sizes {sorted(shapes)}")
    spacings = np.array([[float(v) for v in s.get("PixelSpacing", (1.0, 1.0))] for s in slices])
    if not np.allclose(spacings, spacings[0], rtol=1e-4):
        raise ValueError("slices have different PixelSpacing")
    normal = np.cross(orientations[0, :3], orientations[0, 3:])  # (3,) slice normal in LPS
    depth = np.array([[float(v) for v in s.ImagePositionPatient] for s in slices]) @ normal
    order = np.argsort(depth, kind="stable")
    gaps = np.diff(depth[order])
    if np.any(gaps < 1e-3):
        raise ValueError("two slices share one position (duplicated slices or several series in one folder)")
    if np.any(np.abs(gaps - gaps.mean()) > _RELATIVE_GAP_TOLERANCE * gaps.mean()):
        raise ValueError(
            f"slice gaps are uneven (from {gaps.min():.4g} to {gaps.max():.4g} mm): missing slices?"
        )
    # even gaps can still hide missing slices (every other one gone, or 3 slices minus the middle):
    # the scanner's own SpacingBetweenSlices, when every slice states the same one, must match
    stated = {round(float(s.SpacingBetweenSlices), 6) for s in slices if "SpacingBetweenSlices" in s}
    if len(stated) == 1 and all("SpacingBetweenSlices" in s for s in slices):
        spacing = abs(stated.pop())
        if spacing > 0 and abs(gaps.mean() - spacing) > _RELATIVE_GAP_TOLERANCE * spacing:
            raise ValueError(
                f"slices are {gaps.mean():.4g} mm apart but SpacingBetweenSlices is {spacing:.4g} mm: "
                "missing slices?"
            )
    return order


class SeriesDicomReader(PydicomReader):
    """``PydicomReader`` for one series per folder, ordered by position, checked for consistency.

    A folder with a single slice gives a 2-D image; a single file is read as is.
    Unreadable slices raise instead of being skipped.
    """

    def read(self, data: Sequence[Any] | Any, **kwargs: Any) -> Any:
        """Read a series folder (or delegate single files to ``PydicomReader``)."""
        names = ensure_tuple(data)
        if len(names) != 1 or not Path(f"{names[0]}").is_dir():
            return super().read(data, **kwargs)
        files = series_files(Path(f"{names[0]}"))
        slices = [pydicom.dcmread(f, **{**self.kwargs, **kwargs}) for f in files]
        self.has_series = len(slices) > 1
        if self.has_series:
            self.filenames = [[str(f) for f in files]]  # type: ignore[list-item]  # MONAI's layout for a series
            return slices
        self.filenames = [str(files[0])]
        return slices[0]

    def _combine_dicom_series(
        self, data: Iterable[Any], filenames: Sequence[Any]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        # same outputs as PydicomReader's, with slices ordered along the normal and checked first
        data = list(data)
        names = [str(f) for f in filenames]
        order = _geometry(data, names)
        ordered = [(data[i], names[i]) for i in order]
        stack = np.stack([self._get_array_data(ds, name) for ds, name in ordered], axis=-1)
        if stack.ndim != 3:
            raise ValueError(
                f"only single-channel slices stack into a volume, got slices of shape {stack.shape[:-1]}"
            )
        first, last = ordered[0][0], ordered[-1][0]
        meta = self._get_meta_dict(first)
        first_pos = np.array([float(v) for v in first.ImagePositionPatient])
        last_pos = np.array([float(v) for v in last.ImagePositionPatient])
        gap = float(np.linalg.norm(last_pos - first_pos)) / (len(ordered) - 1)
        meta["spacing"] = np.array([*(float(v) for v in first.get("PixelSpacing", (1.0, 1.0))), gap])
        meta["lastImagePositionPatient"] = last_pos
        meta[MetaKeys.SPATIAL_SHAPE] = stack.shape[:2] + (len(ordered),)
        return stack, meta

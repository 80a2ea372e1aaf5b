"""The voxel size of the grid a site's segmentation metrics are computed on, when it is known in mm.

The site pipeline (:mod:`fedfew_med.data.transforms`) reads an image, reorients it, may resample
it to ``[preprocessing].spacing``, may crop it to its foreground, and then resizes it to
``[preprocessing].spatial_size`` (or pads it, when the site trains on patches); the model's
prediction and the reference mask live on that last grid, so a Hausdorff distance counted in
pixels there is in units of *that* grid's voxel size, which differs per axis and, after a resize,
per image. The run keeps only plain tensors (``EnsureTyped(track_meta=False)``), so
:func:`grid_spacing` replays the site's deterministic transforms on every test record with MONAI's
metadata tracking on and reads the voxel size (``MetaTensor.pixdim``, updated by every
spatial transform) that comes out.

Only NIfTI and DICOM images carry a physical voxel size (mm); PNG, other 2-D formats, NumPy
arrays and the synthetic federation do not, so their distances stay in pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import MetaTensor
from monai.transforms import Compose

from fedfew_med.data import SiteData
from fedfew_med.data.native import stored_records
from fedfew_med.data.readers import ReaderSet
from fedfew_med.data.transforms import deterministic_transforms
from fedfew_med.site_config import load_site_config


@dataclass(frozen=True)
class GridSpacing:
    """Voxel size of each test case's grid, or why it is not known in mm.

    Attributes
    ----------
    spacing
        (N, D) mm per spatial axis for each test case (in the order the run predicts them), or
        None when not known.
    note
        One sentence for a reader: where the mm come from, or why distances stay in pixels.
    """

    spacing: np.ndarray | None
    note: str

    @property
    def unit(self) -> str:
        """``"mm"`` when :attr:`spacing` is known, else ``"pixels"``."""
        return "mm" if self.spacing is not None else "pixels"


def _physical(path: Any, readers: ReaderSet) -> bool:
    """True when ``path`` is read by the NIfTI or the DICOM reader (images with a voxel size in mm)."""
    if not isinstance(path, str | Path):
        return False
    reader = readers.for_path(Path(path))
    return reader is readers.nifti or reader is readers.dicom


def grid_spacing(site: SiteData) -> GridSpacing:
    """The voxel size (mm) of the grid each of ``site``'s test cases is scored on, if it is known.

    Parameters
    ----------
    site
        A site of a run (``Run.site_data[name]``).

    Returns
    -------
    GridSpacing
        ``spacing`` is None (with the reason in ``note``) for the synthetic federation, for sites
        whose images have no physical voxel size (PNG and other 2-D formats, NumPy), and when the
        site's records cannot be replayed.
    """
    site_file = site.metadata.get("site_file")
    if not site_file or site.spatial_dims == 0:
        return GridSpacing(None, "distances are in pixels: these images have no physical voxel size (synthetic data)")
    records = stored_records(site)
    if records is None:
        return GridSpacing(None, "distances are in pixels: the voxel size of the test images could not be recovered")
    readers = ReaderSet()
    if not records or not all(_physical(r["image"], readers) for r in records):
        return GridSpacing(None, f"distances are in pixels: {site.metadata.get('source', 'these')} images "
                                 "(e.g. PNG) carry no physical voxel size")
    cfg = load_site_config(site_file)
    replay = Compose(deterministic_transforms(cfg, readers))  # the cached prefix, with metadata tracking on
    per_record = []
    for rec in records:
        image = replay(dict(rec))["image"]
        if not isinstance(image, MetaTensor):
            return GridSpacing(None, "distances are in pixels: the test images lost their voxel size in preprocessing")
        per_record.append([float(v) for v in image.pixdim][: site.spatial_dims])
    spacing = np.asarray(per_record, dtype=np.float64)  # (N cases, D): a case is an image (a patch site's put together)
    distinct = np.unique(spacing.round(4), axis=0)
    size = " x ".join(f"{v:.3g}" for v in distinct[0]) + " mm" if len(distinct) == 1 else f"{len(distinct)} different voxel sizes"
    return GridSpacing(spacing, f"distances are in mm on the grid the model sees after preprocessing ({size}; "
                                "read from the NIfTI/DICOM headers through the site's resampling and resizing)")

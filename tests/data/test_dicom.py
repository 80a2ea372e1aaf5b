"""DICOM series: stacked volumes checked voxel by voxel against the geometry written, and real series."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from monai.data import MetaTensor
from monai.transforms import Orientation
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_rescale

from fedfew_med.data.readers import ReaderSet, read_image
from tests.data.sitekit import coded_volume, write_series

Vec = tuple[float, float, float]
ROWS, COLS, SLICES = 6, 5, 4
_C, _S = np.cos(np.radians(30)), np.sin(np.radians(30))
GEOMETRIES = {  # row direction, column direction (LPS), as ImageOrientationPatient
    "axial": ((1, 0, 0), (0, 1, 0)),
    "sagittal": ((0, 1, 0), (0, 0, -1)),
    "coronal": ((1, 0, 0), (0, 0, -1)),
    "oblique": ((_C, _S, 0), (-_S, _C, 0)),
}
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests"


def world_lps(img: MetaTensor, index: np.ndarray) -> np.ndarray:
    """LPS millimetres of voxel indices (N, 3) through the image's RAS affine."""
    affine = np.asarray(img.affine, dtype=np.float64)
    ras = (affine[:3, :3] @ index.T).T + affine[:3, 3]
    return ras * np.array([-1, -1, 1])


def expected_lps(
    values: np.ndarray, origin: Vec, row_dir: Vec, col_dir: Vec, spacing: tuple[float, float], gap: float
) -> np.ndarray:
    """Where the DICOM geometry puts the voxel that holds each coded value (see coded_volume)."""
    k, r, c = values // 256, (values % 256) // 16, values % 16
    normal = np.cross(row_dir, col_dir)
    return (
        np.asarray(origin)
        + np.outer(k * gap, normal)
        + np.outer(c * spacing[1], row_dir)
        + np.outer(r * spacing[0], col_dir)
    )


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("order", ["in order", "shuffled", "reversed"])
def test_stacked_series_matches_the_written_geometry(tmp_path: Path, geometry: str, order: str) -> None:
    row_dir, col_dir = GEOMETRIES[geometry]
    write_order = {"in order": [0, 1, 2, 3], "shuffled": [2, 0, 3, 1], "reversed": [3, 2, 1, 0]}[order]
    origin, spacing, gap = (-12.5, 30.0, 7.25), (0.8, 0.6), 2.5
    write_series(
        tmp_path / "s",
        coded_volume(ROWS, COLS, SLICES),
        origin=origin,
        row_dir=row_dir,
        col_dir=col_dir,
        pixel_spacing=spacing,
        gap=gap,
        order=write_order,
    )
    raw = read_image(tmp_path / "s", ReaderSet())
    for img in (raw, Orientation("RAS", labels=None)(raw)):
        assert img.shape[0] == 1 and sorted(img.shape[1:]) == sorted((ROWS, COLS, SLICES))
        index = np.argwhere(np.ones(img.shape[1:], dtype=bool))  # every voxel
        values = img[0].numpy()[tuple(index.T)].astype(np.int64)
        np.testing.assert_allclose(
            world_lps(img, index.astype(np.float64)),
            expected_lps(values, origin, row_dir, col_dir, spacing, gap),
            atol=1e-4,
        )
        assert sorted(np.round(np.asarray(img.pixdim), 6)) == sorted([*spacing, gap])
    oriented = Orientation("RAS", labels=None)(raw)
    if geometry != "oblique":  # axis-aligned: RAS orientation leaves a positive diagonal
        direction = np.asarray(oriented.affine)[:3, :3]
        assert np.allclose(direction, np.diag(np.diag(direction))) and (np.diag(direction) > 0).all()


def test_real_ct_series_geometry_matches_its_tags() -> None:
    """pydicom's CT5N: five axial slices, instance numbers rising while z falls, 2.5 mm apart."""
    folder = TEST_FILES / "98892001" / "CT5N"
    img = read_image(folder, ReaderSet())
    assert tuple(img.shape) == (1, 16, 16, 5)
    np.testing.assert_allclose(np.asarray(img.pixdim), [0.488281, 0.488281, 2.5], atol=1e-6)
    volume = img[0].numpy()
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        hounsfield = apply_rescale(ds.pixel_array, ds).T.astype(np.float32)  # pydicom's own modality LUT
        matches = [k for k in range(5) if np.array_equal(volume[:, :, k], hounsfield)]
        assert len(matches) == 1, path.name
        corner = world_lps(img, np.array([[0.0, 0.0, float(matches[0])]]))[0]
        np.testing.assert_allclose(corner, [float(v) for v in ds.ImagePositionPatient], atol=1e-4)


@pytest.mark.parametrize(
    ("folder", "message"),
    [
        ("77654033/CT2", "slice gaps are uneven"),  # instances 18, 180, 181, 182: a gap of 202 mm
        ("98892003/MR700", "different ImageOrientationPatient"),  # a radial localiser
        ("98892001/CT2N", "different ImageOrientationPatient"),  # two scout views
        ("98892003/MR1", "mixes 3 DICOM series"),
    ],
)
def test_real_folders_that_are_not_one_volume_are_refused(folder: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_image(TEST_FILES / folder, ReaderSet())


def test_real_single_files_read_as_2d_images() -> None:
    for name, size, spacing in (("CT_small.dcm", 128, 0.661468), ("MR_small.dcm", 64, 0.3125)):
        img = read_image(get_testdata_file(name), ReaderSet())
        assert tuple(img.shape) == (1, size, size)
        np.testing.assert_allclose(np.asarray(img.pixdim), [spacing, spacing], atol=1e-6)
        ds = pydicom.dcmread(get_testdata_file(name))
        np.testing.assert_array_equal(img[0].numpy(), apply_rescale(ds.pixel_array, ds).T)


def test_duplicate_slices_are_refused(tmp_path: Path) -> None:
    write_series(
        tmp_path / "s",
        coded_volume(4, 4, 2),
        origin=(0, 0, 0),
        row_dir=(1, 0, 0),
        col_dir=(0, 1, 0),
        pixel_spacing=(1, 1),
        gap=0.0,
    )
    with pytest.raises(ValueError, match="two slices share one position"):
        read_image(tmp_path / "s", ReaderSet())

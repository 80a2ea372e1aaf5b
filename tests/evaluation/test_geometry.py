"""The voxel size of the metric's grid, against hand computations from known affines and sizes."""

from __future__ import annotations

import numpy as np
import pytest

from fedfew_med.data.sites import load_site
from fedfew_med.evaluation import grid_spacing
from tests.data import sitekit


def test_nifti_site_resized_grid_spacing_by_hand(tmp_path):
    # sitekit.AFFINE: 1.5 x 1.5 x 2.0 mm voxels (LAS: RAS reorientation flips x, keeps the axis order);
    # (10, 10, 6) voxels resized to spatial_size (8, 8, 4): 10 * 1.5 / 8, 10 * 1.5 / 8, 6 * 2.0 / 4
    site = load_site(sitekit.nifti_seg_site(tmp_path, n=6))
    got = grid_spacing(site)
    assert got.unit == "mm" and got.spacing is not None
    assert got.spacing.shape == (site.size("test"), 3)
    np.testing.assert_allclose(got.spacing, [[1.875, 1.875, 3.0]] * site.size("test"), rtol=1e-6)
    assert "1.88 x 1.88 x 3 mm" in got.note


def test_reoriented_axes_take_their_own_voxel_size(tmp_path):
    # array axis 0 runs along y (1.5 mm), axis 1 along x (2.0 mm), axis 2 along z (3.0 mm);
    # RAS puts x first: (12, 10, 6) voxels of 2.0 x 1.5 x 3.0 mm, resized to (8, 8, 4)
    affine = np.array([[0, 2.0, 0, 0], [1.5, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]])
    for i in range(6):
        image = np.random.default_rng(i).normal(size=(10, 12, 6)).astype(np.float32)
        mask = np.zeros((10, 12, 6), dtype=np.uint8)
        mask[2:6, 3:8, 1:4] = 1
        sitekit.write_nifti(tmp_path / "imagesTr" / f"case{i}.nii.gz", image, affine)
        sitekit.write_nifti(tmp_path / "labelsTr" / f"case{i}.nii.gz", mask, affine)
    doc = sitekit.site_doc("nifti_folder", "segmentation", spatial_size=(8, 8, 4))
    site = load_site(sitekit.write_toml(tmp_path / "site0.toml", doc))
    got = grid_spacing(site)
    assert got.spacing is not None
    np.testing.assert_allclose(got.spacing[0], [12 * 2.0 / 8, 10 * 1.5 / 8, 6 * 3.0 / 4], rtol=1e-6)


def test_patches_keep_the_resampled_spacing(tmp_path):
    # patches are cut from the image resampled to [preprocessing].spacing: no resize after it
    path = sitekit.nifti_seg_site(tmp_path, n=6, preprocessing={"spatial_size": [4, 4, 2], "spacing": [3.0, 3.0, 3.0],
                                                                "patches_per_image": 2})
    site = load_site(path)
    got = grid_spacing(site)
    volumes = len(site.splits["test"].base)  # type: ignore[attr-defined]
    assert site.size("test") > volumes  # tiles
    assert got.spacing is not None and len(got.spacing) == volumes  # one row per scored case: a whole volume
    np.testing.assert_allclose(got.spacing, 3.0, rtol=1e-6)


@pytest.mark.parametrize("kind", ["png", "synthetic"])
def test_images_without_a_voxel_size_stay_in_pixels(tmp_path, kind):
    if kind == "png":
        site = load_site(sitekit.png_site(tmp_path, n=12))
    else:
        from fedfew_med.data import SyntheticOptions, make_synthetic_federation

        site = make_synthetic_federation(SyntheticOptions(num_sites=1, image_size=16, train_min=4, train_max=4,
                                                          test_per_site=2, task="segmentation"))[0]
    got = grid_spacing(site)
    assert got.spacing is None and got.unit == "pixels" and got.note.startswith("distances are in pixels")

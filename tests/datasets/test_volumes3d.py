"""3-D federations: synthetic NIfTI sites (grids, validation, determinism, an end-to-end run) and the
single-subject mricron smoke test (skipped when the Debian package mricron-data is not installed)."""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedfew_med.cli import main
from fedfew_med.config import load_federation
from fedfew_med.data.validate import validate_site
from fedfew_med.datasets import prepare_volumes3d
from fedfew_med.datasets.mricron import (
    APT_PACKAGE,
    DEFAULT_ROOT,
    LABEL_NAMES,
    collapse_aal,
    prepare_mricron_smoke,
    resample,
)
from fedfew_med.datasets.volumes3d import PROTOCOLS, grid_affine, sample_scene, voxel_centres

# 4 sites (every protocol), 3 small volumes each: 24 x 24 x 24 mm = 16^3 voxels at the target 1.5 mm
TINY = {"num_sites": 4, "volumes_per_site": 3, "seed": 5, "field_of_view_mm": (24.0, 24.0, 24.0), "rounds": 1}
HAVE_MRICRON = (DEFAULT_ROOT / "ch2.nii.gz").is_file() and (DEFAULT_ROOT / "aal.nii.gz").is_file()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_volumes3d(tmp_path_factory.mktemp("v3d") / "a", **TINY)


def tree_digest(root: Path) -> str:
    """SHA-256 of every file below root (relative path and bytes)."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_every_site_validates(prepared):
    for site_file in prepared.site_files:
        report = validate_site(site_file)
        assert report.ok, report.format()
        splits = report.summary["splits"]
        assert sum(splits.values()) == 3 and splits["train"] >= 1 and splits["test"] >= 1


def test_grids_differ_per_site_as_the_protocols_say(prepared):
    for i, site_file in enumerate(prepared.site_files):
        protocol = PROTOCOLS[i]
        for case in sorted((prepared.out_dir / site_file.stem / "imagesTr").glob("*.nii.gz")):
            image = nib.load(case)
            label = nib.load(prepared.out_dir / site_file.stem / "labelsTr" / case.name)
            assert "".join(nib.aff2axcodes(image.affine)) == protocol.orientation
            np.testing.assert_allclose(image.header.get_zooms(), protocol.spacing)
            np.testing.assert_array_equal(label.affine, image.affine)
            # every grid covers the same 24 mm box centred on the world origin
            extent = np.abs(image.affine[:3, :3]) @ np.asarray(image.shape, dtype=np.float64)
            np.testing.assert_allclose(extent, [24.0, 24.0, 24.0])
            centre = image.affine @ np.r_[(np.asarray(image.shape) - 1) / 2.0, 1.0]
            np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)
            assert set(np.unique(np.asarray(label.dataobj)).tolist()) <= {0, 1}
    shapes = {nib.load(next((prepared.out_dir / f.stem / "imagesTr").glob("*"))).shape for f in prepared.site_files}
    assert shapes == {(16, 16, 16), (24, 24, 8), (12, 12, 16)}  # A and B share a shape; C is anisotropic


def test_intensity_scale_and_lesion_contrast_differ(prepared):
    meta = prepared.metadata["sites"]
    medians = []
    for name in meta:
        image = np.asarray(nib.load(prepared.out_dir / name / "imagesTr" / "case_000.nii.gz").dataobj)
        medians.append(float(np.median(image)))
    assert medians[1] > 50 * medians[0] and medians[3] > 50 * medians[2]  # B and D store scanner-like units
    signs = [np.sign(meta[n]["protocol"]["lesion_contrast"]) for n in meta]
    assert signs == [1, 1, -1, -1]


def test_the_same_scene_on_a_flipped_grid_is_the_flipped_array():
    rng = np.random.default_rng(0)
    from fedfew_med.datasets.volumes3d import draw_scene

    scene = draw_scene((30.0, 30.0, 24.0), rng)
    ras, shape = grid_affine(orientation="RAS", spacing=(1.5, 1.5, 1.5), field_of_view_mm=(30.0, 30.0, 24.0))
    las, _ = grid_affine(orientation="LAS", spacing=(1.5, 1.5, 1.5), field_of_view_mm=(30.0, 30.0, 24.0))
    lps, _ = grid_affine(orientation="LPS", spacing=(1.5, 1.5, 1.5), field_of_view_mm=(30.0, 30.0, 24.0))
    a = sample_scene(scene, voxel_centres(ras, shape), lesion_contrast=0.3)
    b = sample_scene(scene, voxel_centres(las, shape), lesion_contrast=0.3)
    c = sample_scene(scene, voxel_centres(lps, shape), lesion_contrast=0.3)
    assert a[1].sum() > 0
    np.testing.assert_array_equal(b[1], a[1][::-1])
    np.testing.assert_allclose(b[0], a[0][::-1], atol=1e-12)
    np.testing.assert_array_equal(c[1], a[1][::-1, ::-1])


def test_same_seed_same_bytes_other_seed_other_data(prepared, tmp_path):
    again = prepare_volumes3d(tmp_path / "b", **TINY)
    assert tree_digest(again.out_dir) == tree_digest(prepared.out_dir)
    other = prepare_volumes3d(tmp_path / "c", **{**TINY, "seed": 6})
    assert tree_digest(other.out_dir) != tree_digest(prepared.out_dir)


def test_site_and_federation_files(prepared):
    site = tomllib.loads(prepared.site_files[0].read_text())
    assert site["source"] == {"kind": "nifti_folder", "root": "site0", "images": "imagesTr", "labels": "labelsTr"}
    assert site["labels"]["names"] == ["background", "lesion"]
    pre = site["preprocessing"]
    assert pre["orientation"] == "RAS" and pre["spacing"] == [1.5, 1.5, 1.5]
    assert pre["spatial_size"] == [16, 16, 16] and pre["patches_per_image"] > 0
    cfg = load_federation(prepared.federation_file)
    assert cfg.model.name == "unet" and cfg.algorithm.name == "fedfew" and cfg.algorithm.params["k"] == 2
    assert "SYNTHETIC" in prepared.federation_file.read_text()
    meta = json.loads((prepared.out_dir / "partition.json").read_text())
    assert meta["source"].startswith("synthetic") and len(meta["sites"]) == 4
    assert "Synthetic data, not a benchmark" in (prepared.out_dir / "README.md").read_text()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_sites": 0}, "num_sites must be an integer >= 1, got 0"),
        ({"volumes_per_site": 2}, "volumes_per_site must be an integer >= 3"),
        ({"patch_size": (16, 16)}, "patch_size must be 3 integers"),
    ],
)
def test_bad_arguments_say_what_must_hold(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        prepare_volumes3d(tmp_path / "x", **kwargs)


def test_checked_in_federation_points_at_the_prepared_sites():
    path = Path(__file__).parents[2] / "site_configs" / "volumes3d_federation.toml"
    text = path.read_text()
    doc = tomllib.loads(text)
    assert doc["model"]["name"] == "unet" and doc["algorithm"]["params"]["k"] == 2
    assert doc["data"]["params"]["files"] == [f"../data/volumes3d/site{i}.toml" for i in range(4)]
    assert "datasets prepare volumes3d" in text and "synthetic" in text.lower()


def test_simulate_one_round_end_to_end(tmp_path, capsys):
    """2 sites x 3 volumes, 3-D UNet, FedFew K = 2, random patches for training, grid patches for testing."""
    prepared = prepare_volumes3d(tmp_path / "fed", **{**TINY, "num_sites": 2})
    run_dir = tmp_path / "run"
    args = ["simulate", str(prepared.federation_file), "-o", str(run_dir), "-q",
            "--set", "run.rounds=1"]
    assert main(args) == 0, capsys.readouterr().err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metric"] == "dice" and summary["num_models"] == 2
    assert sorted(summary["per_site"]) == ["site0", "site1"]
    for row in summary["per_site"].values():
        assert math.isfinite(row["metric"]) and 0.0 <= row["metric"] <= 1.0


# ---------------------------------------------------------------------------- mricron smoke test


def test_aal_names_collapse_to_cerebrum_and_cerebellum():
    text = "1 Precentral_L 2001\n2 Precentral_R 2002\n\n91 Cerebelum_Crus1_L 9001\n116 Vermis_10 9170\n"
    lut, members = collapse_aal(text)
    assert lut.shape == (117,) and lut[1] == lut[2] == 1 and lut[91] == lut[116] == 2 and lut[50] == 0
    assert members == {"cerebrum": ["Precentral_L", "Precentral_R"], "cerebellum": ["Cerebelum_Crus1_L", "Vermis_10"]}
    with pytest.raises(ValueError, match="line 1 must be"):
        collapse_aal("Precentral_L 1\n")


def test_resample_on_the_source_grid_is_the_identity():
    rng = np.random.default_rng(1)
    volume = rng.integers(0, 3, size=(6, 7, 5)).astype(np.float64)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-3.0, 4.0, 1.0]
    points = voxel_centres(affine, volume.shape)
    np.testing.assert_array_equal(resample(volume, affine, points, order=0), volume)
    np.testing.assert_allclose(resample(volume, affine, points, order=1), volume)


def test_missing_mricron_data_says_how_to_install_it(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=f"apt-get install {APT_PACKAGE}"):
        prepare_mricron_smoke(tmp_path / "out", root=tmp_path)
    code = main(["datasets", "prepare", "volumes3d", "--source", "mricron", "--root", str(tmp_path),
                 "--out", str(tmp_path / "out2")])
    assert code == 2 and f"apt-get install {APT_PACKAGE}" in capsys.readouterr().err


@pytest.mark.skipif(not HAVE_MRICRON, reason=f"the Debian package {APT_PACKAGE} is not installed")
def test_mricron_smoke_sites_validate_and_carry_the_atlas(tmp_path):
    prepared = prepare_mricron_smoke(tmp_path / "m", num_sites=2, volumes_per_site=3, seed=0, max_rotation_deg=0.0)
    for site_file in prepared.site_files:
        report = validate_site(site_file)
        assert report.ok, report.format()
    assert "SINGLE-SUBJECT SMOKE TEST" in prepared.federation_file.read_text()
    assert "SINGLE-SUBJECT SMOKE TEST" in (prepared.out_dir / "README.md").read_text()
    assert tomllib.loads(prepared.site_files[0].read_text())["labels"]["names"] == list(LABEL_NAMES)
    # site0 is RAS at 2 mm with no rotation: its label voxels are the atlas's at those world points
    atlas = nib.load(DEFAULT_ROOT / "aal.nii.gz")
    lut, _ = collapse_aal((DEFAULT_ROOT / "aal.nii.txt").read_text())
    view = nib.load(prepared.out_dir / "site0" / "labelsTr" / "view_000.nii.gz")
    assert "".join(nib.aff2axcodes(view.affine)) == "RAS"
    ijk = np.argwhere(np.ones(view.shape, dtype=bool))[::97]  # a sample of voxels
    world = ijk @ view.affine[:3, :3].T + view.affine[:3, 3]
    src = np.rint(world @ np.linalg.inv(atlas.affine)[:3, :3].T + np.linalg.inv(atlas.affine)[:3, 3]).astype(int)
    inside = ((src >= 0) & (src < np.asarray(atlas.shape))).all(axis=1)
    expected = np.zeros(len(ijk), dtype=np.uint8)
    expected[inside] = lut[np.asarray(atlas.dataobj)[tuple(src[inside].T)]]
    np.testing.assert_array_equal(np.asarray(view.dataobj)[tuple(ijk.T)], expected)
    assert 1 in np.unique(np.asarray(view.dataobj))  # the box lies in the brain
    site1 = nib.load(prepared.out_dir / "site1" / "imagesTr" / "view_000.nii.gz")
    assert "".join(nib.aff2axcodes(site1.affine)) == "LAS"
    np.testing.assert_allclose(site1.header.get_zooms(), (2.5, 2.5, 2.5))

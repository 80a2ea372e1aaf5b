"""Every kind of broken site is reported by file, and load_site refuses it with the same message."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from fedfew_med.data.sites import SiteValidationError, load_site
from fedfew_med.data.validate import AFFINE_AXIS_RTOL, AFFINE_ORIGIN_TOL_MM, validate_site
from tests.data import sitekit as kit

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests"


def _append_csv(path: Path, line: str) -> None:
    path.write_text(path.read_text().rstrip("\n") + "\n" + line + "\n")


def _replace_csv(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new, 1))


def _nifti(folder: Path, name: str, array: np.ndarray) -> None:
    kit.write_nifti(folder / name, array)


def _moved_label(folder: Path, name: str, *, shift_mm: float = 0.0, z_scale: float = 1.0) -> None:
    """Rewrite mask ``name`` unchanged but for its affine: origin moved along x, slice spacing scaled."""
    affine = kit.AFFINE.copy()
    affine[0, 3] += shift_mm
    affine[2, 2] *= z_scale
    kit.write_nifti(folder / name, np.asarray(nib.load(folder / name).dataobj), affine)


def _with_split_column(folder: Path, values: list[str]) -> None:
    rows = [line.split(",") for line in (folder / "labels.csv").read_text().splitlines()]
    lines = [",".join([*rows[0], "fold"])] + [
        ",".join([*r, values[i % len(values)]]) for i, r in enumerate(rows[1:])
    ]
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    toml = folder / "site0.toml"
    toml.write_text(
        toml.read_text().replace('csv = "labels.csv"', 'csv = "labels.csv"\nsplit_column = "fold"')
    )


SHAPE = (10, 10, 6)


def _with_nan(count: int) -> np.ndarray:
    volume = np.zeros(SHAPE, np.float32)
    volume.flat[:count] = np.nan
    return volume


# (case, site maker, break it, file named in the problem, message)
CASES: list[tuple[str, Callable[..., Path], Callable[[Path], None], str, str]] = [
    (
        "corrupt nifti",
        kit.nifti_seg_site,
        lambda f: (f / "imagesTr/case1.nii.gz").write_bytes(b"\x1f\x8b not a volume"),
        "imagesTr/case1.nii.gz",
        "cannot read",
    ),
    (
        "label shape",
        kit.nifti_seg_site,
        lambda f: _nifti(f, "labelsTr/case2.nii.gz", np.zeros((10, 10, 5), np.uint8)),
        "labelsTr/case2.nii.gz",
        "label shape (10, 10, 5) differs from image shape (10, 10, 6)",
    ),
    (
        "label outside map",
        kit.nifti_seg_site,
        lambda f: _nifti(f, "labelsTr/case0.nii.gz", np.full(SHAPE, 3, np.uint8)),
        "labelsTr/case0.nii.gz",
        "label values [3] are outside the label map 0..1 (no_tumor, tumor)",
    ),
    (
        "label not integer",
        kit.nifti_seg_site,
        lambda f: _nifti(f, "labelsTr/case0.nii.gz", np.full(SHAPE, 0.5, np.float32)),
        "labelsTr/case0.nii.gz",
        "label has non-integer values",
    ),
    (
        "label channels",
        kit.nifti_seg_site,
        lambda f: _nifti(f, "labelsTr/case0.nii.gz", np.zeros((*SHAPE, 2), np.uint8)),
        "labelsTr/case0.nii.gz",
        "label has 2 channels, expected 1",
    ),
    (
        "label origin just past the tolerance",
        kit.nifti_seg_site,
        lambda f: _moved_label(f, "labelsTr/case3.nii.gz", shift_mm=2 * AFFINE_ORIGIN_TOL_MM),
        "labelsTr/case3.nii.gz",
        "its grid is shifted by (0.002, 0, 0) mm",
    ),
    (
        "label slice spacing just past the tolerance",
        kit.nifti_seg_site,
        lambda f: _moved_label(f, "labelsTr/case4.nii.gz", z_scale=1 + 3 * AFFINE_AXIS_RTOL),
        "labelsTr/case4.nii.gz",
        "voxel axis 2 steps (0, 0, 2.001) mm, the image's (0, 0, 2) mm",
    ),
    (
        "constant image",
        kit.nifti_seg_site,
        lambda f: _nifti(f, "imagesTr/case5.nii.gz", np.full(SHAPE, -1024, np.int16)),
        "imagesTr/case5.nii.gz",
        "image is constant: all 600 voxels are -1024",
    ),
    (
        "4-D image",
        kit.nifti_seg_site,
        lambda f: _nifti(f, "imagesTr/case0.nii.gz", np.random.default_rng(0).normal(size=(*SHAPE, 5))),
        "imagesTr/case0.nii.gz",
        "image is 4-D, shape (10, 10, 6, 5): 5 volumes beyond its 3 spatial axes",
    ),
    (
        "nan voxels",
        kit.nifti_seg_site,
        lambda f: _nifti(f, "imagesTr/case3.nii.gz", _with_nan(7)),
        "imagesTr/case3.nii.gz",
        "image has 7 NaN and 0 Inf voxels",
    ),
    (
        "inf voxels",
        kit.nifti_seg_site,
        lambda f: _nifti(f, "imagesTr/case3.nii.gz", np.full(SHAPE, np.inf, np.float32)),
        "imagesTr/case3.nii.gz",
        "image has 0 NaN and 600 Inf voxels",
    ),
    (
        "image without label",
        kit.nifti_seg_site,
        lambda f: (f / "labelsTr/case4.nii.gz").unlink(),
        "imagesTr/case4.nii.gz",
        "no label volume case4.nii.gz in labelsTr",
    ),
    (
        "label without image",
        kit.nifti_seg_site,
        lambda f: _nifti(f, "labelsTr/stray.nii.gz", np.zeros(SHAPE, np.uint8)),
        "labelsTr/stray.nii.gz",
        "label volume has no matching image in imagesTr",
    ),
    (
        "wrong dimensionality",
        kit.nifti_seg_site,
        lambda f: _nifti(f, "imagesTr/case5.nii.gz", np.zeros((10, 10), np.float32)),
        "imagesTr/case5.nii.gz",
        "image has 2 spatial dimensions (10, 10), but [preprocessing].spatial_size has 3",
    ),
    (
        "empty site",
        kit.nifti_seg_site,
        lambda f: (
            [p.unlink() for p in (f / "imagesTr").iterdir()]
            and [p.unlink() for p in (f / "labelsTr").iterdir()]
        ),
        "site0.toml",
        "the site is empty: its 'nifti_folder' source lists no records",
    ),
    (
        "missing csv column",
        kit.png_site,
        lambda f: _replace_csv(f / "labels.csv", "image,label", "image,diagnosis"),
        "labels.csv",
        "missing column(s) 'label'; the CSV has columns 'image', 'diagnosis'",
    ),
    (
        "csv row, missing file",
        kit.png_site,
        lambda f: _append_csv(f / "labels.csv", "img/ghost.png,tumor"),
        "labels.csv",
        "line 14: image 'img/ghost.png' does not exist",
    ),
    (
        "csv row, path escapes root",
        kit.png_site,
        lambda f: _append_csv(f / "labels.csv", "../elsewhere.png,tumor"),
        "labels.csv",
        "line 14: image '../elsewhere.png' is outside root",
    ),
    (
        "csv label outside map",
        kit.png_site,
        lambda f: _append_csv(f / "labels.csv", "img/im01.png,7"),
        "labels.csv",
        "line 14: label 7 is outside the label map (0..1: no_tumor, tumor)",
    ),
    (
        "csv label unknown name",
        kit.png_site,
        lambda f: _append_csv(f / "labels.csv", "img/im01.png,maybe"),
        "labels.csv",
        "line 14: label 'maybe' is neither a class index nor one of the names no_tumor, tumor",
    ),
    (
        "corrupt png",
        kit.png_site,
        lambda f: (f / "img/im03.png").write_bytes((f / "img/im03.png").read_bytes()[:60]),
        "img/im03.png",
        "cannot read: ValueError: truncated PNG",
    ),
    (
        "not an image",
        kit.png_site,
        lambda f: (f / "img/im03.png").write_text("hello"),
        "img/im03.png",
        "cannot read: ValueError: not a PNG file",
    ),
    (
        "channels differ",
        kit.png_site,
        lambda f: (f / "img/im05.png").write_bytes(
            kit.encode_png(np.random.default_rng(5).integers(0, 255, (10, 12, 3)), colour_type=2)
        ),
        "img/im05.png",
        "image has 3 channel(s), most images have 1",
    ),
    (
        "bad split value",
        kit.png_site,
        lambda f: _with_split_column(f, ["train", "training"]),
        "labels.csv",
        "line 3: split 'training' must be one of train, val, test",
    ),
    (
        "empty train split",
        kit.png_site,
        lambda f: _with_split_column(f, ["test", "val"]),
        "site0.toml",
        "the train split is empty",
    ),
    (
        "tabular not a number",
        kit.tabular_site,
        lambda f: _append_csv(f / "table.csv", "old,1.5,2,tumor"),
        "table.csv",
        "line 32: column 'age' is not a number: 'old'",
    ),
    (
        "tabular nan",
        kit.tabular_site,
        lambda f: _append_csv(f / "table.csv", "61,nan,2,tumor"),
        "table.csv",
        "line 32: column 'psa' is NaN/Inf: 'nan'",
    ),
    (
        "tabular empty cell",
        kit.tabular_site,
        lambda f: _append_csv(f / "table.csv", "61,,2,tumor"),
        "table.csv",
        "line 32: column 'psa' is empty",
    ),
    (
        "dicom localiser (real)",
        kit.dicom_site,
        lambda f: (
            shutil.rmtree(f / "series/pat1"),
            shutil.copytree(TEST_FILES / "98892003/MR700", f / "series/pat1"),
        ),
        "series/pat1",
        "cannot read: ValueError: slices have different ImageOrientationPatient",
    ),
    (
        "dicom series without csv row",
        kit.dicom_site,
        lambda f: shutil.copytree(f / "series/pat0", f / "series/pat9"),
        "series/pat9",
        "has no valid row in labels.csv",
    ),
    (
        "dicom csv row without series",
        kit.dicom_site,
        lambda f: _append_csv(f / "labels.csv", "pat7,1"),
        "labels.csv",
        "line 6: no image 'pat7' in series",
    ),
    (
        "msd missing file",
        kit.msd_site,
        lambda f: (f / "imagesTr/case1.nii.gz").unlink(),
        "dataset.json",
        "entry 2 of 'training': image 'imagesTr/case1.nii.gz' does not exist",
    ),
    (
        "msd missing section",
        kit.msd_site,
        lambda f: (f / "dataset.json").write_text(json.dumps({"name": "toy"})),
        "dataset.json",
        "cannot read section 'training'",
    ),
]


@pytest.mark.parametrize(
    ("maker", "damage", "file", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_each_problem_is_reported_by_file(
    tmp_path: Path, maker: Callable[..., Path], damage: Callable[[Path], object], file: str, message: str
) -> None:
    toml = maker(tmp_path)
    assert validate_site(toml).ok  # the undamaged site is fine
    damage(tmp_path)
    report = validate_site(toml)
    assert not report.ok
    hits = [p for p in report.problems if p.file.endswith(file) and message in p.message]
    assert hits, report.format()
    assert f"site0: {hits[0].file}: {hits[0].message}" in report.format().splitlines()
    json.dumps(report.summary)  # JSON-able, even for a broken site
    with pytest.raises(SiteValidationError) as err:
        load_site(toml)
    assert str(err.value) == report.format()


def test_jpeg_without_pillow_is_a_named_problem(tmp_path: Path) -> None:
    try:
        import PIL  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("Pillow is installed, so JPEG files are readable")
    toml = kit.png_site(tmp_path)
    (tmp_path / "img" / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0 jpeg")
    _append_csv(tmp_path / "labels.csv", "img/photo.jpg,tumor")
    report = validate_site(toml)
    assert [(p.file, p.message) for p in report.problems] == [
        (
            "img/photo.jpg",
            "cannot read: ValueError: reading '.jpg' files needs Pillow, which is not installed; convert them to PNG",
        )
    ]


def test_report_summary_counts_balance_shapes_and_spacings(tmp_path: Path) -> None:
    report = validate_site(kit.nifti_seg_site(tmp_path))
    s = report.summary
    assert report.ok and s["records"] == 6 and s["splits"] == {"train": 4, "val": 1, "test": 1}
    assert s["shape"] == {"min": [10, 10, 6], "max": [10, 10, 6], "distinct": 1}
    assert s["spacing"]["min"] == [1.5, 1.5, 2.0]
    assert s["class_balance"]["all"] == {"no_tumor": 6, "tumor": 6}  # records containing each class
    masks = [(3 + i % 3) * 4 * 3 for i in range(6)]  # tumour voxels written by seg_volumes
    assert s["voxel_share"]["tumor"] == pytest.approx(sum(masks) / (6 * 600), abs=1e-6)
    assert "site0: records containing each class: no_tumor 6, tumor 6" in report.format()


def _stored_flipped_x(folder: Path, name: str) -> None:
    """Mask ``name`` stored with x reversed and an affine saying so: the same voxels in the world."""
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = SHAPE[0] - 1  # voxel i of the new array is voxel 9 - i of the old one
    kit.write_nifti(folder / name, np.flip(np.asarray(nib.load(folder / name).dataobj), 0), kit.AFFINE @ flip)


def _stored_transposed(folder: Path, name: str) -> None:
    """Mask ``name`` stored with x and y swapped and an affine saying so."""
    swap = np.eye(4)[[1, 0, 2, 3]]
    kit.write_nifti(
        folder / name, np.asarray(nib.load(folder / name).dataobj).transpose(1, 0, 2), kit.AFFINE @ swap
    )


# (case, site maker, change, input channels): labels within the affine tolerance or stored in another
# axis order on the same grid, and images that the constant and 4-D checks must leave alone
ACCEPTED: list[tuple[str, Callable[..., Path], Callable[[Path], object], int]] = [
    (
        "label origin within tolerance",
        kit.nifti_seg_site,
        lambda f: _moved_label(f, "labelsTr/case1.nii.gz", shift_mm=AFFINE_ORIGIN_TOL_MM / 2),
        1,
    ),
    (
        "label spacing within tolerance",
        kit.nifti_seg_site,
        lambda f: _moved_label(f, "labelsTr/case1.nii.gz", z_scale=1 + AFFINE_AXIS_RTOL / 2),
        1,
    ),
    (
        "labels stored with x reversed",
        kit.nifti_seg_site,
        lambda f: [_stored_flipped_x(f, f"labelsTr/case{i}.nii.gz") for i in range(6)],
        1,
    ),
    (
        "labels stored transposed",
        kit.msd_site,
        lambda f: [_stored_transposed(f, f"labelsTr/case{i}.nii.gz") for i in range(5)],
        1,
    ),
    (
        "image stored as (X, Y, Z, 1)",
        kit.nifti_seg_site,
        lambda f: _nifti(f, "imagesTr/case2.nii.gz", np.random.default_rng(2).normal(size=(*SHAPE, 1))),
        1,
    ),
    (
        "image constant but for one voxel",
        kit.nifti_seg_site,
        lambda f: _nifti(f, "imagesTr/case2.nii.gz", np.eye(1, 600).reshape(SHAPE)),
        1,
    ),
    (
        "rgb pngs keep their 3 channels",
        kit.png_site,
        lambda f: [
            (f / f"img/im{i:02d}.png").write_bytes(
                kit.encode_png(np.random.default_rng(i).integers(0, 255, (10, 12, 3)), colour_type=2)
            )
            for i in range(12)
        ],
        3,
    ),
]


@pytest.mark.parametrize(
    ("maker", "change", "channels"), [c[1:] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED]
)
def test_the_new_checks_leave_good_sites_alone(
    tmp_path: Path, maker: Callable[..., Path], change: Callable[[Path], object], channels: int
) -> None:
    toml = maker(tmp_path)
    change(tmp_path)
    report = validate_site(toml)
    assert report.ok, report.format()
    site = load_site(toml)
    assert site.in_channels == channels and site.splits["train"][0]["image"].shape[0] == channels


@pytest.mark.parametrize("store", [_stored_flipped_x, _stored_transposed], ids=["x reversed", "transposed"])
def test_labels_stored_in_another_axis_order_are_served_aligned(
    tmp_path: Path, store: Callable[[Path, str], None]
) -> None:
    """Native size, no scaling: each served mask is the written one, on its image's RAS grid (nibabel)."""
    toml = kit.nifti_seg_site(
        tmp_path,
        preprocessing={"spatial_size": list(SHAPE), "intensity": "none"},
        split={"val_fraction": 0.0, "test_fraction": 0.5},
    )
    written = {}
    for path in sorted((tmp_path / "imagesTr").iterdir()):
        image = nib.as_closest_canonical(nib.load(path)).get_fdata()
        label = nib.as_closest_canonical(nib.load(tmp_path / "labelsTr" / path.name)).get_fdata()
        written[round(float(image[0, 0, 0]), 5)] = label
        store(tmp_path, f"labelsTr/{path.name}")
    site = load_site(toml)
    for i in range(site.size("test")):
        item = site.splits["test"][i]
        np.testing.assert_array_equal(
            item["label"][0].numpy(), written[round(float(item["image"][0, 0, 0, 0]), 5)]
        )


def test_the_readme_states_the_affine_tolerances() -> None:
    """The validate-site section of the README quotes the constants the check uses."""
    text = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())
    assert f"within {AFFINE_ORIGIN_TOL_MM:g} mm in origin (`AFFINE_ORIGIN_TOL_MM`)" in text
    assert f"within {AFFINE_AXIS_RTOL:g} of the voxel size along each voxel axis" in text

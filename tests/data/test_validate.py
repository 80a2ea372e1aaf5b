"""Every kind of broken site is reported by file, and load_site refuses it with the same message."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from fedfew_med.data.sites import SiteValidationError, load_site
from fedfew_med.data.validate import validate_site
from tests.data import sitekit as kit

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests"


def _append_csv(path: Path, line: str) -> None:
    path.write_text(path.read_text().rstrip("\n") + "\n" + line + "\n")


def _replace_csv(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new, 1))


def _nifti(folder: Path, name: str, array: np.ndarray) -> None:
    kit.write_nifti(folder / name, array)


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
            kit.encode_png(np.zeros((10, 12, 3), np.uint8), colour_type=2)
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

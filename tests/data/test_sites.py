"""load_site / load_sites: the SiteData contract for every source, checked against the files written."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from nibabel.testing import data_path as NIBABEL_DATA
from pydicom.data import get_testdata_file

from fedfew_med.config import ConfigError
from fedfew_med.data.readers import ReaderSet, read_image
from fedfew_med.data.sites import SiteValidationError, load_site, load_sites
from fedfew_med.data.validate import validate_site
from tests.data import sitekit as kit

MAKERS = {
    "images_csv": kit.png_site,
    "nifti_folder": kit.nifti_seg_site,
    "msd_datalist": kit.msd_site,
    "dicom_series": kit.dicom_site,
    "tabular_csv": kit.tabular_site,
}
EXPECTED = {  # task, in_channels, spatial dims, image shape, label shape
    "images_csv": ("classification", 1, 2, (1, 8, 8), ()),
    "nifti_folder": ("segmentation", 1, 3, (1, 8, 8, 4), (1, 8, 8, 4)),
    "msd_datalist": ("segmentation", 1, 3, (1, 8, 8, 4), (1, 8, 8, 4)),
    "dicom_series": ("classification", 1, 3, (1, 8, 8, 4), ()),
    "tabular_csv": ("tabular", 3, 0, (3,), ()),
}


@pytest.mark.parametrize("kind", list(MAKERS))
def test_every_source_fills_the_site_data_contract(tmp_path: Path, kind: str) -> None:
    site = load_site(MAKERS[kind](tmp_path))
    task, channels, dims, image_shape, label_shape = EXPECTED[kind]
    assert (site.name, site.task, site.in_channels, site.num_classes, site.spatial_dims) == (
        "site0",
        task,
        channels,
        2,
        dims,
    )
    for split in ("train", "val", "test"):
        for index in range(site.size(split)):
            item = site.splits[split][index]
            assert set(item) == {"image", "label"}
            assert type(item["image"]) is torch.Tensor and not isinstance(item["image"], MetaTensor)
            assert item["image"].dtype == torch.float32 and tuple(item["image"].shape) == image_shape
            assert item["label"].dtype == torch.int64 and tuple(item["label"].shape) == label_shape
            assert 0 <= int(item["label"].min()) and int(item["label"].max()) < 2
    batch = next(iter(site.loader("train", batch_size=2)))
    assert tuple(batch["image"].shape) == (2, *image_shape)
    meta = json.loads(json.dumps(site.metadata))  # JSON-able
    assert meta["source"] == kind and meta["split_seed"] == 0
    assert meta["counts"] == {s: site.size(s) for s in ("train", "val", "test")}
    for split in ("train", "val", "test"):  # class balance agrees with the labels served
        labels = [site.splits[split][i]["label"] for i in range(site.size(split))]
        if task == "segmentation":
            served = [sum(int((lab == c).any()) for lab in labels) for c in range(2)]
        else:
            served = [sum(int(lab) == c for lab in labels) for c in range(2)]
        assert list(meta["class_balance"][split].values()) == served


def test_png_pipeline_keeps_pixels_where_they_were(tmp_path: Path) -> None:
    """Native size and min-max scaling only: image[0, x, y] is pixel (row y, column x), scaled to [0, 1]."""
    toml = kit.png_site(
        tmp_path, preprocessing={"spatial_size": [12, 10]}, split={"val_fraction": 0.0, "test_fraction": 0.5}
    )
    site = load_site(toml)
    written = []
    for i in range(12):  # the greys png_site wrote, scaled to [0, 1]
        grey = np.random.default_rng(i).integers(0, 255, size=(10, 12)).astype(np.float64)
        written.append((grey - grey.min()) / (grey.max() - grey.min()))
    for i in range(site.size("test")):
        image = site.splits["test"][i]["image"][0].numpy()
        assert image.shape == (12, 10)  # (W, H)
        assert any(np.allclose(image, w.T, atol=1e-6) for w in written)


def test_nifti_pipeline_reorients_to_ras(tmp_path: Path) -> None:
    """The volumes are stored LAS; with no resizing and no scaling the pipeline serves them flipped on x."""
    toml = kit.nifti_seg_site(
        tmp_path,
        preprocessing={"spatial_size": [10, 10, 6], "intensity": "none"},
        split={"val_fraction": 0.0, "test_fraction": 0.5},
    )
    site = load_site(toml)
    written = {}
    for path in sorted((tmp_path / "imagesTr").iterdir()):
        image = nib.load(path)
        canonical = nib.as_closest_canonical(image).get_fdata()  # nibabel's own reorientation: the reference
        label = nib.as_closest_canonical(nib.load(tmp_path / "labelsTr" / path.name)).get_fdata()
        written[round(float(canonical[0, 0, 0]), 5)] = (canonical, label)
    for i in range(site.size("test")):
        item = site.splits["test"][i]
        canonical, label = written[round(float(item["image"][0, 0, 0, 0]), 5)]
        np.testing.assert_allclose(item["image"][0].numpy(), canonical, atol=1e-6)
        np.testing.assert_array_equal(item["label"][0].numpy(), label)


@pytest.mark.parametrize(
    ("name", "volume_4d", "channels"),
    [
        ("anatomical.nii", "refuse", 1),  # 3-D: the key does not apply
        ("example4d.nii.gz", "refuse", None),  # two frames: refused unless the site file says how
        ("example4d.nii.gz", "channels", 2),
        ("example4d.nii.gz", "first", 1),
    ],
)
def test_real_nibabel_volumes(tmp_path: Path, name: str, volume_4d: str, channels: int | None) -> None:
    """anatomical.nii (LAS, big-endian) and example4d.nii.gz (two frames) under each ``volume_4d``."""
    folder = tmp_path / name.split(".")[0]
    (folder / "imagesTr").mkdir(parents=True)
    for copy in ("a", "b", "c"):
        shutil.copy(Path(NIBABEL_DATA) / name, folder / "imagesTr" / f"{copy}{name[name.index('.') :]}")
    kit.write_csv(folder / "labels.csv", [{"image": c, "label": i % 2} for i, c in enumerate("abc")])
    doc = kit.site_doc(
        "nifti_folder",
        "classification",
        spatial_size=(16, 16, 8),
        source={"csv": "labels.csv"},
        split={"val_fraction": 0.0, "test_fraction": 0.34},
        preprocessing={"intensity": "none", "volume_4d": volume_4d},
    )
    report = validate_site(kit.write_toml(folder / "site0.toml", doc))
    image = nib.load(Path(NIBABEL_DATA) / name)
    if channels is None:
        shape = tuple(image.shape)
        assert [p.message[: p.message.index(":")] for p in report.problems] == [
            f"image is 4-D, shape {shape}"
        ] * 3
        with pytest.raises(SiteValidationError, match="set it to 'channels'"):
            load_site(folder / "site0.toml")
        return
    site = load_site(folder / "site0.toml")
    assert report.ok and report.summary["spacing"]["min"] == pytest.approx(
        list(image.header.get_zooms()[:3]), abs=1e-5
    )
    assert site.in_channels == channels and site.splits["train"][0]["image"].shape[0] == channels
    assert report.summary["shape"]["min"] == list(nib.as_closest_canonical(image).shape[:3])


@pytest.mark.parametrize(
    ("volume_4d", "volumes", "served"),
    [
        ("channels", 3, [0, 1, 2]),  # volume t is channel t
        ("first", 3, [0]),
        ("refuse", 1, [0]),  # (X, Y, Z, 1) is a 3-D image whatever the key says
        ("first", 1, [0]),
        ("channels", 1, [0]),
    ],
)
def test_volume_4d_serves_the_volumes_it_names(
    tmp_path: Path, volume_4d: str, volumes: int, served: list[int]
) -> None:
    """Native size, no scaling: the image served is the chosen volumes of nibabel's canonical array."""
    shape, written = (6, 5, 4), []
    for i in range(4):
        series = np.random.default_rng(i).normal(size=(*shape, volumes)).astype(np.float32)
        kit.write_nifti(tmp_path / "imagesTr" / f"c{i}.nii", series)
        written.append(series)
    kit.write_csv(tmp_path / "labels.csv", [{"image": f"c{i}", "label": i % 2} for i in range(4)])
    doc = kit.site_doc(
        "nifti_folder",
        "classification",
        spatial_size=shape,
        source={"csv": "labels.csv"},
        preprocessing={"intensity": "none", "volume_4d": volume_4d},
        split={"val_fraction": 0.0, "test_fraction": 0.5},
    )
    site = load_site(kit.write_toml(tmp_path / "site0.toml", doc))
    assert site.in_channels == len(served)
    references = [
        nib.as_closest_canonical(nib.Nifti1Image(w, kit.AFFINE)).get_fdata()[..., served] for w in written
    ]
    for i in range(site.size("test")):
        image = site.splits["test"][i]["image"].numpy()  # (C, X, Y, Z)
        assert any(np.allclose(np.moveaxis(image, 0, -1), r, atol=1e-6) for r in references)


def test_real_pydicom_files_as_a_dicom_site(tmp_path: Path) -> None:
    """CT_small.dcm and MR_small.dcm, each its own one-slice series: 2-D images with their pixel spacing."""
    rows = []
    for i, name in enumerate(["CT_small.dcm", "MR_small.dcm", "CT_small.dcm", "MR_small.dcm"]):
        (tmp_path / "series" / f"s{i}").mkdir(parents=True)
        shutil.copy(get_testdata_file(name), tmp_path / "series" / f"s{i}" / "slice.dcm")
        rows.append({"image": f"s{i}", "label": i % 2})
    kit.write_csv(tmp_path / "labels.csv", rows)
    doc = kit.site_doc(
        "dicom_series",
        "classification",
        spatial_size=(32, 32),
        source={"csv": "labels.csv", "images": "series"},
        preprocessing={"intensity": "window", "a_min": -1000.0, "a_max": 1000.0},
    )
    toml = kit.write_toml(tmp_path / "site0.toml", doc)
    report = validate_site(toml)
    assert report.ok, report.format()
    assert report.summary["spacing"]["min"] == pytest.approx([0.3125] * 2) and report.summary["spacing"][
        "max"
    ] == pytest.approx([0.661468] * 2)
    site = load_site(toml)
    item = site.splits["train"][0]
    assert (
        tuple(item["image"].shape) == (1, 32, 32)
        and 0.0 <= float(item["image"].min()) <= float(item["image"].max()) <= 1.0
    )


def test_jpeg_files_through_pillow(tmp_path: Path) -> None:
    image_module = pytest.importorskip("PIL.Image")
    toml = kit.png_site(tmp_path, preprocessing={"spatial_size": [12, 10], "intensity": "none"})
    grey = np.tile(np.arange(0, 240, 20, dtype=np.uint8), (10, 1))  # smooth: JPEG keeps it nearly exact
    image_module.fromarray(grey, mode="L").save(tmp_path / "img" / "photo.jpg", quality=100)
    with (tmp_path / "labels.csv").open("a") as fh:
        fh.write("img/photo.jpg,tumor\n")
    report = validate_site(toml)
    assert report.ok and report.summary["records"] == 13
    img = read_image(tmp_path / "img" / "photo.jpg", ReaderSet())
    np.testing.assert_allclose(img[0].numpy(), grey.T, atol=3)  # (W, H), as for PNG


def test_same_seed_same_split_and_same_first_augmented_batch(tmp_path: Path) -> None:
    def first_batch(seed: int) -> tuple[dict[str, list[float]], dict[str, torch.Tensor]]:
        folder = tmp_path / f"seed{seed}-{len(list(tmp_path.iterdir()))}"
        toml = kit.png_site(folder, n=20, preprocessing={"augment": True}, split={"seed": seed})
        site = load_site(toml)
        firsts = {
            s: [float(site.splits[s][i]["image"].sum()) for i in range(site.size(s))] for s in ("val", "test")
        }
        batch = next(iter(site.loader("train", batch_size=6, generator=torch.Generator().manual_seed(0))))
        return firsts, batch

    split_a, batch_a = first_batch(3)
    split_b, batch_b = first_batch(3)
    split_c, batch_c = first_batch(4)
    assert split_a == split_b and split_a != split_c
    assert torch.equal(batch_a["image"], batch_b["image"]) and torch.equal(batch_a["label"], batch_b["label"])
    assert not torch.equal(batch_a["image"], batch_c["image"])


def test_augmentation_redraws_on_every_access_and_only_in_train(tmp_path: Path) -> None:
    site = load_site(kit.png_site(tmp_path, n=20, preprocessing={"augment": True}))
    draws = [site.splits["train"][0]["image"] for _ in range(4)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert torch.equal(site.splits["test"][0]["image"], site.splits["test"][0]["image"])


def test_patch_sampling_and_grid_evaluation(tmp_path: Path) -> None:
    toml = kit.nifti_seg_site(tmp_path, preprocessing={"spatial_size": [4, 4, 4], "patches_per_image": 3})
    site = load_site(toml)
    assert site.size("train") == 3 * 4  # 4 training volumes, 3 random patches each
    per_volume = math.prod(math.ceil(s / p) for s, p in zip((10, 10, 6), (4, 4, 4), strict=True))
    assert site.size("val") == per_volume and site.size("test") == per_volume
    train = [site.splits["train"][i] for i in range(site.size("train"))]
    assert all(
        tuple(x["image"].shape) == (1, 4, 4, 4) and tuple(x["label"].shape) == (1, 4, 4, 4) for x in train
    )
    assert sum(int(x["label"].any()) for x in train) >= 3  # half the draws are centred on tumour
    tiles = torch.stack([site.splits["test"][i]["label"] for i in range(per_volume)])
    assert int(tiles.sum()) >= 36  # the grid covers the whole mask (overlapping tiles may count voxels twice)


def test_memory_cache_and_no_cache_serve_the_same_records(tmp_path: Path) -> None:
    a = load_site(kit.nifti_seg_site(tmp_path / "a"))
    b = load_site(
        kit.nifti_seg_site(tmp_path / "b", preprocessing={"spatial_size": [8, 8, 4], "cache": "none"})
    )
    for split in ("train", "test"):
        for i in range(a.size(split)):
            assert torch.equal(a.splits[split][i]["image"], b.splits[split][i]["image"])


def test_tabular_features_are_scaled_with_train_statistics_only(tmp_path: Path) -> None:
    site = load_site(kit.tabular_site(tmp_path))
    shift, scale = np.array(site.metadata["shift"]), np.array(site.metadata["scale"])
    rows = {
        tuple(round(float(r[c]), 3) for c in ("age", "psa", "grade"))
        for r in csv.DictReader((tmp_path / "table.csv").open())
    }
    raw = {
        s: np.stack([site.splits[s][i]["image"].numpy() for i in range(site.size(s))]) * scale + shift
        for s in ("train", "test")
    }
    for split in raw.values():  # scaling undone, every served row is a row of the file
        assert {tuple(round(float(v), 3) for v in row) for row in split} <= rows
    np.testing.assert_allclose(
        raw["train"].mean(axis=0), shift, rtol=1e-5
    )  # the reference: numpy on the train rows
    np.testing.assert_allclose(raw["train"].std(axis=0), scale, rtol=1e-4)


def test_split_column_is_used_and_val_is_carved_from_train_rows(tmp_path: Path) -> None:
    toml = kit.png_site(
        tmp_path, n=20, source={"csv": "labels.csv", "split_column": "fold"}, split={"val_fraction": 0.25}
    )
    rows = list(csv.DictReader((tmp_path / "labels.csv").open()))
    kit.write_csv(
        tmp_path / "labels.csv", [{**r, "fold": "test" if i < 4 else "train"} for i, r in enumerate(rows)]
    )
    report = validate_site(toml)
    assert report.summary["splits"] == {"train": 12, "val": 4, "test": 4}
    assert "column 'fold'; val stratified from its train rows" in report.summary["split_by"]


def test_load_sites_checks_the_federation(tmp_path: Path) -> None:
    kit.png_site(tmp_path / "a")
    b = kit.png_site(tmp_path / "b")
    with pytest.raises(
        ConfigError, match=r"b/site0.toml: \[site\].name must differ between sites, got 'site0'"
    ):
        load_sites(["a/site0.toml", "b/site0.toml"], tmp_path)
    b.write_text(b.read_text().replace('name = "site0"', 'name = "site1"'))
    sites = load_sites(["a/site0.toml", str(b)], tmp_path)
    assert [s.name for s in sites] == ["site0", "site1"]
    b.write_text(b.read_text().replace('"no_tumor", "tumor"', '"healthy", "tumor"'))
    with pytest.raises(ConfigError, match=r"\[labels\].names must be the same at every site"):
        load_sites(["a/site0.toml", "b/site0.toml"], tmp_path)
    b.write_text(b.read_text().replace('"healthy", "tumor"', '"no_tumor", "tumor"'))
    os.remove(tmp_path / "a" / "img" / "im02.png")
    with pytest.raises(SiteValidationError) as err:
        load_sites(["a/site0.toml", "b/site0.toml"], tmp_path)
    assert "site0: labels.csv: line 4: image 'img/im02.png' does not exist" in str(err.value)


def test_window_intensity_against_numpy(tmp_path: Path) -> None:
    pre = {"spatial_size": [10, 10, 6], "intensity": "window", "a_min": -1.0, "a_max": 1.0}
    site = load_site(
        kit.nifti_seg_site(tmp_path, preprocessing=pre, split={"val_fraction": 0.0, "test_fraction": 0.5})
    )
    references = [
        nib.as_closest_canonical(nib.load(p)).get_fdata() for p in sorted((tmp_path / "imagesTr").iterdir())
    ]
    for i in range(site.size("test")):
        served = site.splits["test"][i]["image"][0].numpy()
        assert any(np.allclose(served, np.clip((r + 1) / 2, 0, 1), atol=1e-6) for r in references)


def test_crop_foreground_against_numpy(tmp_path: Path) -> None:
    for i in range(4):
        volume = np.zeros((10, 10, 6), np.float32)
        volume[2:7, 3:9, 1:5] = np.random.default_rng(i).uniform(1, 2, size=(5, 6, 4))
        kit.write_nifti(tmp_path / "imagesTr" / f"c{i}.nii.gz", volume)
    kit.write_csv(tmp_path / "labels.csv", [{"image": f"c{i}", "label": i % 2} for i in range(4)])
    doc = kit.site_doc(
        "nifti_folder",
        "classification",
        spatial_size=(5, 6, 4),
        source={"csv": "labels.csv"},
        preprocessing={"intensity": "none", "crop_foreground": True},
        split={"val_fraction": 0.0, "test_fraction": 0.5},
    )
    site = load_site(kit.write_toml(tmp_path / "site0.toml", doc))
    boxes = []
    for i in range(4):
        canonical = nib.as_closest_canonical(nib.load(tmp_path / "imagesTr" / f"c{i}.nii.gz")).get_fdata()
        nonzero = np.argwhere(canonical > 0)
        lo, hi = nonzero.min(axis=0), nonzero.max(axis=0) + 1
        boxes.append(canonical[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]])
    for i in range(site.size("test")):
        served = site.splits["test"][i]["image"][0].numpy()
        assert any(b.shape == served.shape and np.allclose(served, b, atol=1e-6) for b in boxes)


def test_resampling_to_a_spacing_changes_the_grid(tmp_path: Path) -> None:
    """(10, 10, 6) voxels of 1.5 x 1.5 x 2 mm resampled to 3 x 3 x 4 mm: (5, 5, 3), tiled by (4, 4, 2) patches."""
    pre = {"spatial_size": [4, 4, 2], "spacing": [3.0, 3.0, 4.0], "patches_per_image": 1}
    site = load_site(kit.nifti_seg_site(tmp_path, preprocessing=pre))
    assert site.size("test") == 2 * 2 * 2


@pytest.mark.parametrize(
    "pre",
    [
        {"intensity": "zscore", "spatial_size": [12, 10]},  # native size: the statistics survive
        {"intensity": "none", "orientation": ""},
        {"channels": 3, "augment": True, "cache": "none"},
        {"spatial_size": [6, 8], "augment": True},  # not square: no quarter turns
    ],
)
def test_preprocessing_options_keep_the_contract(tmp_path: Path, pre: dict[str, Any]) -> None:
    site = load_site(kit.png_site(tmp_path, preprocessing={"spatial_size": [8, 8], **pre}))
    size = tuple(pre.get("spatial_size", [8, 8]))
    for split in ("train", "test"):
        item = site.splits[split][0]
        assert (
            tuple(item["image"].shape) == (pre.get("channels") or 1, *size)
            and item["image"].dtype == torch.float32
        )
    if pre.get("intensity") == "zscore":
        image = site.splits["test"][0]["image"]
        assert abs(float(image.mean())) < 1e-5 and abs(float(image.std(unbiased=False)) - 1) < 1e-4

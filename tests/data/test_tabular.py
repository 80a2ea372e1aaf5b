"""Tabular sites: columns matched by name across a federation, and missing values imputed from train rows only.

References are independent of the code under test: the CSV files written here are read back with
``csv.DictReader`` and picked by column name, and imputed values are worked out by hand.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedfew_med.config import ConfigError
from fedfew_med.data.sites import SiteValidationError, load_site, load_sites
from fedfew_med.data.validate import validate_site
from fedfew_med.site_config import load_site_config
from tests.data import sitekit as kit

SPLITS = ("train", "val", "test")
# (age, psa, grade, label, split, weight) per record; the same records at every site of these tests
RECORDS = [
    (61.5, 4.25, 2, "tumor", "train", 80.5),
    (48.0, 1.5, 1, "no_tumor", "train", 71.0),
    (70.25, 9.0, 4, "tumor", "train", 90.25),
    (55.0, 2.75, 1, "no_tumor", "train", 66.0),
    (66.0, 6.5, 3, "tumor", "val", 77.0),
    (52.5, 0.75, 2, "no_tumor", "test", 59.5),
    (73.0, 12.0, 4, "tumor", "test", 84.0),
]
VALUES = {"age": 0, "psa": 1, "grade": 2, "label": 3, "split": 4, "weight": 5}


def table_site(folder: Path, name: str, columns: list[str], **sections: dict[str, Any]) -> Path:
    """A site named ``name`` whose ``<name>.csv`` holds :data:`RECORDS` with ``columns`` in this order."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{c: r[VALUES[c]] for c in columns} for r in RECORDS]
    kit.write_csv(folder / f"{name}.csv", rows)
    source = {"csv": f"{name}.csv", "split_column": "split", **sections.pop("source", {})}
    pre = {"intensity": "none", **sections.pop("preprocessing", {})}
    doc = kit.site_doc(
        "tabular_csv", "tabular", source=source, preprocessing=pre, site={"name": name}, **sections
    )
    return kit.write_toml(folder / f"{name}.toml", doc)


def by_name(csv_path: Path, features: list[str]) -> dict[str, np.ndarray]:
    """The reference: every split's rows of the CSV, features picked by column name."""
    rows = list(csv.DictReader(csv_path.open()))
    return {
        s: np.array([[float(r[c]) for c in features] for r in rows if r["split"] == s], np.float32).reshape(
            -1, len(features)
        )
        for s in SPLITS
    }


def served(site: Any, split: str) -> np.ndarray:
    n = site.size(split)
    return (
        np.stack([site.splits[split][i]["image"].numpy() for i in range(n)])
        if n
        else np.zeros((0, site.in_channels))
    )


ALL = ["age", "psa", "grade", "label", "split"]
ALIGNED = [  # id, columns of site a's CSV, of site b's, extra [source] keys of a and b, the federation's order
    ("same order", ALL, ALL, {}, {}, ["age", "psa", "grade"]),
    ("b reordered", ALL, ["grade", "label", "split", "psa", "age"], {}, {}, ["age", "psa", "grade"]),
    ("a reordered", ["split", "psa", "label", "grade", "age"], ALL, {}, {}, ["psa", "grade", "age"]),
    (
        "explicit list at a, b in CSV order",
        ALL,
        ["psa", "age", "label", "grade", "split"],
        {"feature_columns": ["grade", "age", "psa"]},
        {},
        ["grade", "age", "psa"],
    ),
    (
        "explicit subsets in two orders",
        ALL,
        ["psa", "age", "label", "grade", "split"],
        {"feature_columns": ["psa", "age"]},
        {"feature_columns": ["age", "psa"]},
        ["psa", "age"],
    ),
]


@pytest.mark.parametrize(
    ("a_columns", "b_columns", "a_source", "b_source", "order"),
    [c[1:] for c in ALIGNED],
    ids=[c[0] for c in ALIGNED],
)
def test_a_federation_matches_table_columns_by_name(
    tmp_path: Path,
    a_columns: list[str],
    b_columns: list[str],
    a_source: dict,
    b_source: dict,
    order: list[str],
) -> None:
    a = table_site(tmp_path / "a", "site-a", a_columns, source=a_source)
    b = table_site(tmp_path / "b", "site-b", b_columns, source=b_source)
    sites = load_sites([str(a), str(b)], tmp_path)
    for site, csv_path in zip(
        sites, (tmp_path / "a" / "site-a.csv", tmp_path / "b" / "site-b.csv"), strict=True
    ):
        assert site.metadata["features"] == order and site.in_channels == len(order)
        expected = by_name(csv_path, order)
        for split in SPLITS:
            np.testing.assert_array_equal(served(site, split), expected[split])


def test_sites_that_already_agree_are_left_as_they_are(tmp_path: Path) -> None:
    """The prepared heart-disease federation's case: a federation changes nothing when its sites agree."""
    files = [
        str(table_site(tmp_path / n, n, ALL, preprocessing={"intensity": "zscore"})) for n in ("s0", "s1")
    ]
    together = load_sites(files, tmp_path)
    for site, file in zip(together, files, strict=True):
        alone = load_site(file)
        assert site.metadata == alone.metadata
        for split in SPLITS:
            np.testing.assert_array_equal(served(site, split), served(alone, split))


MISMATCHED = [  # id, site-b CSV columns, site-b [source] keys, what the error says about site-b's CSV
    ("missing column", ["age", "grade", "label", "split"], {}, "site-b.csv lacks column(s) 'psa'"),
    ("extra column", [*ALL, "weight"], {}, "site-b.csv has extra column(s) 'weight'"),
    (
        "missing and extra",
        ["age", "weight", "grade", "label", "split"],
        {},
        "site-b.csv lacks column(s) 'psa' and has extra column(s) 'weight'",
    ),
    (
        "a subset chosen at b only",
        ALL,
        {"feature_columns": ["age", "psa"]},
        "site-b.csv lacks column(s) 'grade'",
    ),
]


@pytest.mark.parametrize(
    ("b_columns", "b_source", "message"), [c[1:] for c in MISMATCHED], ids=[c[0] for c in MISMATCHED]
)
def test_a_missing_or_extra_column_stops_the_federation(
    tmp_path: Path, b_columns: list[str], b_source: dict, message: str
) -> None:
    a = table_site(tmp_path / "a", "site-a", ALL)
    b = table_site(tmp_path / "b", "site-b", b_columns, source=b_source)
    with pytest.raises(ConfigError) as err:
        load_sites([str(a), str(b)], tmp_path)
    lines = str(err.value).splitlines()
    assert f"site-a ({a}) has 'age', 'psa', 'grade'" in lines[0]
    assert f"site-b ({b}): {message}" in lines, str(err.value)
    assert "[source].feature_columns" in lines[-1]


def test_duplicate_column_names_are_refused(tmp_path: Path) -> None:
    toml = table_site(tmp_path, "site0", ALL)
    text = (tmp_path / "site0.csv").read_text().splitlines()
    (tmp_path / "site0.csv").write_text("\n".join([text[0].replace("grade", "age"), *text[1:]]) + "\n")
    report = validate_site(toml)
    assert [p.message for p in report.problems] == [
        "column(s) 'age' appear more than once in the header",
        "the site is empty: its 'tabular_csv' source lists no records",  # as for a missing column
    ]


# ------------------------------------------------------------------ missing values

# age / psa per split, None = a missing cell written as below; grade and labels as in RECORDS
MISSING_AGE = [61.5, None, 70.25, 55.0, None, 52.5, None]  # train: 61.5, 70.25, 55.0
MISSING_PSA = [None, 1.5, 9.0, 2.75, 6.5, 1000.0, None]  # train: 1.5, 9.0, 2.75; the test split holds 1000
HAND = {  # the train split's statistics, by hand
    "mean": {"age": (61.5 + 70.25 + 55.0) / 3, "psa": (1.5 + 9.0 + 2.75) / 3, "grade": (2 + 1 + 4 + 1) / 4},
    "median": {"age": 61.5, "psa": 2.75, "grade": 1.5},
}


def missing_site(folder: Path, missing: str | None, marks: tuple[str, ...] = ("", "NA", "?", "nan")) -> Path:
    """A site whose age and psa columns have missing cells (spelled in turn as ``marks``); grade is complete."""
    spelled = iter(marks * 5)  # (5 missing cells)
    rows = [
        {
            "age": next(spelled) if age is None else age,
            "psa": next(spelled) if psa is None else psa,
            "grade": r[2],
            "label": r[3],
            "split": r[4],
        }
        for r, age, psa in zip(RECORDS, MISSING_AGE, MISSING_PSA, strict=True)
    ]
    folder.mkdir(parents=True, exist_ok=True)
    kit.write_csv(folder / "site0.csv", rows)
    pre: dict[str, Any] = {"intensity": "none"} | ({} if missing is None else {"missing": missing})
    doc = kit.site_doc(
        "tabular_csv", "tabular", source={"csv": "site0.csv", "split_column": "split"}, preprocessing=pre
    )
    return kit.write_toml(folder / "site0.toml", doc)


@pytest.mark.parametrize("strategy", ["mean", "median"])
def test_imputation_learns_from_the_train_split_only(tmp_path: Path, strategy: str) -> None:
    site = load_site(missing_site(tmp_path, strategy))
    fill = HAND[strategy]
    expected = {  # every split's rows, the missing cells filled with the train split's statistic
        s: np.array(
            [
                [fill["age"] if age is None else age, fill["psa"] if psa is None else psa, r[2]]
                for r, age, psa in zip(RECORDS, MISSING_AGE, MISSING_PSA, strict=True)
                if r[4] == s
            ],
            np.float32,
        )
        for s in SPLITS
    }
    for split in SPLITS:
        np.testing.assert_allclose(served(site, split), expected[split], rtol=1e-6)
    assert site.metadata["missing"] == strategy
    np.testing.assert_allclose(
        site.metadata["imputed_with"], [fill["age"], fill["psa"], fill["grade"]], rtol=1e-6
    )
    # had the test split's 1000 leaked into psa's statistic, the test row's filled psa would exceed 100
    assert served(site, "test")[1, 1] < 10


def test_imputation_comes_before_scaling(tmp_path: Path) -> None:
    site = load_site(missing_site(tmp_path, "mean"))
    toml = missing_site(tmp_path / "z", "mean")
    toml.write_text(toml.read_text().replace('intensity = "none"', 'intensity = "zscore"'))
    scaled = load_site(toml)
    raw = served(site, "train").astype(np.float64)  # reference: numpy's z-score of the imputed train rows
    np.testing.assert_allclose(
        served(scaled, "test"), (served(site, "test") - raw.mean(0)) / raw.std(0), rtol=1e-5
    )


@pytest.mark.parametrize(
    ("missing", "mark", "message"),
    [
        (None, "", "line 3: column 'age' is empty (a missing value: [preprocessing].missing"),
        ("refuse", "NA", "line 3: column 'age' is not a number: 'NA' (a missing value"),
        (None, "nan", "line 3: column 'age' is NaN/Inf: 'nan' (a missing value"),
        ("mean", "old", "line 3: column 'age' is not a number: 'old'"),
    ],
    ids=["default refuses empty", "refuse NA", "refuse nan", "not a missing mark"],
)
def test_missing_cells_are_refused_unless_imputed(
    tmp_path: Path, missing: str | None, mark: str, message: str
) -> None:
    report = validate_site(missing_site(tmp_path, missing, marks=(mark,)))
    assert any(message in p.message for p in report.problems), report.format()


def test_a_column_without_train_values_cannot_be_imputed(tmp_path: Path) -> None:
    toml = missing_site(tmp_path, "median")
    rows = list(csv.DictReader((tmp_path / "site0.csv").open()))
    for row in rows:
        if row["split"] == "train":
            row["grade"] = ""
    kit.write_csv(tmp_path / "site0.csv", rows)
    message = (
        "column(s) 'grade' have no value in the train split, so [preprocessing].missing cannot impute them "
        "(imputation learns from the train split only, never from val or test rows)"
    )
    assert [(p.file, p.message) for p in validate_site(toml).problems] == [("site0.csv", message)]  # as load_site
    with pytest.raises(
        SiteValidationError, match=r"site0.csv: column\(s\) 'grade' have no value in the train split"
    ):
        load_site(toml)
    for row in rows:
        row["grade"] = "?"
    kit.write_csv(tmp_path / "site0.csv", rows)
    report = validate_site(toml)
    assert [p.message for p in report.problems] == [
        "column(s) 'grade' have no value in any row, so [preprocessing].missing cannot impute them"
    ]


@pytest.mark.parametrize(
    ("kind", "change", "message"),
    [
        (
            "image",
            {"preprocessing": {"missing": "mean"}},
            "[preprocessing].missing must be 'refuse' for task 'classification' (imputation applies to tabular "
            "data only), got 'mean'",
        ),
        ("table", {"preprocessing": {"missing": "mode"}}, "[preprocessing].missing"),
        (
            "table",
            {"source": {"feature_columns": ["age", "psa", "age"]}},
            "[source].feature_columns must name each column once, got ['age'] more than once",
        ),
    ],
    ids=["imputing images", "unknown strategy", "repeated feature column"],
)
def test_site_file_errors(tmp_path: Path, kind: str, change: dict[str, dict[str, Any]], message: str) -> None:
    toml = kit.png_site(tmp_path) if kind == "image" else kit.tabular_site(tmp_path)
    doc = kit.site_doc(
        "images_csv" if kind == "image" else "tabular_csv",
        "classification" if kind == "image" else "tabular",
        source={"csv": "labels.csv" if kind == "image" else "table.csv"},
    )
    for section, values in change.items():
        doc[section].update(values)
    kit.write_toml(toml, doc)
    with pytest.raises(ConfigError) as err:
        load_site_config(toml)
    assert message in str(err.value) and str(toml) in str(err.value)


@pytest.mark.parametrize("intensity", ["zscore", "minmax", "none"])
def test_new_rows_get_the_sites_preprocessing_bit_for_bit(tmp_path: Path, intensity: str) -> None:
    from fedfew_med.data.transforms import apply_feature_statistics

    toml = missing_site(tmp_path, "median")
    toml.write_text(toml.read_text().replace('intensity = "none"', f'intensity = "{intensity}"'))
    site = load_site(toml)
    raw = np.array([[np.nan if a is None else a, np.nan if p is None else p, r[2]]
                    for r, a, p in zip(RECORDS, MISSING_AGE, MISSING_PSA, strict=True)], dtype=np.float32)
    splits = np.array([r[4] for r in RECORDS])
    for split in SPLITS:  # the site's own rows, as new rows: exactly what training made of them
        np.testing.assert_array_equal(apply_feature_statistics(raw[splits == split], site.metadata), served(site, split))
    refusing = load_site(table_site(tmp_path / "r", "site0", ["age", "psa", "grade", "label", "split"]))
    with pytest.raises(ValueError, match="a feature is missing and the site does not impute"):
        apply_feature_statistics(raw[:2], refusing.metadata)
    with pytest.raises(ValueError, match=r"expected rows of 3 features, got shape \(2, 2\)"):
        apply_feature_statistics(raw[:2, :2], site.metadata)

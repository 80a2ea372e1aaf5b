"""``predict`` for tabular sites: a CSV of new rows, read by column name, through the site's own preprocessing.

References: the site's train-split statistics and the logistic regression's output are worked out here
with numpy from the CSV (read back with ``csv.DictReader``) and the run's checkpointed weights.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedfew_med import checkpoint
from fedfew_med.cli import main
from fedfew_med.config import ConfigError
from fedfew_med.data.sites import load_site
from fedfew_med.evaluation.choose import choose_model
from fedfew_med.evaluation.predict import predict, predict_new_scan
from tests.data import sitekit as kit
from tests.evaluation.sitefed import federation, named

FEATURES = ["age", "psa", "grade"]


def write_site(folder: Path, seed: int, columns: list[str], missing: str = "refuse", n: int = 30) -> Path:
    """A tabular site of ``n`` rows whose label follows age + psa; columns in the order ``columns``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        age, psa, grade = float(rng.normal(60, 8)), float(rng.gamma(2.0, 2.0)), int(rng.integers(1, 5))
        row = {"age": round(age, 2), "psa": round(psa, 3), "grade": grade,
               "label": kit.NAMES[int(age / 60 + psa / 4 > 2.0)], "split": ("train", "train", "train", "val", "test")[i % 5]}
        rows.append({c: row[c] for c in columns})
    kit.write_csv(folder / "data.csv", rows)
    doc = kit.site_doc("tabular_csv", "tabular", source={"csv": "data.csv", "split_column": "split"},
                       preprocessing={"intensity": "zscore", "missing": missing})
    return kit.write_toml(folder / "site.toml", doc)


@pytest.fixture(scope="module")
def tab_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("predict_rows")
    order = [*FEATURES, "label", "split"]
    files = [named(write_site(root / "s0", 0, order, "mean"), "site0"),
             named(write_site(root / "s1", 1, ["grade", "label", "psa", "split", "age"]), "site1"),  # another order
             named(write_site(root / "s2", 2, order), "site2")]
    return federation(root, files[:2], 'name = "logreg"'), files


def rows_of(path: Path, split: str | None = None) -> list[dict[str, str]]:
    return [r for r in csv.DictReader(path.open()) if split is None or r["split"] == split]


def by_hand(run_dir: Path, model: int, x: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Class probabilities of server model ``model`` on raw rows ``x`` (N, F), z-scored with ``train``'s statistics."""
    params = checkpoint.load(run_dir).server_models[model]  # type: ignore[union-attr]
    z = (x - train.mean(axis=0)) / train.std(axis=0)
    logits = z @ params["weight"].double().numpy().T + params["bias"].double().numpy()
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_the_sites_test_rows_are_scored_as_the_run_scored_them(tab_run: Any, tmp_path: Path) -> None:
    run_dir, files = tab_run
    table = files[1].parent / "data.csv"  # site1: its CSV's columns are in another order than the federation's
    result = predict(run_dir, files[1], table, tmp_path / "out")
    test = rows_of(table, "test")
    assert result.unit == "row" and not result.skipped
    assert len(result.rows) == len(rows_of(table))  # every row of the file; the test rows are checked below
    got = [r for r, src in zip(rows_of(result.table), rows_of(table), strict=True) if src["split"] == "test"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["features"] == FEATURES
    per_site = summary["per_site"]["site1"]
    accuracy = np.mean([int(r["correct"]) for r in got])
    assert accuracy == pytest.approx(per_site["metrics"]["accuracy"])
    train = np.array([[float(r[c]) for c in FEATURES] for r in rows_of(table, "train")])
    x = np.array([[float(r[c]) for c in FEATURES] for r in test])
    want = by_hand(run_dir, per_site["model"], x, train)
    np.testing.assert_allclose([[float(r["p_no_tumor"]), float(r["p_tumor"])] for r in got], want, atol=2e-6)
    assert [r["label"] for r in got] == [r["label"] for r in test]


def test_columns_are_matched_by_name_and_the_others_are_copied(tab_run: Any, tmp_path: Path) -> None:
    run_dir, files = tab_run
    source = rows_of(files[0].parent / "data.csv", "test")
    shuffled = [{"patient": f"p{i}", "psa": r["psa"], "grade": r["grade"], "age": r["age"]} for i, r in enumerate(source)]
    kit.write_csv(tmp_path / "new.csv", shuffled)
    plain = [{c: r[c] for c in FEATURES} for r in source]
    kit.write_csv(tmp_path / "plain.csv", plain)
    a = predict(run_dir, files[0], tmp_path / "new.csv", tmp_path / "a").rows
    b = predict(run_dir, files[0], tmp_path / "plain.csv", tmp_path / "b").rows
    assert [r["patient"] for r in a] == [f"p{i}" for i in range(len(source))]
    assert list(a[0])[:2] == ["patient", "input"]  # identifiers first
    assert [(r["p_tumor"], r["predicted"]) for r in a] == [(r["p_tumor"], r["predicted"]) for r in b]
    assert "label" not in a[0]  # no label column: nothing scored


def test_a_missing_cell_is_imputed_with_the_train_mean_where_the_site_imputes(tab_run: Any, tmp_path: Path) -> None:
    run_dir, files = tab_run
    table = files[0].parent / "data.csv"
    train = rows_of(table, "train")
    mean_psa = float(np.mean([float(r["psa"]) for r in train]))
    kit.write_csv(tmp_path / "gap.csv", [{"age": "61", "psa": "NA", "grade": "2"}, {"age": "61", "psa": repr(mean_psa), "grade": "2"}])
    rows = predict(run_dir, files[0], tmp_path / "gap.csv", tmp_path / "o").rows
    assert rows[0]["p_tumor"] == pytest.approx(rows[1]["p_tumor"], abs=1e-6)


def test_bad_rows_are_named_and_skipped_and_the_rest_is_predicted(tab_run: Any, tmp_path: Path, capsys: Any) -> None:
    run_dir, files = tab_run
    kit.write_csv(tmp_path / "new.csv", [
        {"age": "61", "psa": "3.5", "grade": "2", "label": "tumor"},
        {"age": "old", "psa": "3.5", "grade": "2", "label": ""},
        {"age": "55", "psa": "", "grade": "1", "label": "no_tumor"},  # site1 does not impute
        {"age": "70", "psa": "9", "grade": "4", "label": "maybe"},
        {"age": "48", "psa": "1", "grade": "1", "label": "no_tumor"},
    ])
    code = main(["predict", str(run_dir), "--site-config", str(files[1]), "--input", str(tmp_path / "new.csv"),
                 "--output", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert code == 1
    assert "2 row(s) predicted with server model" in out
    assert "accuracy on the 2 labelled row(s):" in out
    assert f"skipped {tmp_path / 'new.csv'} line 3: column 'age' is not a number: 'old'" in out
    assert f"skipped {tmp_path / 'new.csv'} line 4: column 'psa' is empty (a missing value" in out
    assert f"skipped {tmp_path / 'new.csv'} line 5: label 'maybe' is neither a class index nor one of the names" in out
    assert [r["input"] for r in rows_of(tmp_path / "o" / "predictions.csv")] == [
        f"{tmp_path / 'new.csv'} line {n}" for n in (2, 6)]


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        ("age,grade\n61,2\n", ValueError, r"new.csv: missing column\(s\) 'psa'; the CSV has columns 'age', 'grade'"),
        ("", ValueError, r"new.csv: the CSV file is empty \(no header line\)"),
        (None, FileNotFoundError, r"--input .*new.csv: no such file \(a tabular site reads a CSV of rows\)"),
    ],
    ids=["a feature column missing", "empty file", "no such file"],
)
def test_an_input_that_cannot_be_read_as_the_sites_rows_is_refused(
    tab_run: Any, tmp_path: Path, content: str | None, error: type[Exception], message: str
) -> None:
    run_dir, files = tab_run
    if content is not None:
        (tmp_path / "new.csv").write_text(content)
    with pytest.raises(error, match=message):
        predict(run_dir, files[0], tmp_path / "new.csv", tmp_path / "o")
    assert not (tmp_path / "o" / "predictions.csv").exists()


def test_a_joining_site_reads_its_columns_in_the_federations_order(tab_run: Any, tmp_path: Path) -> None:
    run_dir, files = tab_run
    moved = named(write_site(tmp_path / "s3", 3, ["split", "psa", "label", "age", "grade"]), "site3")
    site = load_site(moved, feature_order=FEATURES)
    assert site.metadata["features"] == FEATURES
    own = load_site(moved)
    assert own.metadata["features"] == ["psa", "age", "grade"]
    choice = choose_model(run_dir, moved)  # reads the order from summary.json
    assert 0 <= choice.model < 2
    other = write_site(tmp_path / "s4", 4, ["age", "psa", "label", "split"])
    with pytest.raises(ConfigError, match=r"lacks column\(s\) 'grade'; the federation's features are 'age', 'psa', 'grade'"):
        load_site(other, feature_order=FEATURES)


def test_the_notebooks_new_scan_says_how_a_tabular_site_predicts(tab_run: Any, tmp_path: Path) -> None:
    run_dir, files = tab_run
    said = predict_new_scan(run_dir, load_site(files[0]), tmp_path)
    assert said == (f"site0: a tabular site has rows, not scans: `fedfew-med predict RUN_DIR --site-config {files[0]} "
                    "--input new_rows.csv --output OUT` scores new rows")

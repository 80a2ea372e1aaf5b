"""The README's site-file examples load with the real loader, so the documented keys stay true.

Every ```toml block of the README with a ``[site]`` table is written to a temporary folder, with
the data root and CSV file it names, and loaded by ``load_site_config``. The tabular example is
then loaded whole (``load_site``) from a table written here with the columns it names, so the
meaning given to each key (label, features and their order, split column, imputation) is checked
against the rows written.
"""

from __future__ import annotations

import csv
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedfew_med.data.sites import load_site
from fedfew_med.site_config import load_site_config

README = Path(__file__).resolve().parents[1] / "README.md"


def site_examples() -> list[str]:
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(), flags=re.DOTALL)
    return [b for b in blocks if re.search(r"^\[site\]", b, flags=re.MULTILINE)]


def tabular_example() -> str:
    found = [b for b in site_examples() if 'kind = "tabular_csv"' in b]
    assert len(found) == 1, "the README must show exactly one tabular site example"
    return found[0]


def write_example(folder: Path, text: str, header: list[str], rows: Sequence[Sequence[Any]] = ()) -> Path:
    """The example as ``site.toml`` in ``folder``, with the root, folders and files its ``[source]`` names."""
    source = tomllib.loads(text)["source"]
    root = folder / source.get("root", ".")
    for key, default in (
        ("images", "imagesTr"),
        ("labels", "labelsTr"),
    ):  # folder kinds (unused keys are harmless)
        (root / source.get(key, default)).mkdir(parents=True, exist_ok=True)
    (root / source.get("datalist", "dataset.json")).write_text('{"training": []}')
    if source.get("csv"):
        with (root / source["csv"]).open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(rows)
    site = folder / "site.toml"
    site.write_text(text)
    return site


def test_the_readme_shows_an_image_and_a_tabular_site() -> None:
    kinds = [tomllib.loads(b)["source"]["kind"] for b in site_examples()]
    assert "tabular_csv" in kinds and len(kinds) >= 2


@pytest.mark.parametrize("index", range(len(site_examples())))
def test_every_site_example_is_a_valid_site_file(tmp_path: Path, index: int) -> None:
    text = site_examples()[index]
    cfg = load_site_config(write_example(tmp_path, text, ["image", "label"]))
    assert cfg.site.name == tomllib.loads(text)["site"]["name"]


def test_the_tabular_example_means_what_its_comments_say(tmp_path: Path) -> None:
    doc = tomllib.loads(tabular_example())
    source, names, pre = doc["source"], doc["labels"]["names"], doc["preprocessing"]
    features = source["feature_columns"]
    assert pre["missing"] in ("mean", "median") and pre["intensity"] == "zscore"
    # the CSV: an unused column, the features in reverse order, the label and the split column
    header = ["unused", *reversed(features), source["label_column"], source["split_column"]]
    raw = np.array(
        [[10.0 * i + j + (i * j) % 3 for j in range(len(features))] for i in range(10)]
    )  # example order
    splits = ["train"] * 7 + ["val", "test", "test"]
    rows: list[list[Any]] = [[-1, *reversed(x.tolist()), names[i % 2], splits[i]] for i, x in enumerate(raw)]
    rows[0][1] = "NA"  # the last feature of the first (train) record is missing
    site = load_site(write_example(tmp_path, tabular_example(), header, rows))
    assert site.metadata["features"] == features and site.in_channels == len(features)
    assert [site.size(s) for s in ("train", "val", "test")] == [7, 1, 2]
    # the reference, by hand: the train split's statistic (without the missing cell) fills it ...
    stat = np.median if pre["missing"] == "median" else np.mean
    filled = raw.copy()
    filled[0, -1] = stat(raw[1:7, -1])
    assert site.metadata["imputed_with"][-1] == pytest.approx(filled[0, -1])
    # ... then z-scores with the train split's mean and standard deviation, features in the example's order
    mean, std = filled[:7].mean(axis=0), filled[:7].std(axis=0)
    served = np.stack([site.splits["test"][k]["image"].numpy() for k in range(2)])
    np.testing.assert_allclose(served, (filled[8:] - mean) / std, rtol=1e-5)

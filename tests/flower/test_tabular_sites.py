"""Tabular sites on Flower: each SuperNode loads its table alone, so the coordinator compares column names.

Hospitals described by their own site files (``site-config``) whose CSV files differ in the
order, the presence or the names of their columns; every message goes through the real
ClientApp handlers over the in-process grid (``fakegrid.py``). A site whose columns are not
the admitted sites' (names and order) is refused for the run instead of training on crossed
features.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedfew_med.flower import codec
from fedfew_med.flower.client_app import app as client_app
from fedfew_med.flower.coordinator import Coordinator, ServerSettings
from fedfew_med.runtime import ModelFacts
from tests.data import sitekit as kit
from tests.flower.conftest import write_config
from tests.flower.fakegrid import LocalGrid

pytestmark = pytest.mark.usefixtures("task_identity")
ORDER = ["age", "psa", "grade"]


def hospital(folder: Path, name: str, columns: list[str], **source: object) -> Path:
    """A tabular site whose CSV has ``columns`` (then label) in this order; values by column name."""
    folder.mkdir(parents=True)
    rows = [
        {**{c: round(10.0 * i + len(c) + (i % 3), 2) for c in columns}, "label": kit.NAMES[i % 2]}
        for i in range(24)
    ]
    kit.write_csv(folder / "table.csv", rows)
    doc = kit.site_doc("tabular_csv", "tabular", source={"csv": "table.csv", **source}, site={"name": name})
    return kit.write_toml(folder / "site.toml", doc)


CASES = [  # id, the third hospital's columns and [source] keys, accepted?
    ("same columns", ORDER, {}, True),
    ("another order", ["grade", "age", "psa"], {}, False),
    ("another order, named in feature_columns", ["grade", "age", "psa"], {"feature_columns": ORDER}, True),
    ("a column missing", ["age", "psa"], {}, False),
    ("an extra column", [*ORDER, "weight"], {}, False),
]


@pytest.mark.parametrize(("columns", "source", "accepted"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_site_with_other_columns_is_refused(
    tmp_path: Path, columns: list[str], source: dict, accepted: bool, caplog: pytest.LogCaptureFixture
) -> None:
    files = [
        hospital(tmp_path / "a", "hospital-a", ORDER),
        hospital(tmp_path / "b", "hospital-b", ORDER),
        hospital(tmp_path / "c", "hospital-c", columns, **source),
    ]
    path = tmp_path / "fed.toml"
    config = write_config(
        path,
        run={"rounds": 1},
        algorithm={"name": "fedavg", "params": {}},
        model={"name": "logreg", "params": {}},
        data={"name": "sites", "params": {"files": [str(f) for f in files]}},
    )
    nodes = {
        101 + i: {"site-config": str(f), "state-dir": str(tmp_path / f"state{i}")}
        for i, f in enumerate(files)
    }
    settings = ServerSettings(
        federation_config=path,
        run_dir=tmp_path / "run",
        connect_timeout=1.0,
        query_timeout=5.0,
        round_timeout=30.0,
        poll_interval=0.05,
    )
    coordinator = Coordinator(LocalGrid(client_app, nodes), config, settings)
    with caplog.at_level("ERROR", logger="fedfew_med"):
        result = coordinator.run()
    assert coordinator.roster["hospital-a"].features == tuple(ORDER)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["features"] == ORDER  # the order predict and choose-model read a site's columns in
    if accepted:
        assert coordinator.rejected == set() and result.records[0]["participants"] == [
            "hospital-a",
            "hospital-b",
            "hospital-c",
        ]
        return
    assert coordinator.rejected == {103} and "hospital-c" not in coordinator.roster
    (message,) = [m for m in caplog.messages if "hospital-c" in m]
    how = codec_mismatch(columns)
    assert (
        f"SuperNode 103 (site hospital-c) refused for this run: its table {how}, compared with site hospital-a"
        in message
    )
    assert f"feature columns are {ORDER}" in message


def codec_mismatch(columns: list[str]) -> str:
    """What the refusal says, written out by hand for the cases above."""
    if columns == ["grade", "age", "psa"]:
        return "has the same columns in another order: 'grade', 'age', 'psa'"
    if columns == ["age", "psa"]:
        return "lacks column(s) 'grade'"
    return "has extra column(s) 'weight'"


def test_site_cards_carry_feature_names_and_old_cards_read_as_before() -> None:
    card = codec.SiteCard("h", 30, ModelFacts("tabular", 3, 2, 0, 0), features=("age", "psa", "grade"))
    assert codec.decode_site(codec.encode_site(card)) == card
    assert codec.SiteCard.from_json("h", card.to_json()) == card
    image = codec.SiteCard("i", 30, ModelFacts("classification", 1, 2, 2, 16))
    assert "features" not in codec.encode_site(image) and "features" not in image.to_json()
    assert codec.decode_site(codec.encode_site(image)).features == ()
    record = codec.encode_site(card)
    record["features"] = '{"age": 1}'
    with pytest.raises(codec.CodecError, match="features must be a JSON list of column names"):
        codec.decode_site(record)

"""End to end: a short DP run (and a non-DP baseline) → privacy report; every number equals the ledger.

Slow (two tiny federations, about half a minute on 2 loaded cores): CI runs them with ``make test-slow``.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedfew_med import cli
from fedfew_med.config import federation_from_dict
from fedfew_med.dp import PrivacyLedger
from fedfew_med.simulation import run
from tests.conftest import tiny_dict

pytestmark = pytest.mark.slow

DATA = {"num_sites": 3, "image_size": 16, "train_min": 24, "train_max": 24, "test_per_site": 12, "seed": 1}
REPO_POLICY = Path(__file__).resolve().parents[2] / "privacy" / "policy.toml"


def _config(name, rounds, privacy=None):
    d = tiny_dict(run={"name": name, "seed": 3, "rounds": rounds}, algorithm={"name": "fedfew", "params": {"k": 2, "mu": 0.5}},
                  data={"name": "synthetic", "params": DATA})
    if privacy is not None:
        d["privacy"] = privacy
    return federation_from_dict(d, source=f"{name}.toml")


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("privacy-report")
    run(_config("dp", 2, {"epsilon": 8.0}), run_dir=root / "dp")
    run(_config("plain", 1), run_dir=root / "plain")
    code = cli.main(["privacy-report", str(root / "dp"), "--baseline", str(root / "plain"), "--policy", str(REPO_POLICY),
                     "-o", str(root / "out"), "--resamples", "100"])
    assert code == 0
    return root


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _lookup(report: Any, key: str) -> Any:
    node, parts = report, key.split(".")
    while parts:
        part = parts.pop(0)
        if isinstance(node, list):
            node = node[int(part)]
            continue
        while part not in node and parts:  # keys such as "0.01" contain dots
            part += "." + parts.pop(0)
        node = node[part]
    return node


class _Cells(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[str, Any] = {}
        self.images: list[dict[str, str | None]] = []
        self.data_json: str | None = None
        self._in_data = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if "data-value" in a and a.get("data-key"):
            self.cells[str(a["data-key"])] = json.loads(str(a["data-value"]))
        if tag == "img":
            self.images.append(a)
        self._in_data = tag == "script" and a.get("id") == "report-data"

    def handle_data(self, data: str) -> None:
        if self._in_data:
            self.data_json = (self.data_json or "") + data

    def handle_endtag(self, tag: str) -> None:
        self._in_data = False


def test_every_number_in_the_report_equals_the_ledger(report_dir):
    dp = report_dir / "dp"
    report = json.loads((report_dir / "out" / "privacy_report.json").read_text())
    summary = json.loads((dp / "summary.json").read_text())
    records = _records(dp)
    state = json.loads((dp / "checkpoints" / "round-00001" / "state.json").read_text())
    assert set(report["privacy"]["sites"]) == set(summary["privacy"]) == set(DATA and summary["per_site"])
    for site, row in report["privacy"]["sites"].items():
        final = summary["privacy"][site]
        for key in ("epsilon", "delta", "target_epsilon", "accountant", "noise_multiplier", "loss_noise_multiplier", "max_grad_norm",
                    "loss_clip", "sample_rate", "steps", "loss_releases", "grad_sample_mode", "stopped", "digest", "mechanisms", "planned"):
            assert row[key] == final[key], (site, key)
        assert row["epsilon_by_round"] == [{"round": r["round"], "epsilon": r["privacy"][site]["epsilon"]} for r in records]
        # the checkpoint's ledger, re-read here with a fresh accountant, gives the same ε and digest
        ledger = PrivacyLedger.from_state_dict(state["state"]["privacy"]["sites"][site]["ledger"])
        assert math.isclose(ledger.epsilon(), row["epsilon"], rel_tol=1e-9) and ledger.digest() == row["digest"]
        assert row["ledger_check"]["matches"] is True
        kinds = {m["kind"] for m in row["mechanisms"]}
        assert kinds == {"dp-sgd", "loss"}
        left = report["left_sites"][site]
        assert left["losses_reported"] == sum(len(r["site_losses"][site]) for r in records) == row["loss_releases"]
        assert left["parameter_bytes"] == summary["bytes_total"][site]["received"]
        assert left["record_count"] == summary["per_site"][site]["n_train"] == 24
    dig = report["digests"]
    assert dig["verified"] and dig["config_digest"] == summary["config_digest"] == state["state"]["config_digest"]
    assert dig["models_sha256"] == summary["models_sha256"]
    assert [c["digests"] for c in dig["checkpoints"]][-1] == state["digests"]
    assert report["policy"]["compliant"] and not [v for v in report["policy"]["verdicts"] if v["ok"] is False]
    for site, check in report["attack"]["checks"].items():
        assert check["accounted_epsilon"] == summary["privacy"][site]["epsilon"]
        assert check["consistent"] and check["epsilon_lower_bound"] <= check["accounted_epsilon"]
        for key in ("run", "baseline"):
            r = report["attack"][key][site]
            assert 0 <= r["auc_ci"][0] <= r["auc"] <= r["auc_ci"][1] <= 1
            assert (r["members"], r["nonmembers"]) == (24, 12)


def test_every_number_on_the_page_equals_the_json(report_dir):
    report = json.loads((report_dir / "out" / "privacy_report.json").read_text())
    page = (report_dir / "out" / "privacy_report.html").read_text()
    parser = _Cells()
    parser.feed(page)
    assert parser.data_json is not None and json.loads(parser.data_json) == report
    assert len(parser.cells) > 60
    for key, value in parser.cells.items():
        assert _lookup(report, key) == value, key
    for site in report["privacy"]["sites"]:  # the ledger table shows every site's numbers
        for col in ("epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "steps", "accountant"):
            assert f"privacy.sites.{site}.{col}" in parser.cells
    ids = [img.get("id") for img in parser.images]
    assert ids == ["plot-epsilon", "plot-roc"]
    assert all(str(img.get("src")).startswith("data:image/png;base64,") for img in parser.images)
    assert "http://" not in page and "https://" not in page  # nothing to fetch
    # the page opens with the plain-words summary, one sentence per DP site with its ε, budget and rounds left
    assert page.index("<h2>In plain words</h2>") < page.index("<h2>Policy compliance</h2>")
    for site, row in report["privacy"]["sites"].items():
        assert any(line.startswith(f"Site {site} spent ε = ") for line in report["summary"])
        assert f"privacy.sites.{site}.rounds_left" in parser.cells and (row["rounds_left"] is None or row["rounds_left"] >= 0)
    assert any("per record" in line for line in report["summary"])


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "headless_shell"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_the_report_renders_in_headless_chromium_with_its_plots(report_dir, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no headless browser installed (Debian: apt-get install -y chromium)")
    page = (report_dir / "out" / "privacy_report.html").resolve()
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([*flags, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert 'data-plots-loaded="2"' in dom  # both plots decoded by the browser
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1280,2600", "--hide-scrollbars", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[0] >= 2000 and pixels.shape[1] >= 1200
    c0 = np.abs(pixels - np.array([31, 119, 180])).sum(axis=2) < 40  # matplotlib's first line colour: only the plots use it
    assert c0.sum() > 200, "no plot lines visible in the screenshot"

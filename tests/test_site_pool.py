"""simulate --workers N: sites computed in forked processes give the sequential run's numbers to the bit."""

from __future__ import annotations

import json

import pytest
import torch

from fedfew_med import runtime
from fedfew_med.cli import main
from fedfew_med.config import ConfigError, federation_from_dict
from fedfew_med.simulation import run
from tests.conftest import tiny_dict

ALGORITHMS = {
    "fedfew": {"k": 2},
    "ditto": {"lam": 0.1},  # personal models: site state travels to the workers and back
    "ifca": {"k": 2},
    "fedavg_ft": {"finetune_epochs": 1},
}


@pytest.fixture(autouse=True)
def one_thread():
    """The sequential runs at the workers' thread count (1 each): torch's reductions may split differently with more."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _config(algorithm: str = "fedfew", **sections):
    d = tiny_dict(run={"threads": 1, **sections.pop("run", {})}, **sections)
    d["algorithm"] = {"name": algorithm, "params": ALGORITHMS[algorithm]}
    return federation_from_dict(d, source="tiny.toml")


def _records(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _same(a, b):
    for ma, mb in zip(a.models, b.models, strict=True):
        assert ma.keys() == mb.keys() and all(torch.equal(ma[n], mb[n]) for n in ma)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_two_workers_equal_one_to_the_bit(tmp_path, algorithm):
    cfg = _config(algorithm)
    one = run(cfg, run_dir=tmp_path / "one")
    two = run(cfg, run_dir=tmp_path / "two", workers=2)
    _same(one, two)
    assert _records(tmp_path / "one") == _records(tmp_path / "two")
    assert one.summary == two.summary


def test_more_workers_than_sites_and_resume_with_another_count(tmp_path):
    cfg = _config()
    straight = run(cfg, run_dir=tmp_path / "straight")
    run(cfg, run_dir=tmp_path / "split", stop_after=2, workers=5)  # 3 sites, 5 processes
    resumed = run(cfg, run_dir=tmp_path / "split", resume=True, workers=2)
    _same(straight, resumed)
    assert _records(tmp_path / "straight") == _records(tmp_path / "split")


def test_a_site_crashing_in_a_worker_is_recorded_as_in_a_sequential_run(tmp_path, monkeypatch):
    original = runtime.SiteRuntime.compute

    def flaky(self, info, models, **kwargs):
        if self.name.startswith("site01") and info.round == 1:
            raise RuntimeError("disk full at the site")
        return original(self, info, models, **kwargs)

    monkeypatch.setattr(runtime.SiteRuntime, "compute", flaky)  # inherited by the forked workers
    cfg = _config()
    one = run(cfg, run_dir=tmp_path / "one")
    two = run(cfg, run_dir=tmp_path / "two", workers=2)
    assert two.records[1]["failures"] == one.records[1]["failures"] == {"site01-dark": "RuntimeError: disk full at the site"}
    _same(one, two)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"privacy": {"epsilon": 8.0}}, r"cannot run DP sites"),
        ({"faults": {"site_timeout_s": 30.0}}, r"site_timeout_s = 30"),
    ],
)
def test_workers_refuse_what_they_cannot_reproduce(tmp_path, sections, message):
    d = {**tiny_dict(**{k: v for k, v in sections.items() if k != "privacy"}), **({"privacy": sections["privacy"]} if "privacy" in sections else {})}
    cfg = federation_from_dict(d, source="tiny.toml")
    with pytest.raises(ConfigError, match=message):
        run(cfg, run_dir=tmp_path / "r", workers=2)
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="--workers must be an integer >= 1, got 0"):
        run(_config(), run_dir=tmp_path / "r0", workers=0)


def test_cli_workers_flag(tmp_path, capsys):
    toml = tmp_path / "fed.toml"
    toml.write_text(
        '[run]\nname = "w"\nrounds = 2\nthreads = 1\n[algorithm]\nname = "fedfew"\nparams = { k = 2 }\n'
        '[training]\nlr = 0.05\nbatch_size = 8\n[model]\nname = "classifier"\nparams = { channels = [4, 8] }\n'
        '[data]\nname = "synthetic"\nparams = { num_sites = 3, image_size = 16, train_min = 12, train_max = 16, test_per_site = 8 }\n'
    )
    assert main(["simulate", str(toml), "-o", str(tmp_path / "a"), "-q"]) == 0
    assert main(["simulate", str(toml), "-o", str(tmp_path / "b"), "-q", "--workers", "2"]) == 0
    a = json.loads((tmp_path / "a/summary.json").read_text())
    b = json.loads((tmp_path / "b/summary.json").read_text())
    assert a["per_site"] == b["per_site"] and a["summary"] == b["summary"]

"""Faulty sites in the in-process federation: skipped for the round, recorded, and without effect.

Every fault is injected at the site (``SiteRuntime.compute``: what the site's code returns) so
that the server-side checks in ``Federation.site_step`` are what stops it. The reference for
"the other sites' aggregation" is a run where the faulty site is simply absent (FedAvg, whose
step does not depend on absent sites), the same algorithm's step over the good replies only
(FedFew, whose λ_i are fixed by the broadcast), and a numpy weighted mean by hand.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedfew_med import runtime, simulation
from fedfew_med.algorithms import SiteReply, build_algorithm
from fedfew_med.config import ConfigError, FaultsConfig, FederationConfig, federation_from_dict
from fedfew_med.data import build_sites
from fedfew_med.runtime import make_algorithm
from tests.conftest import tiny_dict

BAD = "site01-dark"
FEDAVG: dict[str, Any] = {"name": "fedavg", "params": {}}
NORM_BOUND = 50.0  # honest updates of the tiny federation are ~1; this leaves room and still catches "too_far"


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread, for every run here (results depend on the thread count, so the references too).

    These tiny models run several times faster so on a shared, loaded machine.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(algorithm: dict[str, Any] = FEDAVG, rounds: int = 1, **faults: float) -> FederationConfig:
    return federation_from_dict(
        {**tiny_dict(run={"rounds": rounds}), "algorithm": algorithm, "faults": {"max_update_norm": NORM_BOUND, **faults}},
        source="tiny.toml",
    )


def _first(reply: SiteReply) -> tuple[int, str]:
    k = next(iter(reply.models))
    return k, next(iter(reply.models[k]))


def _with_param(reply: SiteReply, change: Callable[[str, torch.Tensor], tuple[str, torch.Tensor]]) -> SiteReply:
    """``reply`` with the first parameter of its first model replaced by ``change(name, tensor)``."""
    k, first = _first(reply)
    params = dict(reply.models[k])
    name, value = change(first, params.pop(first))
    params[name] = value
    return SiteReply(num_samples=reply.num_samples, losses=reply.losses, models={**reply.models, k: params}, info=reply.info)


def _raise(reply: SiteReply) -> SiteReply:
    raise RuntimeError("the site's GPU fell over")


def _nan(reply: SiteReply) -> SiteReply:
    return _with_param(reply, lambda n, t: (n, t.clone().fill_(float("nan"))))


def _inf(reply: SiteReply) -> SiteReply:
    def one_inf(name: str, t: torch.Tensor) -> tuple[str, torch.Tensor]:
        out = t.clone()
        out.view(-1)[0] = float("inf")
        return name, out

    return _with_param(reply, one_inf)


def _wrong_shape(reply: SiteReply) -> SiteReply:
    return _with_param(reply, lambda n, t: (n, t.reshape(-1)[:-1].clone()))


def _wrong_key(reply: SiteReply) -> SiteReply:
    return _with_param(reply, lambda n, t: (n + "_renamed", t))


def _wrong_dtype(reply: SiteReply) -> SiteReply:
    return _with_param(reply, lambda n, t: (n, t.to(torch.float64)))


def _too_far(reply: SiteReply) -> SiteReply:
    return _with_param(reply, lambda n, t: (n, t + 100.0))  # finite, right shape, but ||Δ|| >= 100 > NORM_BOUND


def _losses(reply: SiteReply) -> SiteReply:
    return SiteReply(num_samples=reply.num_samples, losses=(*reply.losses, 0.5), models=reply.models, info=reply.info)


def _nan_loss(reply: SiteReply) -> SiteReply:
    return SiteReply(num_samples=reply.num_samples, losses=(float("nan"),), models=reply.models, info=reply.info)


FAULTS: dict[str, tuple[Callable[[SiteReply], SiteReply], str]] = {
    "raises": (_raise, "RuntimeError: the site's GPU fell over"),
    "nan": (_nan, "ValueError: model 0: .* has NaN or Inf values"),
    "inf": (_inf, "ValueError: model 0: .* has NaN or Inf values"),
    "wrong_shape": (_wrong_shape, r"ValueError: model 0: .* has shape \(\d+,\), expected \("),
    "wrong_key": (_wrong_key, "ValueError: model 0: parameter names differ .*_renamed"),
    "wrong_dtype": (_wrong_dtype, "ValueError: model 0: .* has dtype torch.float64, expected torch.float32"),
    "norm_too_large": (_too_far, r"ValueError: model 0: update norm .* exceeds \[faults\].max_update_norm = 50"),
    "wrong_number_of_losses": (_losses, "ValueError: expected 1 losses, got 2"),
    "nan_loss": (_nan_loss, "ValueError: non-finite loss reported"),
}


def _inject(monkeypatch: pytest.MonkeyPatch, fault: Callable[[SiteReply], SiteReply], *, rounds: set[int],
            seen: dict[str, SiteReply] | None = None) -> None:
    """Make site ``BAD`` return ``fault(its real reply)`` in ``rounds``; keep every real reply in ``seen``."""
    original = runtime.SiteRuntime.compute

    def compute(self: runtime.SiteRuntime, info: Any, models: Any, **kwargs: Any) -> Any:
        reply, state = original(self, info, models, **kwargs)
        if seen is not None:
            seen[self.name] = reply
        if self.name == BAD and info.round in rounds:
            return fault(reply), state
        return reply, state

    monkeypatch.setattr(runtime.SiteRuntime, "compute", compute)


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _models(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "models.safetensors"))


@pytest.fixture(scope="module")
def without_bad_site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """FedAvg's models after round 0 when site ``BAD`` does not exist at all."""
    cfg = _config()
    sites = [s for s in build_sites(cfg.data) if s.name != BAD]
    out = tmp_path_factory.mktemp("absent") / "r"
    simulation.run(cfg, run_dir=out, sites=sites)
    return _models(out)


@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_a_faulty_site_is_skipped_recorded_and_left_out_of_the_aggregate(tmp_path, monkeypatch, kind, without_bad_site):
    fault, reason = FAULTS[kind]
    seen: dict[str, SiteReply] = {}
    _inject(monkeypatch, fault, rounds={0}, seen=seen)
    cfg = _config()
    result = simulation.run(cfg, run_dir=tmp_path / "r")
    rec = _records(tmp_path / "r")[0]
    assert list(rec["failures"]) == [BAD]
    assert re.search(reason, rec["failures"][BAD]), rec["failures"][BAD]
    assert BAD not in rec["server"]["sites"] and len(rec["server"]["sites"]) == 2
    assert BAD not in rec["site_losses"] and BAD not in rec["bytes"]
    assert result.summary["failures"] == {"0": rec["failures"]}
    # the aggregate is exactly that of a federation without the site
    got = _models(tmp_path / "r")
    assert got.keys() == without_bad_site.keys()
    assert all(torch.equal(got[key], without_bad_site[key]) for key in got)
    # and, by hand, the sample-weighted mean of the good sites' returned models
    good = [seen[s] for s in sorted(seen) if s != BAD]
    weights = np.array([r.num_samples for r in good], dtype=np.float64)
    for name, value in got.items():
        stacked = np.stack([r.models[0][name.split("/", 1)[1]].double().numpy() for r in good])
        np.testing.assert_allclose(value.double().numpy(), np.average(stacked, axis=0, weights=weights), rtol=0, atol=1e-6)


def test_fedfew_aggregates_the_good_replies_under_the_round_broadcast(tmp_path, monkeypatch):
    """FedFew's λ_i are fixed by the broadcast, so the reference is its step over the good replies only."""
    seen: dict[str, SiteReply] = {}
    _inject(monkeypatch, _nan, rounds={0}, seen=seen)
    cfg = _config({"name": "fedfew", "params": {"k": 2, "mu": 0.01, "init": "perturbed"}})
    result = simulation.run(cfg, run_dir=tmp_path / "r")
    assert list(result.records[0]["failures"]) == [BAD]
    sites = build_sites(cfg.data)
    fed = simulation.Federation(cfg, sites)  # a fresh server: the round-0 broadcast
    _, initial = make_algorithm(cfg, runtime.ModelFacts.common(sites))  # and the initial models
    info = fed.round_info(0, fed.participants(0))
    algorithm = build_algorithm(cfg.algorithm.name, cfg.algorithm.params, seed=cfg.run.seed)
    expected = algorithm.aggregate(info, initial, {s: seen[s] for s in sorted(seen) if s != BAD})
    for got, want in zip(result.models, expected.models, strict=True):
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in got)


def test_a_site_that_hangs_is_skipped_and_its_late_reply_is_never_applied(tmp_path, monkeypatch):
    """Site ``BAD`` blocks in round 1 until round 3 ends; the limit skips it, and it stays skipped while busy.

    The run must equal, to the bit, a run where the site simply fails in exactly the rounds it was
    skipped: so the late reply (ready before round 5 starts) changed neither the models nor the
    site's state, and the abandoned thread disturbed no other site.
    """
    release, finished = threading.Event(), threading.Event()
    original = runtime.SiteRuntime.compute

    def compute(self: runtime.SiteRuntime, info: Any, models: Any, **kwargs: Any) -> Any:
        if self.name == BAD and info.round == 1:
            assert release.wait(30), "the test never released the hung site"
            out = original(self, info, models, **kwargs)
            finished.set()
            return out
        return original(self, info, models, **kwargs)

    def round_end(record: dict[str, Any]) -> None:
        if record["round"] == 3:
            release.set()

    def round_start(r: int, participants: Any) -> None:
        if r == 5:
            assert finished.wait(30), "the hung site's thread never finished"

    monkeypatch.setattr(runtime.SiteRuntime, "compute", compute)
    ditto = {"name": "ditto", "params": {"lam": 0.1}}  # a personal model per site: its state must stay put
    cfg = _config(ditto, rounds=7, site_timeout_s=1.0)
    hung = simulation.run(cfg, run_dir=tmp_path / "hung", callbacks=simulation.Callbacks(on_round_start=round_start, on_round_end=round_end))
    skipped = {r["round"]: r["failures"][BAD] for r in hung.records if r["failures"]}
    assert all(list(r["failures"]) in ([], [BAD]) for r in hung.records)
    assert skipped[1].startswith("SiteTimeout: site 'site01-dark' did not finish round 1 within [faults].site_timeout_s = 1 s")
    busy = sorted(r for r in skipped if r != 1)
    assert busy == list(range(2, 2 + len(busy))) and 2 in busy and 6 not in busy  # busy from round 2 until it ended
    assert all(skipped[r].startswith("SiteBusy: site 'site01-dark' is still running its round-1 step") for r in busy)
    assert hung.summary["finished"]

    def fail(reply: SiteReply) -> SiteReply:
        raise RuntimeError("down")

    monkeypatch.setattr(runtime.SiteRuntime, "compute", original)
    _inject(monkeypatch, fail, rounds=set(skipped))
    inline = _config(ditto, rounds=7)  # no limit: sites run inline on the shared network, as by default
    plain = simulation.run(inline, run_dir=tmp_path / "plain")
    assert {r["round"] for r in plain.records if r["failures"]} == set(skipped)
    for name in ("models.safetensors", "checkpoints/round-00006/sites.safetensors", "checkpoints/round-00006/server.safetensors"):
        a, b = load_file(str(tmp_path / "hung" / name)), load_file(str(tmp_path / "plain" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert any(k.startswith(f"{BAD}/models/personal/") for k in load_file(str(tmp_path / "hung/checkpoints/round-00006/sites.safetensors")))
    strip = ("seconds", "failures")
    assert [{k: v for k, v in r.items() if k not in strip} for r in _records(tmp_path / "hung")] == \
        [{k: v for k, v in r.items() if k not in strip} for r in _records(tmp_path / "plain")]


def test_faults_section_defaults_and_errors():
    base = tiny_dict()
    assert federation_from_dict(base).faults == FaultsConfig(site_timeout_s=0.0, max_update_norm=1e4)
    # at its defaults the section is left out of the resolved config: older runs keep their digest
    assert "faults" not in federation_from_dict({**base, "faults": {"max_update_norm": 1e4}}).to_dict()
    assert federation_from_dict({**base, "faults": {}}).digest() == federation_from_dict(base).digest()
    set_ = federation_from_dict({**base, "faults": {"site_timeout_s": 30}})
    assert set_.to_dict()["faults"] == {"site_timeout_s": 30.0, "max_update_norm": 1e4}
    assert set_.digest() != federation_from_dict(base).digest()
    for key, value, message in [
        ("site_timeout_s", -1, r"\[faults\]\.site_timeout_s must be a finite number of seconds >= 0 \(0: no limit\), got -1"),
        ("max_update_norm", float("inf"), r"\[faults\]\.max_update_norm must be a finite number >= 0 \(0: no bound\), got inf"),
        ("max_update_norm", float("nan"), r"max_update_norm must be a finite number >= 0"),
        ("site_timeout_s", "10s", r"\[faults\]\.site_timeout_s must be a number, got '10s'"),
        ("retries", 3, r"\[faults\]: unknown key 'retries'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            federation_from_dict({**base, "faults": {key: value}}, source="f.toml")

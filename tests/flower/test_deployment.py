"""Real deployment on loopback: one SuperLink and three SuperNodes, TLS and SuperNode authentication on.

These start the ``flower-superlink`` / ``flower-supernode`` executables and submit the
run with ``flwr run``, as a hospital network would. They take minutes (every Flower
message starts a fresh ClientApp process that imports torch), so they are marked
``integration``; every wait is bounded and every process is killed at the end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedfew_med import checkpoint
from fedfew_med.flower.commands import transport_facts
from fedfew_med.simulation import run as simulate
from tests.flower.conftest import write_config
from tests.flower.harness import CONNECTION, LoopbackFederation, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # real processes: minutes; run by `make test-slow`
NAMES = ["site00-bright", "site01-dark", "site02-noisy"]


def _federation(tmp_path: Path, config_path: Path) -> LoopbackFederation:
    node_configs = {
        name: {"federation-config": str(config_path), "site-index": i, "state-dir": str(tmp_path / f"state-{name}")}
        for i, name in enumerate(NAMES)
    }
    return LoopbackFederation(tmp_path, sites=NAMES, node_configs=node_configs)


def _run_config(run_dir: Path, config_path: Path, **extra):
    base = {"federation-config": str(config_path), "run-dir": str(run_dir), "expected-sites": 3,
            "connect-timeout": 120.0, "query-timeout": 120.0, "round-timeout": 180.0, "poll-interval": 0.2}
    return {**base, **extra}


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _models(run_dir: Path, k: int) -> list[dict[str, torch.Tensor]]:
    flat = load_file(str(run_dir / "models.safetensors"))
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(k)]
    for key, t in flat.items():
        i, name = key.split("/", 1)
        out[int(i)][name] = t
    return out


# DP at every site (fixed noise: no σ search in each ClientApp process) and at the server
DP = {"privacy": {"epsilon": 50.0, "noise_multiplier": 1.0, "loss_noise_multiplier": 5.0},
      "server_privacy": {"clip": 1.0, "noise_multiplier": 0.8},
      "algorithm": {"name": "fedfew", "params": {"k": 2, "mu": 0.01, "reseed_after": 0}}}  # server DP: no re-seeding


@pytest.mark.parametrize("tables", [{}, DP], ids=["plain", "dp"])
def test_two_rounds_over_tls_with_authenticated_sites_equal_the_simulation(tmp_path, tables):
    config_path = tmp_path / "federation.toml"
    config = write_config(config_path, run={"rounds": 2}, **tables)
    expected = simulate(config, run_dir=tmp_path / "sim")
    run_dir = tmp_path / "run"
    with _federation(tmp_path, config_path) as fed:
        fed.start_all()
        fed.run(_run_config(run_dir, config_path))
        wait_for(lambda: (run_dir / "summary.json").exists(), timeout=600, interval=1, what="the run to finish",
                 diagnostics=fed.logs)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and summary["rounds"] == 2 and summary["failures"] == {}
    models = _models(run_dir, 2)
    worst = 0.0
    for got, want in zip(models, expected.models, strict=True):
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0.0)
            worst = max(worst, float((got[name] - want[name]).abs().max()))
    print(f"K={len(models)} models, max |flower - in-process| = {worst:.3e}")  # shown with pytest -rP
    ours, theirs = _records(run_dir / "metrics.jsonl"), _records(tmp_path / "sim" / "metrics.jsonl")
    assert [(r["round"], r["participants"], r["failures"], r["assignments"]) for r in ours] == [
        (r["round"], r["participants"], r["failures"], r["assignments"]) for r in theirs
    ]
    assert [r["bytes"] for r in ours] == [r["bytes"] for r in theirs]
    if tables:  # each site's ledger (ε, σ, steps, digest) and the server's, round by round, as in the simulation
        assert [(r["privacy"], r["privacy_stopped"], r["server_privacy"]) for r in ours] == [
            (r["privacy"], r["privacy_stopped"], r["server_privacy"]) for r in theirs
        ]
        assert all(0 < ours[-1]["privacy"][name]["epsilon"] for name in NAMES)
        for name in NAMES:  # and it is on the site's disk, where a restarted SuperNode finds it
            [ledger] = (tmp_path / f"state-{name}").glob(f"*/{name}/privacy.json")
            assert json.loads(ledger.read_text())["site"] == name


def test_a_stopped_site_is_recorded_and_a_restarted_server_resumes_from_the_last_round(tmp_path):
    """Round 0 with three sites; then one SuperNode and the SuperLink (with its ServerApp) are killed
    while round 1 runs. The restarted SuperLink resumes the run at round 1, which finishes with the
    two remaining sites and records the third as missing."""
    config_path = tmp_path / "federation.toml"
    write_config(config_path, run={"rounds": 2})
    run_dir = tmp_path / "run"
    metrics = run_dir / "metrics.jsonl"
    with _federation(tmp_path, config_path) as fed:
        fed.start_all()
        fed.run(_run_config(run_dir, config_path))
        wait_for(lambda: checkpoint.latest_round(run_dir) == 0, timeout=300, interval=0.2, what="round 0",
                 diagnostics=fed.logs)
        fed.crash_supernode("site02-noisy")  # SIGKILL: no goodbye to the SuperLink
        fed.crash_superlink()  # SIGKILL: the coordinator (ServerApp) dies with it, in the middle of round 1
        assert checkpoint.latest_round(run_dir) == 0 and not (run_dir / "summary.json").exists()
        before = metrics.read_text().splitlines()
        assert len(before) == 1

        fed.start_superlink()  # same port, same database: the registered SuperNodes reconnect
        fed.wait_online(2)
        # The killed SuperNode stays listed until its heartbeat expires (<= 60 s): the coordinator's query of it
        # ends then, or after query-timeout, whichever is first; the live ones reconnect well within it.
        fed.run(_run_config(run_dir, config_path, resume=True, **{"expected-sites": 2, "query-timeout": 60.0}))
        wait_for(lambda: (run_dir / "summary.json").exists(), timeout=400, interval=1, what="the resumed run",
                 diagnostics=fed.logs)
    records = _records(metrics)
    assert [r["round"] for r in records] == [0, 1]
    assert metrics.read_text().splitlines()[:1] == before  # round 0 was not run again (its timing would differ)
    assert records[0]["failures"] == {} and sorted(records[0]["server"]["sites"]) == NAMES
    assert records[1]["participants"] == NAMES
    assert list(records[1]["failures"]) == ["site02-noisy"]
    assert records[1]["failures"]["site02-noisy"].startswith("SiteOffline")
    assert sorted(records[1]["server"]["sites"]) == NAMES[:2]
    assert sorted(records[1]["metrics"]) == NAMES[:2]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and summary["rounds"] == 2
    assert summary["failures"] == {"1": records[1]["failures"]}


def test_a_supernode_killed_mid_round_costs_at_most_site_timeout_s(tmp_path):
    """One SuperNode is SIGKILLed as round 1 starts while the SuperLink lives. Round 1 (no evaluation in it)
    ends within [faults].site_timeout_s, its failure reads SiteOffline or SiteTimeout (not Flower's text),
    round 2 records the site as offline, and summary.json lists every site with its status and the transport."""
    # site_timeout_s: above a live site's round here (a fresh ClientApp process importing torch: ~40 s on 2 busy
    # cores); a dead SuperNode is usually noticed sooner, when the SuperLink drops it (heartbeat: 38-60 s)
    site_timeout, slack = 120.0, 30.0  # slack: aggregation, checkpoint, polling
    config_path = tmp_path / "federation.toml"
    write_config(config_path, run={"rounds": 3, "eval_every": 2}, faults={"site_timeout_s": site_timeout})
    run_dir = tmp_path / "run"
    metrics = run_dir / "metrics.jsonl"
    with _federation(tmp_path, config_path) as fed:
        fed.start_all()
        facts = transport_facts(fed.cli_home, CONNECTION)  # what `fedfew-med flower run` passes
        fed.run(_run_config(run_dir, config_path, **{**facts, "round-timeout": 300.0}))  # site_timeout_s is the bound
        wait_for(lambda: checkpoint.latest_round(run_dir) == 0, timeout=400, interval=0.2, what="round 0",
                 diagnostics=fed.logs)
        killed = time.monotonic()
        fed.crash_supernode("site02-noisy")  # SIGKILL: no goodbye; the SuperLink lists it until its heartbeat expires
        wait_for(lambda: len(metrics.read_text().splitlines()) >= 2, timeout=site_timeout + slack + 120, interval=0.2,
                 what="round 1's record", diagnostics=fed.logs)
        stall = time.monotonic() - killed
        wait_for(lambda: (run_dir / "summary.json").exists(), timeout=400, interval=1, what="the summary",
                 diagnostics=fed.logs)
    records = _records(metrics)
    failure = records[1]["failures"]["site02-noisy"]
    print(f"SuperNode SIGKILLed as round 1 began: round 1 recorded {stall:.1f} s later (round 0 took "
          f"{records[0]['seconds']:.1f} s, round 1 {records[1]['seconds']:.1f} s); failure: {failure}")
    assert list(records[1]["failures"]) == ["site02-noisy"]
    assert failure.startswith(("SiteOffline: ", "SiteTimeout: site 'site02-noisy' did not finish round 1 within "
                               f"[faults].site_timeout_s = {site_timeout:g} s"))
    assert "UNAVAILABLE" not in failure and "session" not in failure
    assert stall <= site_timeout + slack
    assert records[2]["failures"] == {"site02-noisy": "SiteOffline: the site's SuperNode is not connected to the SuperLink"}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and sorted(summary["site_status"]) == NAMES
    assert summary["site_status"]["site02-noisy"].startswith("not evaluated: SiteOffline")
    assert summary["summary"]["sites"] == 2 and summary["summary"]["of_sites"] == 3
    transport = summary["transport"]
    assert transport["tls"] is True and transport["node_auth"] is True and sorted(transport["sites_connected"]) == NAMES
    assert transport["sites_connected"]["site02-noisy"]["status"] == "disconnected"

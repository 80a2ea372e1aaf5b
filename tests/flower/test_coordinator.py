"""The coordinator and the ClientApp over an in-process Grid: same result as the simulation, faults, resume.

Every message goes through Flower's serialisation and the real ClientApp handlers, so
these tests cover the whole protocol in seconds; ``test_deployment.py`` repeats the key
ones with real SuperLink / SuperNode processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedfew_med import checkpoint
from fedfew_med.flower import rundir
from fedfew_med.flower.client_app import app as client_app
from fedfew_med.flower.coordinator import Coordinator, FederationError, ServerSettings
from fedfew_med.flower.site_store import SiteStore
from fedfew_med.simulation import run as simulate
from tests.flower.conftest import write_config
from tests.flower.fakegrid import LocalGrid

pytestmark = pytest.mark.usefixtures("task_identity")
NAMES = ["site00-bright", "site01-dark", "site02-noisy"]


DITTO = {"run": {"rounds": 2}, "algorithm": {"name": "ditto", "params": {"lam": 0.1}}}  # personal state at every site


@pytest.fixture(scope="module")
def ditto_reference(tmp_path_factory: pytest.TempPathFactory):
    """The in-process run of :data:`DITTO` that the resume tests must reproduce (computed once)."""
    root = tmp_path_factory.mktemp("ditto-sim")
    config = write_config(root / "fed.toml", **DITTO)
    return simulate(config, run_dir=root / "sim")


def _grid(tmp_path: Path, config_path: Path, n: int = 3) -> LocalGrid:
    nodes = {
        101 + i: {"federation-config": str(config_path), "site-index": i, "state-dir": str(tmp_path / f"state{i}")}
        for i in range(n)
    }
    return LocalGrid(client_app, nodes)


def _settings(tmp_path: Path, config_path: Path, **kw) -> ServerSettings:
    base = {"federation_config": config_path, "run_dir": tmp_path / "run", "connect_timeout": 1.0,
            "query_timeout": 1.0, "round_timeout": 1.0, "poll_interval": 0.05}
    return ServerSettings(**{**base, **kw})


def _records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _same_models(a, b, atol: float = 0.0) -> None:
    assert len(a) == len(b)
    for ma, mb in zip(a, b, strict=True):
        assert ma.keys() == mb.keys()  # (a checkpoint restores them in sorted order, as in the simulation)
        for name in ma:
            torch.testing.assert_close(ma[name], mb[name], atol=atol, rtol=0.0)


@pytest.mark.parametrize(("algorithm", "params"), [("fedfew", {"k": 2, "mu": 0.01}), ("ditto", {"lam": 0.1}), ("local", {})])
def test_same_models_and_records_as_the_simulation(tmp_path, algorithm, params, caplog):
    path = tmp_path / "fed.toml"
    config = write_config(path, run={"rounds": 3, "eval_every": 2}, algorithm={"name": algorithm, "params": params})
    expected = simulate(config, run_dir=tmp_path / "sim")
    with caplog.at_level("INFO", logger="fedfew_med"):
        result = Coordinator(_grid(tmp_path, path), config, _settings(tmp_path, path)).run()
    # the coordinator's log (what `flower run --stream` shows): mean / worst on evaluated rounds, then the per-site table
    assert any(m.startswith("round 0 done:") and "mean" in m and "worst site" in m for m in caplog.messages)
    from fedfew_med.rundir import summary_table

    assert summary_table(result.summary) in caplog.messages[-1] and "run finished" in caplog.messages[-1]
    _same_models(expected.models, result.models)
    assert _records(tmp_path / "run") == _records(tmp_path / "sim")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    sim_summary = json.loads((tmp_path / "sim" / "summary.json").read_text())
    assert summary.pop("run_key") == result.summary["run_key"]
    transport = summary.pop("transport")  # only a deployment has one: here launched without transport facts
    assert transport["runner"] == "flower" and transport["tls"] is None and transport["node_auth"] is None
    assert sorted(transport["sites_connected"]) == NAMES
    assert summary == sim_summary
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == config.to_dict()


def test_each_site_gets_its_own_lambda_only_and_state_lives_at_the_site(tmp_path):
    path = tmp_path / "fed.toml"
    config = write_config(path, run={"rounds": 2}, algorithm={"name": "ditto", "params": {"lam": 0.1}})
    grid = _grid(tmp_path, path)
    seen = []
    grid.before_handle = lambda msg: seen.append(dict(msg.content.config_records.get("fedfew.round", {})))
    result = Coordinator(grid, config, _settings(tmp_path, path)).run()
    rounds = [s for s in seen if s]
    assert rounds and all(set(s) == {"round", "num-rounds", "site", "site-weight", "extra.mu"} or "extra.mu" not in s for s in rounds)
    assert all("site-weight" in s and not any(k in s for k in NAMES) for s in rounds)
    # the server checkpoint holds server models only; personal models are on the sites' disks
    ckpt = checkpoint.load(tmp_path / "run")
    assert ckpt is not None and ckpt.sites == {}
    run_key = result.summary["run_key"]
    for i, name in enumerate(NAMES):
        store = SiteStore(tmp_path / f"state{i}", run_key=run_key, site=name)
        assert store.rounds() == [0, 1]  # the base it started from and the state after the last round
        assert "personal" in store.load(1).models
        choice = store.load_choice()  # the model the site deploys is recorded at the site
        assert choice is not None and choice["round"] == 1
        assert choice["model"] == result.summary["per_site"][name]["model"]
        assert choice["metrics"] == result.summary["per_site"][name]["metrics"]


def test_a_silent_site_is_skipped_after_the_round_timeout_and_recorded(tmp_path):
    path = tmp_path / "fed.toml"
    config = write_config(path, run={"rounds": 2})
    grid = _grid(tmp_path, path)
    coordinator = Coordinator(grid, config, _settings(tmp_path, path, round_timeout=0.3))
    original = coordinator._train

    def train_then_silence(info, participants):
        if info.round == 1:
            grid.silent.add(102)  # killed: still listed by the SuperLink, never answers
        return original(info, participants)

    coordinator._train = train_then_silence
    result = coordinator.run()
    rec = result.records[1]
    assert list(rec["failures"]) == ["site01-dark"]
    assert rec["failures"]["site01-dark"] == ("SiteTimeout: site 'site01-dark' did not finish round 1 within "
                                              "round-timeout = 0.3 s; its late reply is discarded")
    assert rec["evaluation_failures"] == {"site01-dark": rec["failures"]["site01-dark"]}  # not asked again
    assert "site01-dark" not in rec["server"]["sites"] and len(rec["server"]["sites"]) == 2
    assert result.summary["finished"] and result.summary["failures"] == {"1": rec["failures"]}


def test_an_offline_site_stays_a_participant_that_failed(tmp_path):
    path = tmp_path / "fed.toml"
    config = write_config(path, run={"rounds": 2})
    grid = _grid(tmp_path, path)
    Coordinator(grid, config, _settings(tmp_path, path, stop_after=1)).run()
    grid.online.discard(103)
    result = Coordinator(grid, config, _settings(tmp_path, path, resume=True)).run()
    assert [r["round"] for r in result.records] == [1]
    for rec in result.records:
        assert rec["participants"] == NAMES
        assert rec["failures"] == {"site02-noisy": "SiteOffline: the site's SuperNode is not connected to the SuperLink"}
        assert sorted(rec["metrics"]) == NAMES[:2]
    # summary.json lists every expected site; mean and worst say over how many they were computed
    assert result.summary["site_status"] == {NAMES[0]: "evaluated", NAMES[1]: "evaluated",
                                             NAMES[2]: "not evaluated: " + result.records[-1].get("evaluation_failures", {}).get(
                                                 NAMES[2], result.records[-1]["failures"][NAMES[2]])}
    assert result.summary["summary"]["sites"] == 2 and result.summary["summary"]["of_sites"] == 3
    from fedfew_med.rundir import summary_table

    table = summary_table(result.summary)
    assert "(over 2 of 3 sites)" in table and f"{NAMES[2]}: not evaluated: " in table


def test_a_crashing_site_is_skipped_with_its_exception(tmp_path):
    path = tmp_path / "fed.toml"
    config = write_config(path, run={"rounds": 2})
    grid = _grid(tmp_path, path)

    def crash(msg):
        if msg.metadata.message_type == "train" and msg.metadata.group_id == "1" and msg.metadata.dst_node_id == 101:
            raise RuntimeError("disk full at the site")

    grid.before_handle = crash
    result = Coordinator(grid, config, _settings(tmp_path, path)).run()
    assert result.records[1]["failures"] == {"site00-bright": "RuntimeError: disk full at the site"}
    assert result.records[0]["failures"] == {}


def test_too_few_sites_end_the_run_and_it_resumes_exactly(tmp_path, ditto_reference):
    path = tmp_path / "fed.toml"
    config = write_config(path, **DITTO)
    grid = _grid(tmp_path, path)
    broken = {"on": True}

    def outage(msg):
        if broken["on"] and msg.metadata.message_type == "train" and msg.metadata.group_id == "1":
            raise OSError("network down")

    grid.before_handle = outage
    with pytest.raises(FederationError, match="fewer than min-sites=3"):
        Coordinator(grid, config, _settings(tmp_path, path, min_sites=3)).run()
    assert checkpoint.latest_round(tmp_path / "run") == 0
    broken["on"] = False
    result = Coordinator(grid, config, _settings(tmp_path, path, min_sites=3, resume=True)).run()
    _same_models(ditto_reference.models, result.models)
    assert _records(tmp_path / "run") == _records(ditto_reference.run_dir)


def test_a_round_replayed_after_a_coordinator_crash_starts_from_the_accepted_state(tmp_path, monkeypatch, ditto_reference):
    """Sites trained round 1, then the coordinator died before its checkpoint: the replay must not see round 1's state."""
    path = tmp_path / "fed.toml"
    config = write_config(path, **DITTO)
    grid = _grid(tmp_path, path)
    real_save = checkpoint.save

    def die_at_round_1(run_dir, round_idx, **kw):
        if round_idx == 1:
            raise SystemExit("coordinator killed")
        return real_save(run_dir, round_idx, **kw)

    monkeypatch.setattr(checkpoint, "save", die_at_round_1)
    with pytest.raises(SystemExit):
        Coordinator(grid, config, _settings(tmp_path, path)).run()
    monkeypatch.setattr(checkpoint, "save", real_save)
    result = Coordinator(grid, config, _settings(tmp_path, path, resume=True)).run()
    _same_models(ditto_reference.models, result.models)
    assert _records(tmp_path / "run") == _records(ditto_reference.run_dir)


def test_site_state_survives_a_supernode_restart(tmp_path, ditto_reference):
    """A restarted SuperNode has an empty context: the state comes back from its disk."""
    path = tmp_path / "fed.toml"
    config = write_config(path, **DITTO)
    grid = _grid(tmp_path, path)
    Coordinator(grid, config, _settings(tmp_path, path, stop_after=1)).run()
    for ctx in grid.contexts.values():
        ctx.state = type(ctx.state)()
    result = Coordinator(grid, config, _settings(tmp_path, path, resume=True)).run()
    _same_models(ditto_reference.models, result.models)


def test_sites_with_other_model_facts_or_a_taken_name_are_refused(tmp_path, capsys):
    path = tmp_path / "fed.toml"
    other = tmp_path / "other.toml"
    config = write_config(path, run={"rounds": 1})
    params = {"num_sites": 3, "image_size": 32, "train_min": 24, "train_max": 40, "test_per_site": 20, "seed": 1}
    write_config(other, data={"params": params})
    grid = _grid(tmp_path, path)
    grid.contexts[104] = type(grid.contexts[101])(run_id=7, node_id=104, node_config={
        "federation-config": str(other), "site-index": 2, "state-dir": str(tmp_path / "s4")}, state=type(grid.contexts[101].state)(), run_config={})
    grid.contexts[105] = type(grid.contexts[101])(run_id=7, node_id=105, node_config={
        "federation-config": str(path), "site-index": 0, "state-dir": str(tmp_path / "s5")}, state=type(grid.contexts[101].state)(), run_config={})
    grid.online |= {104, 105}
    coordinator = Coordinator(grid, config, _settings(tmp_path, path))
    result = coordinator.run()
    assert coordinator.rejected == {104, 105}
    assert result.records[0]["participants"] == NAMES
    # which node id is which site: nodes.json, and `fedfew-med flower nodes RUN_DIR`
    nodes = json.loads((tmp_path / "run" / "nodes.json").read_text())
    assert {r["site"]: r["node_id"] for r in nodes["sites"]} == dict(coordinator.node_of) and len(nodes["sites"]) == 3
    assert nodes["refused_node_ids"] == [104, 105]
    from fedfew_med.cli import main

    assert main(["flower", "nodes", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    rows = {line.split()[1]: line.split()[0] for line in printed.splitlines()[1:] if "refused" not in line}
    assert rows == {site: str(node) for site, node in coordinator.node_of.items()}
    assert "104" in printed and "refused" in printed


def test_no_site_within_the_connect_timeout_is_an_error(tmp_path):
    path = tmp_path / "fed.toml"
    config = write_config(path, run={"rounds": 1})
    grid = _grid(tmp_path, path)
    grid.online.clear()
    with pytest.raises(FederationError, match="0 SuperNode"):
        Coordinator(grid, config, _settings(tmp_path, path, connect_timeout=0.2)).run()


def test_a_run_dir_in_use_or_of_another_config_is_refused(tmp_path):
    path = tmp_path / "fed.toml"
    config = write_config(path, run={"rounds": 1})
    grid = _grid(tmp_path, path)
    Coordinator(grid, config, _settings(tmp_path, path)).run()
    with pytest.raises(rundir.RunDirError, match="resume=true"):
        Coordinator(grid, config, _settings(tmp_path, path)).run()
    other = write_config(tmp_path / "b.toml", run={"rounds": 1, "seed": 9})
    with pytest.raises(rundir.RunDirError, match="different config"):
        Coordinator(grid, other, _settings(tmp_path, path, resume=True)).run()
    with rundir.locked(tmp_path / "run"), pytest.raises(rundir.RunDirError, match="in use"):
        Coordinator(grid, config, _settings(tmp_path, path, overwrite=True)).run()
    simulate(config, run_dir=tmp_path / "sim")
    with pytest.raises(rundir.RunDirError, match="simulation cannot be resumed"):
        Coordinator(grid, config, _settings(tmp_path, path, run_dir=tmp_path / "sim", resume=True)).run()


def test_fedfew_re_seeding_on_flower_matches_the_simulation_and_resumes(tmp_path):
    """The idle counts travel in the coordinator's checkpoint: a run cut off after round 2 and resumed re-seeds
    in the same rounds as the simulation and ends with its models and records."""
    path = tmp_path / "fed.toml"
    config = write_config(path, run={"rounds": 5},
                          algorithm={"name": "fedfew", "params": {"k": 3, "reseed_after": 2, "init": "identical", "site_weights": "uniform"}})
    expected = simulate(config, run_dir=tmp_path / "sim")
    reseeded = [(r["round"], x["idle_rounds"]) for r in expected.records for x in r["server"]["reseeded"]]
    cut = 2  # the last round before the outage
    assert any(rnd > cut and rnd - idle + 1 <= cut for rnd, idle in reseeded), reseeded  # idle since before the cut
    grid = _grid(tmp_path, path)
    broken = {"on": True}

    def outage(msg):
        if broken["on"] and msg.metadata.message_type == "train" and msg.metadata.group_id == str(cut + 1):
            raise OSError("network down")

    grid.before_handle = outage
    with pytest.raises(FederationError, match="fewer than min-sites=3"):
        Coordinator(grid, config, _settings(tmp_path, path, min_sites=3)).run()
    ckpt = checkpoint.load(tmp_path / "run")
    assert ckpt is not None and ckpt.round == cut
    assert ckpt.state["algorithm"] == {"idle": expected.records[cut]["server"]["idle_rounds"]}
    broken["on"] = False
    result = Coordinator(grid, config, _settings(tmp_path, path, min_sites=3, resume=True)).run()
    _same_models(expected.models, result.models)
    assert _records(tmp_path / "run") == _records(tmp_path / "sim")


def _timed_train(coordinator: Coordinator, seconds: dict[int, float], before=None):
    """Wrap the coordinator's train phase: the wall time of each round's phase into ``seconds``."""
    import time

    original = coordinator._train

    def train(info, participants):
        if before is not None:
            before(info)
        t0 = time.monotonic()
        try:
            return original(info, participants)
        finally:
            seconds[info.round] = time.monotonic() - t0

    coordinator._train = train


def test_site_timeout_s_bounds_the_wait_for_a_silent_site(tmp_path):
    """[faults].site_timeout_s (0.3 s) ends the wait long before round-timeout (60 s), in the simulation's words."""
    path = tmp_path / "fed.toml"
    config = write_config(path, run={"rounds": 2}, faults={"site_timeout_s": 0.3})
    grid = _grid(tmp_path, path)
    coordinator = Coordinator(grid, config, _settings(tmp_path, path, round_timeout=60.0))
    seconds: dict[int, float] = {}
    _timed_train(coordinator, seconds, before=lambda info: info.round == 1 and grid.silent.add(102))
    result = coordinator.run()
    rec = result.records[1]
    assert rec["failures"] == {"site01-dark": "SiteTimeout: site 'site01-dark' did not finish round 1 within "
                                              "[faults].site_timeout_s = 0.3 s; its late reply is discarded"}
    assert rec["evaluation_failures"] == {"site01-dark": rec["failures"]["site01-dark"]}  # not asked again
    assert seconds[1] < 10.0  # 0.3 s of waiting plus the two live sites' training, far below round-timeout
    assert result.summary["finished"]


def test_a_supernode_that_leaves_mid_round_is_given_up_as_offline(tmp_path):
    """Killed during round 1: listed, silent, then dropped by the SuperLink (heartbeat expiry) while the
    coordinator waits. The wait ends at the next liveness check, not at round-timeout, and reads SiteOffline."""
    from fedfew_med.flower.waits import LEFT, liveness_every

    path = tmp_path / "fed.toml"
    config = write_config(path, run={"rounds": 2})
    grid = _grid(tmp_path, path)
    settings = _settings(tmp_path, path, round_timeout=60.0)
    coordinator = Coordinator(grid, config, settings)
    real_push = grid.push_messages

    def push_then_drop(messages):
        messages = list(messages)
        ids = real_push(messages)
        if any(m.metadata.message_type == "train" and m.metadata.group_id == "1" for m in messages):
            grid.online.discard(102)  # its heartbeat expired after its train message was pushed
        return ids

    def kill(info):
        if info.round == 1:
            grid.silent.add(102)

    grid.push_messages = push_then_drop
    seconds: dict[int, float] = {}
    _timed_train(coordinator, seconds, before=kill)
    result = coordinator.run()
    rec = result.records[1]
    assert rec["failures"] == {"site01-dark": LEFT} and LEFT.startswith("SiteOffline: ")
    assert rec["evaluation_failures"] == {"site01-dark": rec["failures"]["site01-dark"]}  # not asked again
    assert seconds[1] < liveness_every(settings.poll_interval) + 10.0  # not round-timeout (60 s)
    assert result.summary["site_status"]["site01-dark"] == "not evaluated: " + rec["evaluation_failures"]["site01-dark"]


def test_the_transport_facts_of_each_launch_are_recorded_with_the_sites_that_connected(tmp_path):
    """`flower run` passes tls / node-auth / launched-by; a resumed launch without TLS makes the run's TLS false."""
    from fedfew_med.audit.report import transport_section
    from fedfew_med.privacy import PrivacyPolicy, check_recorded_transport

    path = tmp_path / "fed.toml"
    config = write_config(path, run={"rounds": 2})
    grid = _grid(tmp_path, path)
    secure = {"tls": True, "node_auth": True, "launched_by": "fedfew-med flower run over flwr connection 'fed': TLS"}
    first = Coordinator(grid, config, _settings(tmp_path, path, stop_after=1, **secure)).run()
    assert first.summary["transport"]["tls"] is True and first.summary["transport"]["node_auth"] is True
    assert first.summary["transport"]["sites_connected"] == {
        name: {"node_id": 101 + i, "status": "connected"} for i, name in enumerate(NAMES)}
    ckpt = checkpoint.load(tmp_path / "run")
    assert ckpt is not None and ckpt.state["transport"] == first.summary["transport"]["launches"]
    verdicts = check_recorded_transport(PrivacyPolicy(), transport_section(tmp_path / "run"))
    assert [(v.rule, v.ok) for v in verdicts] == [("require_tls", True), ("require_authenticated_sites", True)]

    grid.online.discard(103)
    insecure = {"tls": False, "node_auth": False, "launched_by": "fedfew-med flower run over flwr connection 'lab': insecure"}
    result = Coordinator(grid, config, _settings(tmp_path, path, resume=True, **insecure)).run()
    transport = json.loads((tmp_path / "run" / "summary.json").read_text())["transport"]
    assert transport == result.summary["transport"]
    assert [(e["first_round"], e["tls"]) for e in transport["launches"]] == [(0, True), (1, False)]
    assert transport["tls"] is False and transport["node_auth"] is False
    assert transport["sites_connected"]["site02-noisy"] == {"node_id": None, "status": "disconnected"}
    verdicts = check_recorded_transport(PrivacyPolicy(), transport_section(tmp_path / "run"))
    assert [(v.rule, v.ok) for v in verdicts] == [("require_tls", False), ("require_authenticated_sites", False)]

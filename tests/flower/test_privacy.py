"""Differential privacy on Flower (in-process Grid): the simulation's models and privacy records, restarts, tampering.

The reference is always the in-process simulation with the same config and seeds: the
Flower run must produce the same server models and the same ``metrics.jsonl`` records,
including every DP site's ``privacy`` report (ε spent per round, δ, σ, clip norm, sample
rate, steps, mechanisms, ledger digest), ``privacy_stopped`` and ``server_privacy``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from fedfew_med.data import build_sites
from fedfew_med.dp.ledger import PrivacyLedger
from fedfew_med.flower.coordinator import Coordinator
from fedfew_med.flower.node import NodeSettings
from fedfew_med.flower.site_privacy import FILE
from fedfew_med.simulation import run as simulate
from tests.flower.conftest import write_config
from tests.flower.test_coordinator import NAMES, _grid, _records, _same_models, _settings

pytestmark = pytest.mark.usefixtures("task_identity")

FEDFEW = {"name": "fedfew", "params": {"k": 2, "mu": 0.5, "reseed_after": 0}}  # server DP: no re-seeding
CLIENT = {"privacy": {"epsilon": 8.0}}
SERVER = {"server_privacy": {"clip": 1.0, "noise_multiplier": 0.8}}
# one site with a fixed small σ runs out of budget after its first round; the others are calibrated for all rounds
STOPS = {"privacy": {"epsilon": 8.0, "sites": {NAMES[0]: {"noise_multiplier": 2.0, "epsilon": 3.0}}}}
# fixed noise levels: no σ search (seconds on a loaded machine) where the calibration is not the point
FIXED = {"privacy": {"epsilon": 50.0, "noise_multiplier": 1.0, "loss_noise_multiplier": 5.0}}


def _config(tmp_path: Path, rounds: int = 2, **tables):
    path = tmp_path / "fed.toml"
    return path, write_config(path, run={"rounds": rounds}, algorithm=FEDFEW, **tables)


def _summary(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.pop("run_key", None)
    summary.pop("transport", None)  # only a deployment has one (tests/flower/test_coordinator.py checks it)
    return summary


def _ledger_file(tmp_path: Path, run_key: str, index: int) -> Path:
    return tmp_path / f"state{index}" / run_key / NAMES[index] / FILE


def _as_sent(tmp_path: Path, path: Path, index: int) -> str:
    """How a site's error names its file to the coordinator: the state dir as ``<state-dir>`` (site_errors)."""
    return str(path).replace(str(tmp_path / f"state{index}"), "<state-dir>")


@pytest.mark.parametrize(
    ("tables", "rounds"),
    [(CLIENT, 2), ({**CLIENT, **SERVER}, 2), (SERVER, 2), (STOPS, 3)],
    ids=["client-dp", "client-and-server-dp", "server-dp", "budget-stop"],
)
def test_same_models_and_privacy_records_as_the_simulation(tmp_path, tables, rounds):
    path, config = _config(tmp_path, rounds, **tables)
    expected = simulate(config, run_dir=tmp_path / "sim")
    coordinator = Coordinator(_grid(tmp_path, path), config, _settings(tmp_path, path))
    result = coordinator.run()
    _same_models(expected.models, result.models)
    ours, theirs = _records(tmp_path / "run"), _records(tmp_path / "sim")
    assert ours == theirs  # every privacy report, every round: ε, δ, σ, clip, sample rate, steps, digests
    assert _summary(tmp_path / "run") == _summary(tmp_path / "sim")
    if "privacy" in tables:
        assert all(set(r["privacy"]) == set(NAMES) for r in ours)
        for name in NAMES:  # the query reply says the site applies DP, with its target
            options = coordinator.roster[name].privacy["options"]  # type: ignore[index]
            assert (options["epsilon"], options["delta"]) == (3.0 if tables is STOPS and name == NAMES[0] else 8.0, 1e-5)
        eps = [[r["privacy"][s]["epsilon"] for s in NAMES] for r in ours]
        assert all(0 < e for e in eps[0]) and all(b >= a for x, y in zip(eps, eps[1:], strict=False) for a, b in zip(x, y, strict=True))
    else:
        assert all(coordinator.roster[name].privacy is None for name in NAMES)
    if tables is STOPS:
        assert [r["privacy_stopped"] for r in ours] == [[], [NAMES[0]], [NAMES[0]]]
        assert NAMES[0] not in ours[1]["site_losses"] and NAMES[0] in ours[1]["metrics"]
    if "server_privacy" in tables:
        assert ours[-1]["server_privacy"]["releases"] == 2 * rounds
    # the hash-linked ledger file, as the simulation writes it: the same spending recorded round by round
    assert _chain(tmp_path / "run") == _chain(tmp_path / "sim") and len(_chain(tmp_path / "run")) == rounds


def _chain(run_dir: Path) -> list[dict]:
    lines = (run_dir / "privacy_ledger.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k in ("round", "sites", "server")} for line in lines]


def test_a_site_file_asking_for_dp_trains_privately_as_in_the_simulation(tmp_path, monkeypatch):
    """Only one site's own file has a [privacy] table: it alone trains with DP (and every network is DP-ready)."""
    path, config = _config(tmp_path)
    real_load = NodeSettings.load_site

    def own_privacy(data):
        if data.name != NAMES[1]:
            return data
        return dataclasses.replace(data, metadata={**data.metadata, "privacy": {"epsilon": 4.0}, "site_file": "/h/site.toml"})

    expected = simulate(config, run_dir=tmp_path / "sim", sites=[own_privacy(s) for s in build_sites(config.data)])
    monkeypatch.setattr(NodeSettings, "load_site", lambda self: own_privacy(real_load(self)))
    result = Coordinator(_grid(tmp_path, path), config, _settings(tmp_path, path)).run()
    _same_models(expected.models, result.models)
    ours = _records(tmp_path / "run")
    assert ours == _records(tmp_path / "sim")
    assert [sorted(r["privacy"]) for r in ours] == [[NAMES[1]], [NAMES[1]]]
    assert ours[-1]["privacy"][NAMES[1]]["target_epsilon"] == 4.0
    assert [sorted(line["sites"]) for line in _chain(tmp_path / "run")] == [[NAMES[1]], [NAMES[1]]]  # opened once sites said DP


def test_epsilon_accumulates_across_supernode_restarts_as_in_an_uninterrupted_run(tmp_path):
    """Every SuperNode restarts before every round (empty context): the ledger comes back from its disk."""
    path, config = _config(tmp_path, 3, **CLIENT, **SERVER)
    expected = simulate(config, run_dir=tmp_path / "sim")
    grid = _grid(tmp_path, path)
    coordinator = Coordinator(grid, config, _settings(tmp_path, path, stop_after=2))
    original = coordinator._train

    def restart_nodes_then_train(info, participants):
        for ctx in grid.contexts.values():
            ctx.state = type(ctx.state)()
        return original(info, participants)

    coordinator._train = restart_nodes_then_train  # type: ignore[method-assign]
    first = coordinator.run()
    spent = first.records[-1]["privacy"]
    run_key = first.summary["run_key"]
    for i, name in enumerate(NAMES):  # the site's own file holds what the coordinator was told
        saved = json.loads(_ledger_file(tmp_path, run_key, i).read_text())
        ledger = PrivacyLedger.from_state_dict(saved["privacy"]["ledger"])
        assert ledger.epsilon() == spent[name]["epsilon"] and ledger.digest() == spent[name]["digest"]
    for ctx in grid.contexts.values():  # and the coordinator restarts too
        ctx.state = type(ctx.state)()
    result = Coordinator(grid, config, _settings(tmp_path, path, resume=True)).run()
    _same_models(expected.models, result.models)
    ours, theirs = _records(tmp_path / "run"), _records(tmp_path / "sim")
    assert [r["privacy"] for r in ours] == [r["privacy"] for r in theirs]
    assert [r["server_privacy"] for r in ours] == [r["server_privacy"] for r in theirs]
    assert ours == theirs


def _delete(path: Path) -> None:
    path.unlink()


def _reset(path: Path) -> None:
    """A well-formed ledger with nothing spent (its digest recomputed): a budget reset that looks valid."""
    saved = json.loads(path.read_text())
    old = saved["privacy"]["ledger"]
    fresh = PrivacyLedger(delta=old["delta"], accountant=old["accountant"], target_epsilon=old["target_epsilon"], name=old["name"])
    saved["privacy"]["ledger"] = fresh.state_dict()
    path.write_text(json.dumps(saved))


def _edit(path: Path) -> None:
    """Fewer steps recorded, digest left as it was."""
    saved = json.loads(path.read_text())
    for entry in saved["privacy"]["ledger"]["history"]:
        entry["steps"] = 1
    path.write_text(json.dumps(saved))


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (_delete, "is missing, but the coordinator has a ledger of this site"),
        (_reset, "does not extend the ledger the coordinator last received from it"),
        (_edit, "cannot be used (privacy ledger 'site01-dark': history digest does not match"),
    ],
    ids=["deleted", "reset", "edited"],
)
def test_a_site_whose_ledger_was_deleted_reset_or_edited_refuses_to_train(tmp_path, tamper, message):
    path, config = _config(tmp_path, 2, **FIXED)
    grid = _grid(tmp_path, path)
    first = Coordinator(grid, config, _settings(tmp_path, path, stop_after=1)).run()
    before = first.records[0]["privacy"][NAMES[1]]
    ledger_file = _ledger_file(tmp_path, first.summary["run_key"], 1)
    tamper(ledger_file)
    for ctx in grid.contexts.values():  # a SuperNode restart: only the disk is left
        ctx.state = type(ctx.state)()
    result = Coordinator(grid, config, _settings(tmp_path, path, resume=True)).run()
    rec = result.records[0]
    assert rec["round"] == 1 and list(rec["failures"]) == [NAMES[1]]
    why = rec["failures"][NAMES[1]]
    assert why.startswith(f"SiteLedgerError: site '{NAMES[1]}': its privacy ledger {_as_sent(tmp_path, ledger_file, 1)} ")
    assert str(tmp_path) not in why and "site log reference" in why
    assert message in why and "refusing to train" in why
    assert NAMES[1] not in rec["site_losses"] and sorted(rec["site_losses"]) == [NAMES[0], NAMES[2]]
    # the coordinator keeps what the site spent before: its ε did not go back to 0
    assert rec["privacy"][NAMES[1]]["epsilon"] == before["epsilon"] > 0
    assert rec["privacy"][NAMES[1]]["digest"] == before["digest"]


def test_a_ledger_file_deleted_under_a_running_supernode_is_refused_by_its_context_copy(tmp_path):
    """The coordinator never saw this site's ledger (its checkpoint holds an empty one), but the node's context did."""
    path, config = _config(tmp_path, 2, **FIXED)
    grid = _grid(tmp_path, path)
    first = Coordinator(grid, config, _settings(tmp_path, path, stop_after=1)).run()
    ledger_file = _ledger_file(tmp_path, first.summary["run_key"], 2)
    ledger_file.unlink()
    state_file = tmp_path / "run" / "checkpoints" / "round-00000" / "state.json"
    meta = json.loads(state_file.read_text())
    old = meta["state"]["privacy"]["sites"][NAMES[2]]["ledger"]
    fresh = PrivacyLedger(delta=old["delta"], accountant=old["accountant"], target_epsilon=old["target_epsilon"], name=old["name"])
    meta["state"]["privacy"]["sites"][NAMES[2]]["ledger"] = fresh.state_dict()  # as if its round-0 reply had been lost
    state_file.write_text(json.dumps(meta))
    # a coordinator that lost the reply would have chained that same state: rewrite the chain to match (else it refuses)
    from fedfew_med.dp.chain import CHAIN_FILE, chain_entry, encode_entry, genesis

    line = encode_entry(chain_entry(0, meta["state"]["privacy"], prev=genesis(config.digest())))
    (tmp_path / "run" / CHAIN_FILE).write_text(line + "\n")
    result = Coordinator(grid, config, _settings(tmp_path, path, resume=True)).run()
    why = result.records[0]["failures"][NAMES[2]]
    assert f"its privacy ledger {_as_sent(tmp_path, ledger_file, 2)} is missing, but this SuperNode's context holds one of " in why


def test_a_rolled_back_checkpoint_is_refused_by_the_coordinators_ledger_chain(tmp_path):
    """As in the simulation: privacy_ledger.jsonl binds every checkpoint's ledgers; a ledger handed back is refused."""
    from fedfew_med.rundir import RunDirError

    path, config = _config(tmp_path, 2, **FIXED)
    grid = _grid(tmp_path, path)
    Coordinator(grid, config, _settings(tmp_path, path, stop_after=1)).run()
    state_file = tmp_path / "run" / "checkpoints" / "round-00000" / "state.json"
    meta = json.loads(state_file.read_text())
    old = meta["state"]["privacy"]["sites"][NAMES[2]]["ledger"]
    fresh = PrivacyLedger(delta=old["delta"], accountant=old["accountant"], target_epsilon=old["target_epsilon"], name=old["name"])
    meta["state"]["privacy"]["sites"][NAMES[2]]["ledger"] = fresh.state_dict()  # spent budget handed back
    state_file.write_text(json.dumps(meta))
    with pytest.raises(RunDirError, match=r"do not match line 1 of .*privacy_ledger.jsonl"):
        Coordinator(grid, config, _settings(tmp_path, path, resume=True)).run()


def test_the_coordinator_refuses_fine_tuning_at_deployment_with_dp_sites(tmp_path):
    """fedfew_ft would fine-tune on a DP site's records outside its ledger: refused before any training, as simulate."""
    from fedfew_med.flower.coordinator import ServerConfigError

    path = tmp_path / "fed.toml"
    config = write_config(path, run={"rounds": 2}, algorithm={"name": "fedfew_ft", "params": {"k": 2, "reseed_after": 0}}, **FIXED)
    with pytest.raises(ServerConfigError, match="fine-tunes at deployment"):
        Coordinator(_grid(tmp_path, path), config, _settings(tmp_path, path)).run()
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == ""  # no round ran

"""The privacy ledger chain (``privacy_ledger.jsonl``): spent budget cannot be reset or rolled back by editing files.

Two halves. The chain module alone (:mod:`fedfew_med.dp.chain`) on made-up ledger states: links,
rounds, canonical form, every rule of the resume check. Then the simulation: one honest DP run
(fixed σ, so no calibration search; server DP on, so the server's ledger is chained too) is
copied, tampered with in one way per case, and resumed; every case must refuse with its own
message naming the file, and leave the run directory exactly as it was. Honest kills (between the
chain append and the checkpoint, in round 0 and in a later round) resume and end with the models
and chain of an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from fedfew_med import checkpoint
from fedfew_med.config import FederationConfig, federation_from_dict
from fedfew_med.dp import Mechanism, PrivacyLedger
from fedfew_med.dp.chain import (
    CHAIN_FILE,
    LedgerChain,
    LedgerChainError,
    chain_entry,
    encode_entry,
    genesis,
    line_digest,
    open_chain,
    parse_chain,
    state_digest,
)
from fedfew_med.simulation import RunDirError, run
from tests.conftest import tiny_dict

CONFIG_DIGEST = "c" * 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks on a shared 2-core machine: one intra-op thread is several times faster than the default."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# --------------------------------------------------------------------------- the chain module alone
def fake_state(round_idx: int, *, sites: tuple[str, ...] = ("a", "b"), server: bool = True) -> dict[str, Any]:
    """A privacy state shaped like ``dp.federation.privacy_state`` after ``round_idx`` (one entry per round)."""
    def ledger(name: str) -> dict[str, Any]:
        history = [{"round": r, "steps": 2, "noise_multiplier": 1.0, "sample_rate": 0.5} for r in range(round_idx + 1)]
        return {"name": name, "history": history, "digest": f"{name}-{round_idx}", "epsilon": 0.5 * (round_idx + 1)}

    state: dict[str, Any] = {"sites": {s: {"ledger": ledger(s), "stopped_round": None} for s in sites}}
    if server:
        state["server"] = {"ledger": ledger("server"), "clip": 1.0}
    return state


def chain_text(rounds: int, config_digest: str = CONFIG_DIGEST) -> str:
    lines, prev = [], genesis(config_digest)
    for r in range(rounds):
        line = encode_entry(chain_entry(r, fake_state(r), prev=prev))
        lines.append(line)
        prev = line_digest(line)
    return "".join(f"{x}\n" for x in lines)


def _edit_line(text: str, index: int, edit: Callable[[dict[str, Any]], None], *, canonical: bool = True) -> str:
    lines = text.splitlines()
    entry = json.loads(lines[index])
    edit(entry)
    lines[index] = encode_entry(entry) if canonical else json.dumps(entry)
    return "".join(f"{x}\n" for x in lines)


def test_an_honest_chain_parses_and_links_each_line_to_the_one_before():
    text = chain_text(3)
    parsed = parse_chain(text, config_digest=CONFIG_DIGEST, where="f")
    assert [e["round"] for _, e in parsed] == [0, 1, 2]
    assert parsed[0][1]["prev"] == genesis(CONFIG_DIGEST)
    assert parsed[2][1]["prev"] == line_digest(parsed[1][0])
    assert parsed[1][1]["state"] == state_digest(fake_state(1))
    assert parsed[1][1]["sites"]["a"] == {"epsilon": 1.0, "digest": "a-1", "entries": 2}
    assert parsed[1][1]["server"]["entries"] == 2


def test_the_state_digest_survives_a_json_round_trip():
    state = fake_state(2)
    state["sites"]["a"]["ledger"]["epsilon"] = 0.1 + 0.2  # a float whose repr has 17 digits
    assert state_digest(json.loads(json.dumps(state))) == state_digest(state)


def _set_epsilon(e: dict[str, Any]) -> None:
    e["sites"]["a"]["epsilon"] = 0.0


PARSE_CASES: list[tuple[str, Callable[[str], str], str]] = [
    ("edited earlier line", lambda t: _edit_line(t, 0, _set_epsilon), r"line 2 \(round 1\) does not link to line 1"),
    ("line removed from the middle", lambda t: "".join(f"{x}\n" for i, x in enumerate(t.splitlines()) if i != 1),
     r"line 2 \(round 2\) does not link to line 1"),
    ("lines swapped", lambda t: "".join(f"{x}\n" for x in [t.splitlines()[i] for i in (1, 0, 2)]), "line 1 .* does not link to the run's config"),
    ("torn last line", lambda t: t[:-20], "last line is incomplete"),
    ("not JSON", lambda t: t.replace("{", "[", 1), "line 1 is not JSON"),
    ("field removed", lambda t: _edit_line(t, 2, lambda e: e.pop("state")), "line 3 lacks state"),
    ("round renumbered (links recomputed)", lambda t: _relinked(t, lambda es: es[2].update(round=3)), "line 3 is round 3, expected round 2"),
    ("not canonical", lambda t: _edit_line(t, 2, lambda e: None, canonical=False), "line 3 is not in canonical form"),
    ("other version", lambda t: _edit_line(t, 0, lambda e: e.update(version=2)), "line 1 has version 2"),
]


def _relinked(text: str, edit: Callable[[list[dict[str, Any]]], None]) -> str:
    """Edit the entries, then recompute every link (a tamperer who knows the format)."""
    entries = [json.loads(x) for x in text.splitlines()]
    edit(entries)
    prev, out = genesis(CONFIG_DIGEST), []
    for e in entries:
        e["prev"] = prev
        line = encode_entry(e)
        out.append(line)
        prev = line_digest(line)
    return "".join(f"{x}\n" for x in out)


@pytest.mark.parametrize(("tamper", "message"), [c[1:] for c in PARSE_CASES], ids=[c[0] for c in PARSE_CASES])
def test_a_tampered_chain_is_refused_when_parsed(tamper, message):
    with pytest.raises(LedgerChainError, match=message):
        parse_chain(tamper(chain_text(3)), config_digest=CONFIG_DIGEST, where="privacy_ledger.jsonl")


def test_a_chain_of_another_config_does_not_link():
    with pytest.raises(LedgerChainError, match="does not link to the run's config"):
        parse_chain(chain_text(2, config_digest="d" * 64), config_digest=CONFIG_DIGEST, where="f")


def _chain_dir(tmp_path: Path, rounds: int) -> Path:
    (tmp_path / CHAIN_FILE).write_text(chain_text(rounds) if rounds >= 0 else "")
    return tmp_path


@pytest.mark.parametrize(
    ("chain_rounds", "checkpoint_round", "message"),
    [
        (3, 2, None),  # the chain reaches the checkpoint
        (3, 1, None),  # one round ahead: killed between the chain append and the checkpoint
        (1, None, None),  # killed in round 0 after the append, before the first checkpoint
        (0, None, None),  # (an empty file, no checkpoint: nothing was spent)
        (2, 2, "ends at round 1, but the checkpoint is of round 2"),
        (0, 0, "is empty, but the checkpoint is of round 0"),
        (3, 0, "through round 2, but the latest checkpoint is of round 0"),
        (2, None, "through round 1, but there is no checkpoint"),
    ],
)
def test_rounds_of_chain_and_checkpoint(tmp_path, chain_rounds, checkpoint_round, message):
    run_dir = _chain_dir(tmp_path, chain_rounds)
    go = lambda: open_chain(run_dir, config_digest=CONFIG_DIGEST, resume=True, checkpoint_round=checkpoint_round)  # noqa: E731
    if message is None:
        assert go().last_round == chain_rounds - 1
    else:
        with pytest.raises(LedgerChainError, match=message):
            go()


def test_a_missing_chain_is_refused_when_a_checkpoint_or_a_record_reports_spending(tmp_path):
    with pytest.raises(LedgerChainError, match=f"{CHAIN_FILE} is missing, but the checkpoint is of round 0"):
        open_chain(tmp_path, config_digest=CONFIG_DIGEST, resume=True, checkpoint_round=0)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 0, "privacy": {"a": {"epsilon": 1.0}}}) + "\n")
    with pytest.raises(LedgerChainError, match=r"is missing and there is no checkpoint, but .*metrics.jsonl reports privacy"):
        open_chain(tmp_path, config_digest=CONFIG_DIGEST, resume=True, checkpoint_round=None)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 0}) + "\n")  # a non-DP record: nothing spent
    assert open_chain(tmp_path, config_digest=CONFIG_DIGEST, resume=True, checkpoint_round=None).last_round == -1
    # a new run never reads what is on disk (its directory is empty or about to be replaced)
    assert open_chain(_chain_dir(tmp_path, 3), config_digest=CONFIG_DIGEST, resume=False, checkpoint_round=None).last_round == -1


def test_verify_checkpoint_compares_the_whole_line(tmp_path):
    chain = open_chain(_chain_dir(tmp_path, 3), config_digest=CONFIG_DIGEST, resume=True, checkpoint_round=2)
    chain.verify_checkpoint(2, fake_state(2), where="w")
    with pytest.raises(LedgerChainError, match="do not match line 3"):
        chain.verify_checkpoint(2, fake_state(1), where="w")  # an older, self-consistent state
    with pytest.raises(LedgerChainError, match="holds no privacy state"):
        chain.verify_checkpoint(2, None, where="w")
    (tmp_path / CHAIN_FILE).write_text(_edit_line(chain_text(3), 2, _set_epsilon))  # the last line: no next line to break
    chain = open_chain(tmp_path, config_digest=CONFIG_DIGEST, resume=True, checkpoint_round=2)
    with pytest.raises(LedgerChainError, match="line 3 of .* does not describe the checkpoint's ledgers"):
        chain.verify_checkpoint(2, fake_state(2), where="w")


def test_append_writes_the_next_round_checks_a_rerun_and_refuses_a_gap(tmp_path):
    chain = LedgerChain(path=tmp_path / CHAIN_FILE, config_digest=CONFIG_DIGEST)
    for r in range(3):
        chain.append(r, fake_state(r))
    assert (tmp_path / CHAIN_FILE).read_text() == chain_text(3)
    chain.append(2, fake_state(2))  # a re-run of the last round that reproduces it: nothing written
    assert (tmp_path / CHAIN_FILE).read_text() == chain_text(3)
    with pytest.raises(LedgerChainError, match="round 2 was re-run after an interruption but its privacy ledgers differ"):
        chain.append(2, fake_state(1))
    with pytest.raises(LedgerChainError, match="cannot record round 5; the chain ends at round 2"):
        chain.append(5, fake_state(5))
    assert not list(tmp_path.glob(".*tmp*"))  # written through a temporary file and renamed


# ------------------------------------------------------------------------------ through the simulation
DATA = {"num_sites": 2, "image_size": 16, "train_min": 24, "train_max": 24, "test_per_site": 8, "seed": 1}
ROUNDS = 3


def dp_config() -> FederationConfig:
    """Two DP sites with a fixed σ (no calibration search) and server DP: the server ledger is chained too (FedAvg: one model, fast)."""
    d = tiny_dict(run={"name": "chain", "seed": 3, "rounds": ROUNDS}, data={"name": "synthetic", "params": DATA},
                  algorithm={"name": "fedavg", "params": {}}, training={"local_epochs": 1, "lr": 0.05, "batch_size": 12})
    d["privacy"] = {"epsilon": 50.0, "noise_multiplier": 1.0, "loss_noise_multiplier": 1.0}
    d["server_privacy"] = {"clip": 1.0, "noise_multiplier": 0.8}
    return federation_from_dict(d, source="chain.toml")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``after0``: a DP run stopped after round 0; ``after2``: the same run continued to round 2; ``straight``: all rounds."""
    root = tmp_path_factory.mktemp("chain-runs")
    config = dp_config()
    run(config, run_dir=root / "after2", stop_after=1)
    shutil.copytree(root / "after2", root / "after0")
    run(config, run_dir=root / "after2", resume=True, stop_after=2)
    run(config, run_dir=root / "straight")
    for line in (root / "straight" / "metrics.jsonl").read_text().splitlines():  # every site really trained (and spent)
        record = json.loads(line)
        assert not record["failures"] and sorted(record["site_losses"]) == sorted(record["privacy"])
    return {"after0": root / "after0", "after2": root / "after2", "straight": root / "straight"}


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _state_path(run_dir: Path, round_idx: int) -> Path:
    return run_dir / "checkpoints" / f"round-{round_idx:05d}" / "state.json"


def _swap_checkpoint_privacy(run_dir: Path, _: dict[str, Path]) -> None:
    """Round 2's checkpoint gets round 1's ledgers: internally consistent, but older."""
    older = json.loads(_state_path(run_dir, 1).read_text())["state"]["privacy"]
    meta = json.loads(_state_path(run_dir, 2).read_text())
    meta["state"]["privacy"] = older
    _state_path(run_dir, 2).write_text(json.dumps(meta))


def _forge_checkpoint_ledger(run_dir: Path, _: dict[str, Path]) -> None:
    """One site's ledger in round 2's checkpoint loses its last mechanisms, with its own digest recomputed."""
    meta = json.loads(_state_path(run_dir, 2).read_text())
    sites = meta["state"]["privacy"]["sites"]
    name = sorted(sites)[0]
    saved = sites[name]["ledger"]
    ledger = PrivacyLedger(delta=saved["delta"], accountant=saved["accountant"], target_epsilon=saved["target_epsilon"], name=name)
    ledger.record([Mechanism.from_dict(e) for e in saved["history"][:-2]])
    sites[name]["ledger"] = ledger.state_dict()  # passes the ledger's own digest check
    PrivacyLedger.from_state_dict(sites[name]["ledger"])
    _state_path(run_dir, 2).write_text(json.dumps(meta))


def _edit_chain_line(index: int) -> Callable[[Path, dict[str, Path]], None]:
    def tamper(run_dir: Path, _: dict[str, Path]) -> None:
        path = run_dir / CHAIN_FILE
        path.write_text(_edit_line(path.read_text(), index, _set_epsilon_of_first_site))
    return tamper


def _set_epsilon_of_first_site(e: dict[str, Any]) -> None:
    e["sites"][sorted(e["sites"])[0]]["epsilon"] = 0.0


def _write(name: str, text: Callable[[str], str]) -> Callable[[Path, dict[str, Path]], None]:
    def tamper(run_dir: Path, _: dict[str, Path]) -> None:
        (run_dir / name).write_text(text((run_dir / name).read_text()))
    return tamper


def _rm(*names: str) -> Callable[[Path, dict[str, Path]], None]:
    def tamper(run_dir: Path, _: dict[str, Path]) -> None:
        for name in names:
            p = run_dir / name
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return tamper


def _restore_backup(name: str) -> Callable[[Path, dict[str, Path]], None]:
    """Replace a file or folder by its copy from the run's state after round 0 (an old backup)."""
    def tamper(run_dir: Path, runs: dict[str, Path]) -> None:
        _rm(name)(run_dir, runs)
        src = runs["after0"] / name
        shutil.copytree(src, run_dir / name) if src.is_dir() else shutil.copy(src, run_dir / name)
    return tamper


TAMPER_CASES: list[tuple[str, Callable[[Path, dict[str, Path]], None], str]] = [
    ("chain deleted", _rm(CHAIN_FILE), f"{CHAIN_FILE} is missing, but the checkpoint is of round 2"),
    ("chain emptied", _write(CHAIN_FILE, lambda t: ""), f"{CHAIN_FILE} is empty, but the checkpoint is of round 2"),
    ("chain truncated by a line", _write(CHAIN_FILE, lambda t: "".join(f"{x}\n" for x in t.splitlines()[:2])),
     f"{CHAIN_FILE} ends at round 1, but the checkpoint is of round 2"),
    ("chain torn mid-line", _write(CHAIN_FILE, lambda t: t[:-30]), f"{CHAIN_FILE}: the last line is incomplete"),
    ("chain restored from an old backup", _restore_backup(CHAIN_FILE), f"{CHAIN_FILE} ends at round 0, but the checkpoint is of round 2"),
    ("earlier chain line edited", _edit_chain_line(0), rf"{CHAIN_FILE}: line 2 \(round 1\) does not link to line 1"),
    ("middle chain line removed", _write(CHAIN_FILE, lambda t: "".join(f"{x}\n" for i, x in enumerate(t.splitlines()) if i != 1)),
     rf"{CHAIN_FILE}: line 2 \(round 2\) does not link to line 1"),
    ("last chain line edited", _edit_chain_line(2), f"line 3 of .*{CHAIN_FILE} does not describe the checkpoint's ledgers"),
    ("checkpoint ledgers replaced by older ones", _swap_checkpoint_privacy,
     f"ledgers in the checkpoint of round 2 do not match line 3 of .*{CHAIN_FILE}"),
    ("checkpoint ledger edited, its digest recomputed", _forge_checkpoint_ledger,
     f"ledgers in the checkpoint of round 2 do not match line 3 of .*{CHAIN_FILE}"),
    ("all checkpoints deleted", _rm("checkpoints"), f"{CHAIN_FILE} records privacy spending through round 2, but there is no checkpoint"),
    ("checkpoints rolled back two rounds", _restore_backup("checkpoints"),
     f"{CHAIN_FILE} records privacy spending through round 2, but the latest checkpoint is of round 0"),
    ("chain and checkpoints deleted", _rm(CHAIN_FILE, "checkpoints"),
     f"{CHAIN_FILE} is missing and there is no checkpoint, but .*summary.json reports privacy spending"),
    ("chain, checkpoints and summary deleted", _rm(CHAIN_FILE, "checkpoints", "summary.json"),
     f"{CHAIN_FILE} is missing and there is no checkpoint, but .*metrics.jsonl reports privacy spending"),
]


@pytest.mark.parametrize(("tamper", "message"), [c[1:] for c in TAMPER_CASES], ids=[c[0] for c in TAMPER_CASES])
def test_a_tampered_run_directory_refuses_to_resume_and_is_left_as_it_was(tmp_path, runs, tamper, message):
    run_dir = tmp_path / "run"
    shutil.copytree(runs["after2"], run_dir)
    tamper(run_dir, runs)
    before = _snapshot(run_dir)
    with pytest.raises(RunDirError, match=message):
        run(dp_config(), run_dir=run_dir, resume=True)
    assert _snapshot(run_dir) == before  # refused before anything was written


def _same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(ma.keys() == mb.keys() and all(torch.equal(ma[n], mb[n]) for n in ma) for ma, mb in zip(a, b, strict=True))


class Killed(Exception):
    pass


def _kill_checkpoint_of(round_idx: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The process dies in ``checkpoint.save`` of ``round_idx``: after the chain line, before the checkpoint."""
    real = checkpoint.save

    def save(run_dir: Path, r: int, **kw: Any) -> Path:
        if r == round_idx:
            raise Killed
        return real(run_dir, r, **kw)

    monkeypatch.setattr(checkpoint, "save", save)


@pytest.mark.parametrize("killed_round", [0, 2])
def test_an_honest_kill_between_the_chain_and_the_checkpoint_resumes_to_the_uninterrupted_result(tmp_path, runs, monkeypatch, killed_round):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as m:
        _kill_checkpoint_of(killed_round, m)
        with pytest.raises(Killed):
            run(dp_config(), run_dir=run_dir)
    chain_lines = (run_dir / CHAIN_FILE).read_text().splitlines()
    assert len(chain_lines) == killed_round + 1  # the killed round is in the chain, one ahead of the checkpoint
    assert checkpoint.latest_round(run_dir) == (None if killed_round == 0 else killed_round - 1)
    resumed = run(dp_config(), run_dir=run_dir, resume=True)
    straight = checkpoint.load(runs["straight"])
    assert straight is not None and _same(resumed.models, straight.server_models)
    # the re-run round reproduced its chain line; the whole chain is the uninterrupted run's, byte for byte
    assert (run_dir / CHAIN_FILE).read_bytes() == (runs["straight"] / CHAIN_FILE).read_bytes()
    assert resumed.summary["privacy"] == json.loads((runs["straight"] / "summary.json").read_text())["privacy"]


def test_a_rerun_round_must_reproduce_the_chain_line_it_was_killed_after(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as m:
        _kill_checkpoint_of(1, m)
        with pytest.raises(Killed):
            run(dp_config(), run_dir=run_dir)
    _edit_chain_line(1)(run_dir, {})  # the pending line (round 1, one ahead of the checkpoint) claims less was spent
    with pytest.raises(RunDirError, match=f"{CHAIN_FILE}: round 1 was re-run after an interruption but its privacy ledgers differ"):
        run(dp_config(), run_dir=run_dir, resume=True)


def test_pointing_latest_one_round_back_reruns_that_round_and_spends_nothing_new(tmp_path, runs):
    run_dir = tmp_path / "run"
    shutil.copytree(runs["after2"], run_dir)
    (run_dir / "checkpoints" / "LATEST").write_text("round-00001\n")  # the chain is one round ahead: as after a kill
    resumed = run(dp_config(), run_dir=run_dir, resume=True)
    assert (run_dir / CHAIN_FILE).read_bytes() == (runs["straight"] / CHAIN_FILE).read_bytes()
    assert resumed.summary["privacy"] == json.loads((runs["straight"] / "summary.json").read_text())["privacy"]


def test_a_non_dp_run_writes_no_chain(tmp_path):
    run(federation_from_dict(tiny_dict(run={"rounds": 1}), source="tiny.toml"), run_dir=tmp_path / "r")
    assert not (tmp_path / "r" / CHAIN_FILE).exists()

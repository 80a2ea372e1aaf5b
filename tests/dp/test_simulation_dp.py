"""DP in the in-process federation: records, budget stops, kill/resume, server DP, config errors, load_run."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from fedfew_med import evaluation
from fedfew_med.config import ConfigError, federation_from_dict
from fedfew_med.data import build_sites
from fedfew_med.dp import PrivacyLedger
from fedfew_med.simulation import Callbacks, RunDirError, run
from tests.conftest import tiny_dict
from tests.dp import rdp_reference as ref

# Three sites of 24 training records each: one calibration shared by all of them (the search costs seconds).
DATA = {"num_sites": 3, "image_size": 16, "train_min": 24, "train_max": 24, "test_per_site": 12, "seed": 1}
REQUIRED = {"epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "steps", "accountant", "mechanisms",
            "loss_noise_multiplier", "loss_releases", "target_epsilon", "stopped", "grad_sample_mode", "digest"}


def _config(rounds=2, k=2, privacy=None, server_privacy=None, **sections):
    d = tiny_dict(run={"name": "dp", "seed": 3, "rounds": rounds}, algorithm={"name": "fedfew", "params": {"k": k, "mu": 0.5, "reseed_after": 0}},
                  data={"name": "synthetic", "params": DATA}, **sections)
    if privacy is not None:
        d["privacy"] = privacy
    if server_privacy is not None:
        d["server_privacy"] = server_privacy
    return federation_from_dict(d, source="dp.toml")


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _same_models(a, b):
    return all(torch.equal(ma[n], mb[n]) for ma, mb in zip(a, b, strict=True) for n in ma)


@pytest.mark.slow  # two federations: several seconds on 2 cores
def test_dp_and_non_dp_runs_differ_and_every_record_carries_the_privacy_report(tmp_path):
    plain = run(_config(), run_dir=tmp_path / "plain")
    dp = run(_config(privacy={"epsilon": 8.0}), run_dir=tmp_path / "dp")
    assert not _same_models(plain.models, dp.models)
    assert "privacy" not in _records(tmp_path / "plain")[0] and "privacy" not in plain.summary
    records = _records(tmp_path / "dp")
    sites = sorted(records[0]["metrics"])
    for r, rec in enumerate(records):
        assert set(rec["privacy"]) == set(sites) and rec["privacy_stopped"] == []
        for entry in rec["privacy"].values():
            assert set(entry) >= REQUIRED and entry["round"] == r
            assert 0 < entry["epsilon"] <= entry["target_epsilon"] == 8.0
            assert entry["steps"] == (r + 1) * entry["planned"]["steps_per_round"]
    final = dp.summary["privacy"]
    for entry in final.values():
        # the whole planned run was spent: ε equals the calibration's plan and is within 1% of the target
        assert entry["epsilon"] == pytest.approx(entry["planned"]["epsilon"], rel=1e-12)
        assert 0.99 * 8.0 <= entry["epsilon"] <= 8.0
        # an independent computation of the same composition (numpy RDP) agrees within 1%
        history = [(m["noise_multiplier"], m["sample_rate"], m["steps"]) for m in entry["mechanisms"]]
        assert ref.epsilon_fine(history, entry["delta"]) == pytest.approx(entry["epsilon"], rel=0.01)
        # K = 2 models × 1 epoch × 2 steps (24 records, batch 16) × 2 rounds, and one loss per trained model
        assert (entry["sample_rate"], entry["steps"], entry["loss_releases"]) == (0.5, 8, 4)
    spent = evaluation.privacy_spent(evaluation.load_run(tmp_path / "dp"))
    assert spent is not None and spent.final() == {s: e["epsilon"] for s, e in final.items()}


def test_a_site_out_of_budget_stops_training_while_the_others_go_on(tmp_path, caplog):
    names = sorted(s.name for s in build_sites(_config().data))
    poor = names[0]
    # a fixed, small σ at one site: its budget runs out after its first round; the others are calibrated for all 3
    config = _config(rounds=3, privacy={"epsilon": 8.0, "sites": {poor: {"noise_multiplier": 2.0, "epsilon": 3.0}}})
    with caplog.at_level(logging.WARNING, logger="fedfew_med.simulation"):
        result = run(config, run_dir=tmp_path / "r")
    records = _records(tmp_path / "r")
    trained = [sorted(rec["site_losses"]) for rec in records]
    others = [s for s in names if s != poor]
    assert trained[0] == names and trained[1] == others and trained[2] == others
    assert [rec["privacy_stopped"] for rec in records] == [[], [poor], [poor]]
    assert sum(f"site {poor} stops training" in m for m in caplog.messages) == 1
    for rec in records:  # the stopped site still receives and evaluates the models every round
        assert poor in rec["metrics"] and poor in rec["assignments"]
    p = result.summary["privacy"]
    assert p[poor]["stopped"] and p[poor]["stopped_round"] == 1 and p[poor]["epsilon"] <= 3.0
    assert p[poor]["noise_multiplier"] == 2.0 and p[poor]["planned"]["epsilon"] > 3.0  # the plan alone would overspend
    assert all(not p[s]["stopped"] and p[s]["epsilon"] <= 8.0 for s in others)


@pytest.mark.slow
def test_a_killed_and_resumed_run_spends_exactly_what_an_uninterrupted_run_spends(tmp_path):
    config = _config(rounds=2, privacy={"epsilon": 6.0}, server_privacy={"clip": 1.0, "noise_multiplier": 0.8})
    straight = run(config, run_dir=tmp_path / "straight")

    class Killed(Exception):
        pass

    def kill(r, site):  # dies in round 1 after the first site has trained (and spent) but before the checkpoint
        if r == 1:
            raise Killed

    with pytest.raises(Killed):
        run(config, run_dir=tmp_path / "killed", callbacks=Callbacks(on_site_done=kill))
    state = json.loads((tmp_path / "killed" / "checkpoints" / "round-00000" / "state.json").read_text())["state"]
    spent = {s: PrivacyLedger.from_state_dict(v["ledger"]).epsilon() for s, v in state["privacy"]["sites"].items()}
    assert all(e > 0 for e in spent.values())  # round 0 is in the checkpoint; a restart must not reset it
    resumed = run(config, run_dir=tmp_path / "killed", resume=True)
    assert _same_models(straight.models, resumed.models)
    for key in ("privacy", "server_privacy"):
        assert resumed.summary[key] == straight.summary[key]  # same ε, same ledger digests, same mechanisms
    assert [r["privacy"] for r in _records(tmp_path / "killed")] == [r["privacy"] for r in _records(tmp_path / "straight")]
    assert straight.summary["server_privacy"]["releases"] == 2 * 2  # K = 2 models moved in each of 2 rounds


@pytest.mark.slow
def test_load_run_rebuilds_the_dp_ready_network(tmp_path):
    # BatchNorm in the configured classifier: the DP run trains (and saves) its GroupNorm version
    config = _config(rounds=1, k=1, privacy={"epsilon": 8.0},
                     model={"name": "classifier", "params": {"channels": [4, 8], "strides": [2, 2], "norm": "BATCH"}})
    result = run(config, run_dir=tmp_path / "r")
    loaded = evaluation.load_run(tmp_path / "r")
    site = loaded.sites[0]
    report = loaded.site_report(site, n_resamples=10)
    assert report.metrics["accuracy"].value == pytest.approx(result.summary["per_site"][site]["metrics"]["accuracy"])


def test_resuming_with_a_changed_site_budget_is_refused(tmp_path):
    run(_config(rounds=2, privacy={"epsilon": 8.0}), run_dir=tmp_path / "r", stop_after=1)
    ckpt = tmp_path / "r" / "checkpoints" / "round-00000" / "state.json"
    meta = json.loads(ckpt.read_text())
    site = sorted(meta["state"]["privacy"]["sites"])[0]
    del meta["state"]["privacy"]["sites"][site]  # a checkpoint without one site's ledger cannot resume a DP run
    ckpt.write_text(json.dumps(meta))
    with pytest.raises(RunDirError, match=f"no privacy ledger of site '{site}'"):
        run(_config(rounds=2, privacy={"epsilon": 8.0}), run_dir=tmp_path / "r", resume=True)


@pytest.mark.parametrize(
    "privacy, server_privacy, message",
    [
        ({"epsilon": -1.0}, None, r"dp.toml: \[privacy\].epsilon must be > 0, got -1.0"),
        ({"epsilon": 3.0, "clip": 1.0}, None, r"dp.toml: \[privacy\]: unknown key 'clip'"),
        ({"sites": {"nowhere": {"epsilon": 1.0}}}, None, r"dp.toml: \[privacy.sites.nowhere\] names no site"),
        ({"epsilon": 0.5, "loss_noise_multiplier": 1.0}, None, r"dp.toml: site 'site00-.*': its privacy options cannot be met: the loss"),
        (None, {"clip": 1.0}, r"dp.toml: \[server_privacy\].noise_multiplier is required"),
        (None, {"clip": 0.0, "noise_multiplier": 1.0}, r"dp.toml: \[server_privacy\].clip must be > 0, got 0.0"),
    ],
)
def test_privacy_config_errors_name_file_key_and_value(tmp_path, privacy, server_privacy, message):
    with pytest.raises(ConfigError, match=message):
        run(_config(privacy=privacy, server_privacy=server_privacy), run_dir=tmp_path / "r")


def test_server_dp_refuses_fedfew_re_seeding(tmp_path):
    config = _config(server_privacy={"clip": 1.0, "noise_multiplier": 1.0})
    d = config.to_dict()
    d["algorithm"]["params"]["reseed_after"] = 3
    with pytest.raises(ConfigError, match=r"dp.toml: \[algorithm.params\].reseed_after must be 0 with \[server_privacy\].*got 3"):
        run(federation_from_dict(d, source="dp.toml"), run_dir=tmp_path / "r")


def test_a_config_without_privacy_keeps_its_digest():
    d = tiny_dict()
    assert "privacy" not in federation_from_dict(d).to_dict()
    assert federation_from_dict({**d, "privacy": {}}).digest() == federation_from_dict(d).digest()
    assert federation_from_dict({**d, "privacy": {"epsilon": 3.0}}).digest() != federation_from_dict(d).digest()


@pytest.mark.slow
def test_benchmark_epoch_times_reports_interleaved_medians_and_their_ratios():
    from fedfew_med.dp import benchmark_epoch_times

    out = benchmark_epoch_times(_config(), epochs=3)
    assert set(out["seconds"]) == {"none", "hooks", "ghost"} and all(len(v) == 3 for v in out["samples"].values())
    for mode in ("hooks", "ghost"):
        assert out["ratios"][mode] == pytest.approx(sorted(out["samples"][mode])[1] / sorted(out["samples"]["none"])[1])
        assert out["ratios_min"][mode] == pytest.approx(min(out["samples"][mode]) / min(out["samples"]["none"]))
    assert (out["sites"], out["records"], out["model"]) == (3, 72, "classifier")

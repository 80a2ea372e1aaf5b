"""The in-process federation: run directory, determinism, resume, faults, every method."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fedfew_med import runtime, simulation
from fedfew_med.algorithms import REGISTRY
from fedfew_med.config import federation_from_dict
from fedfew_med.simulation import RunDirError, run
from tests.conftest import tiny_dict


def _config(**sections):
    return federation_from_dict(tiny_dict(**sections), source="tiny.toml")


def _assert_same_models(a, b):
    assert len(a) == len(b)
    for ma, mb in zip(a, b, strict=True):
        assert ma.keys() == mb.keys()
        for name in ma:
            assert torch.equal(ma[name], mb[name]), name


def test_run_directory_contents(tmp_path, tiny_config):
    result = run(tiny_config, run_dir=tmp_path / "r")
    d = tmp_path / "r"
    assert json.loads((d / "config.json").read_text()) == tiny_config.to_dict()
    records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    rec = records[-1]
    server = rec["server"]
    m, k = 3, 2
    assert len(server["losses"]) == m and all(len(row) == k for row in server["losses"])
    assert sum(server["alpha"]) == pytest.approx(1.0)
    assert all(sum(row) == pytest.approx(1.0) for row in server["w"])
    assert sum(server["c"]) == pytest.approx(1.0)
    assert set(rec["assignments"]) == set(rec["metrics"]) and len(rec["assignments"]) == m
    assert all(b["sent"] > 0 and b["received"] > 0 for b in rec["bytes"].values())
    summary = json.loads((d / "summary.json").read_text())
    assert summary["finished"] and summary["rounds"] == 4
    assert set(summary["summary"]) == {"mean", "worst", "best", "jain", "sites", "of_sites"}
    assert summary["summary"]["sites"] == summary["summary"]["of_sites"] == 3 and set(summary["site_status"].values()) == {"evaluated"}
    # checkpoints are safetensors + JSON only: nothing to unpickle
    ckpt_files = {p.name for p in (d / "checkpoints").rglob("*") if p.is_file()}
    assert ckpt_files == {"LATEST", "server.safetensors", "sites.safetensors", "state.json"}
    saved = load_file(str(d / "models.safetensors"))
    assert torch.equal(saved["0/" + next(iter(result.models[0]))], next(iter(result.models[0].values())))


def test_bytes_match_model_size(tmp_path, tiny_config):
    result = run(tiny_config, run_dir=tmp_path / "r")
    per_model = runtime.params_nbytes(result.models[0])
    rec = result.records[0]
    for b in rec["bytes"].values():
        assert b["sent"] == 2 * per_model  # K = 2 models down
        assert b["received"] == 2 * per_model + 8 * 3  # K models + K losses + count up


def test_same_seed_same_result_to_the_bit(tmp_path, tiny_config):
    a = run(tiny_config, run_dir=tmp_path / "a")
    b = run(tiny_config, run_dir=tmp_path / "b")
    _assert_same_models(a.models, b.models)
    assert a.summary["per_site"] == b.summary["per_site"]
    c = run(_config(run={"seed": 4}), run_dir=tmp_path / "c")
    assert not torch.equal(next(iter(a.models[0].values())), next(iter(c.models[0].values())))


@pytest.mark.parametrize("algorithm", ["fedfew", "ditto", "local", "ifca"])
def test_resume_equals_uninterrupted_to_the_bit(tmp_path, algorithm):
    params = {"fedfew": {"k": 2, "init": "perturbed"}, "ditto": {"lam": 0.1}, "local": {}, "ifca": {"k": 2}}[algorithm]
    cfg = federation_from_dict(
        {**tiny_dict(), "algorithm": {"name": algorithm, "params": params}}, source="tiny.toml"
    )
    straight = run(cfg, run_dir=tmp_path / "straight")
    first = run(cfg, run_dir=tmp_path / "split", stop_after=2)
    assert first.rounds_completed == 2 and not first.summary["finished"]
    resumed = run(cfg, run_dir=tmp_path / "split", resume=True)
    assert resumed.rounds_completed == 4 and resumed.summary["finished"]
    _assert_same_models(straight.models, resumed.models)
    a = load_file(str(tmp_path / "straight/checkpoints/round-00003/sites.safetensors"))
    b = load_file(str(tmp_path / "split/checkpoints/round-00003/sites.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    lines_a = (tmp_path / "straight/metrics.jsonl").read_text().splitlines()
    lines_b = (tmp_path / "split/metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines_a]
    assert strip == [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines_b]


def test_resume_drops_records_after_the_last_checkpoint(tmp_path, tiny_config):
    d = tmp_path / "r"
    run(tiny_config, run_dir=d, stop_after=2)
    with (d / "metrics.jsonl").open("a") as fh:  # a crash after the record, before the checkpoint
        fh.write(json.dumps({"round": 2, "partial": True}) + "\n" + '{"round": 3, "tor')
    run(tiny_config, run_dir=d, resume=True)
    rounds = [json.loads(line)["round"] for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2, 3]


def test_existing_run_dir_is_protected(tmp_path, tiny_config):
    run(tiny_config, run_dir=tmp_path / "r", stop_after=1)
    with pytest.raises(RunDirError, match="--resume"):
        run(tiny_config, run_dir=tmp_path / "r")
    with pytest.raises(RunDirError, match="different config"):
        run(_config(run={"seed": 9}), run_dir=tmp_path / "r", resume=True)
    run(tiny_config, run_dir=tmp_path / "r", overwrite=True)


def test_a_run_directory_is_locked_while_in_use(tmp_path, tiny_config):
    from fedfew_med import rundir

    d = tmp_path / "r"
    with rundir.locked(d):  # another process (or coordinator) holds the run
        with pytest.raises(RunDirError, match=r"in use by another process \(lock .*\.r\.lock\)"):
            run(tiny_config, run_dir=d, stop_after=1)
    assert (tmp_path / ".r.lock").exists() and not d.exists()  # the lock file stays: only a held lock refuses
    assert run(tiny_config, run_dir=d, stop_after=1).rounds_completed == 1


def test_a_crashing_site_is_skipped_and_recorded(tmp_path, tiny_config, monkeypatch):
    original = simulation.Federation.site_step

    def flaky(self, site, info):
        if site.startswith("site01") and info.round == 1:
            raise RuntimeError("disk full at the site")
        return original(self, site, info)

    monkeypatch.setattr(simulation.Federation, "site_step", flaky)
    result = run(tiny_config, run_dir=tmp_path / "r")
    rec = result.records[1]
    assert list(rec["failures"]) == ["site01-dark"] and "disk full" in rec["failures"]["site01-dark"]
    assert "site01-dark" not in rec["server"]["sites"] and len(rec["server"]["sites"]) == 2
    assert result.summary["finished"] and "1" in result.summary["failures"]


def _bad_models(kind: str) -> dict[int, dict[str, torch.Tensor]]:
    """A returned model 0 (the sent one is zeros of shape (2, 3)) broken in one way."""
    return {
        "ok": {0: {"w": torch.ones(2, 3)}},
        "nan": {0: {"w": torch.full((2, 3), float("nan"))}},
        "inf": {0: {"w": torch.tensor([[1.0, float("inf"), 1.0], [1.0, 1.0, 1.0]])}},
        "wrong_shape": {0: {"w": torch.ones(3, 2)}},
        "wrong_key": {0: {"v": torch.ones(2, 3)}},
        "extra_key": {0: {"w": torch.ones(2, 3), "v": torch.ones(1)}},
        "wrong_dtype": {0: {"w": torch.ones(2, 3, dtype=torch.float64)}},
        "not_a_tensor": {0: {"w": [[1.0] * 3] * 2}},  # type: ignore[dict-item]
        "extra_model": {5: {"w": torch.ones(2, 3)}},
        "too_far": {0: {"w": torch.full((2, 3), 5.0)}},  # update norm sqrt(6) * 5 = 12.2 > 10
    }[kind]


@pytest.mark.parametrize(
    ("losses", "num_samples", "models", "message"),
    [
        ((float("nan"), 1.0), 4, "ok", "non-finite loss"),
        ((1.0, float("inf")), 4, "ok", "non-finite loss"),
        ((1.0,), 4, "ok", "expected 2 losses"),
        ((1.0, "2"), 4, "ok", "losses must be numbers"),
        ((1.0, 2.0), 0, "ok", "num_samples must be an integer >= 1"),
        ((1.0, 2.0), 4.0, "ok", "num_samples must be an integer >= 1"),
        ((1.0, 2.0), 4, "nan", "NaN or Inf"),
        ((1.0, 2.0), 4, "inf", "NaN or Inf"),
        ((1.0, 2.0), 4, "wrong_shape", r"'w' has shape \(3, 2\), expected \(2, 3\)"),
        ((1.0, 2.0), 4, "wrong_key", r"names differ .* missing \['w'\], unexpected \['v'\]"),
        ((1.0, 2.0), 4, "extra_key", r"unexpected \['v'\]"),
        ((1.0, 2.0), 4, "wrong_dtype", "'w' has dtype torch.float64, expected torch.float32"),
        ((1.0, 2.0), 4, "not_a_tensor", "is a list, expected a torch.Tensor"),
        ((1.0, 2.0), 4, "extra_model", "was not sent"),
        ((1.0, 2.0), 4, "too_far", r"update norm 12.25 exceeds \[faults\].max_update_norm = 10"),
    ],
)
def test_malformed_updates_are_rejected(losses, num_samples, models, message):
    sent = {0: {"w": torch.zeros(2, 3)}, 1: {"w": torch.zeros(2, 3)}}
    reply = runtime.SiteReply(num_samples=num_samples, losses=losses, models=_bad_models(models))
    with pytest.raises(ValueError, match=message):
        runtime.validate_reply(reply, sent, 2, max_update_norm=10.0)


def test_update_norm_bound_is_inclusive_and_can_be_switched_off():
    sent = {0: {"w": torch.zeros(2, 3), "b": torch.zeros(1)}}
    returned = {0: {"w": torch.full((2, 3), 2.0), "b": torch.tensor([6.0])}}  # norm sqrt(6 * 4 + 36) = sqrt(60)
    assert runtime.update_norm(returned[0], sent[0]) == pytest.approx(60 ** 0.5, rel=1e-12)
    reply = runtime.SiteReply(num_samples=4, losses=(1.0,), models=returned)
    runtime.validate_reply(reply, sent, 1, max_update_norm=60 ** 0.5 + 1e-9)
    runtime.validate_reply(reply, sent, 1, max_update_norm=0.0)  # 0: no bound
    runtime.validate_reply(reply, sent, 1)  # the default keeps the Flower coordinator's call unchanged
    with pytest.raises(ValueError, match="update norm 7.746 exceeds"):
        runtime.validate_reply(reply, sent, 1, max_update_norm=7.7)
    huge = runtime.SiteReply(num_samples=4, losses=(1.0,), models={0: {"w": torch.full((2, 3), 3e38), "b": torch.zeros(1)}})
    with pytest.raises(ValueError, match="update norm 7.348e\\+38 exceeds"):  # float64: no overflow to inf
        runtime.validate_reply(huge, sent, 1, max_update_norm=1e4)


def test_participation_fraction_is_seeded(tmp_path):
    cfg = _config(run={"participation": 0.5, "rounds": 3}, data={"params": {**tiny_dict()["data"]["params"], "num_sites": 4}})
    fed = simulation.Federation(cfg, simulation.build_sites(cfg.data))
    chosen = [fed.participants(r) for r in range(6)]
    assert all(len(c) == 2 for c in chosen)
    assert len({tuple(c) for c in chosen}) > 1  # it varies over rounds
    assert chosen == [fed.participants(r) for r in range(6)]  # and is reproducible


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_runs_under_one_protocol(tmp_path, name):
    cfg = federation_from_dict(
        {**tiny_dict(run={"rounds": 2, "finetune_eval_epochs": 1}), "algorithm": {"name": name}}, source="tiny.toml"
    )
    result = run(cfg, run_dir=tmp_path / name)
    per_site = result.summary["per_site"]
    assert len(per_site) == 3
    assert all(0.0 <= row["metric"] <= 1.0 and 0.0 <= row["metric_finetuned"] <= 1.0 for row in per_site.values())
    if name in ("local", "ditto"):
        assert all(row["model"] is None for row in per_site.values())


def test_segmentation_federation_runs(tmp_path):
    cfg = federation_from_dict(
        tiny_dict(run={"rounds": 1}, model={"name": "unet", "params": {"channels": [4, 8], "strides": [2]}},
                  data={"params": {**tiny_dict()["data"]["params"], "task": "segmentation"}}),
        source="tiny.toml",
    )
    result = run(cfg, run_dir=tmp_path / "seg")
    assert result.summary["metric"] == "dice"
    assert all(0.0 <= row["metric"] <= 1.0 for row in result.summary["per_site"].values())
    assert all("hd95" in row["metrics"] for row in result.summary["per_site"].values())


def test_reseeding_is_recorded_and_resumes_to_the_bit(tmp_path):
    """FedFew re-seeds idle models; the idle counts travel in the checkpoint, so a run stopped after round 2 and
    resumed re-seeds in the same rounds and ends with the same models as an uninterrupted one."""
    cfg = federation_from_dict(
        {**tiny_dict(), "run": {**tiny_dict()["run"], "rounds": 6},
         "algorithm": {"name": "fedfew", "params": {"k": 3, "reseed_after": 2, "init": "identical"}}}, source="tiny.toml"
    )
    straight = run(cfg, run_dir=tmp_path / "straight")
    reseeded = [(r["round"], x["idle_rounds"]) for r in straight.records for x in r["server"]["reseeded"]]
    # a model idle since round 0, re-seeded after the split (round >= 1): the resumed run needs the saved count
    assert any(rnd >= 1 and idle >= rnd + 1 for rnd, idle in reseeded), reseeded
    assert straight.summary["model_use"]["reseeded"] == len(reseeded)
    run(cfg, run_dir=tmp_path / "split", stop_after=1)
    resumed = run(cfg, run_dir=tmp_path / "split", resume=True)
    _assert_same_models(straight.models, resumed.models)
    lines_a = (tmp_path / "straight/metrics.jsonl").read_text().splitlines()
    lines_b = (tmp_path / "split/metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines_a]
    assert strip == [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines_b]
    state = json.loads((tmp_path / "split/checkpoints/LATEST").read_text().strip() and
                       (tmp_path / "split/checkpoints" / (tmp_path / "split/checkpoints/LATEST").read_text().strip() / "state.json").read_text())
    assert state["state"]["algorithm"]["idle"] == straight.records[-1]["server"]["idle_rounds"]


def test_the_headline_metric_is_chosen_by_run_metric_and_useless_models_are_flagged(tmp_path):
    from fedfew_med.config import ConfigError
    from fedfew_med.rundir import summary_table

    result = run(_config(run={"rounds": 1, "metric": "balanced_accuracy"}), run_dir=tmp_path / "r")
    s = result.summary
    assert s["metric"] == "balanced_accuracy"
    for row in s["per_site"].values():
        m = row["metrics"]
        assert row["metric"] == m["balanced_accuracy"]
        assert {"auc_low", "auc_high", "classes_predicted"} <= set(m)
        # the flags follow the metrics: one class predicted, or an AUC interval holding 0.5
        single = m["classes_predicted"] == 1
        chance = m["auc_low"] <= 0.5 <= m["auc_high"]
        assert [("single class" in f, "includes 0.5" in f) for f in row["flags"]] == \
            [(True, False)] * single + [(False, True)] * chance
    table = summary_table(s)
    # the headline first, then the other four classification metrics
    assert table.splitlines()[0].split()[4:] == ["balanced_accuracy", "acc", "auc", "sens", "spec"]
    assert table.count("warning: ") == sum(len(r["flags"]) for r in s["per_site"].values())
    with pytest.raises(ConfigError, match=r"tiny.toml: \[run\].metric must be one of accuracy, .*lower-is-better.*'hd95'"):
        run(_config(run={"rounds": 1, "metric": "hd95"}), run_dir=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()

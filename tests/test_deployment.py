"""Deployment at a DP site (fedfew_med.deployment): only already-released losses, never fresh ones, no fine-tuning.

The simulation test spies on every loss and training call a site's work makes: under DP each one on
the training records goes through the DP work (charged to the ledger), the evaluation adds no charge,
and the model each DP site deploys is the argmin of the losses it released in that round's training.
"""

from __future__ import annotations

import json

import pytest

from fedfew_med.config import ConfigError, federation_from_dict
from fedfew_med.data import build_sites
from fedfew_med.deployment import PrivateDeploymentError, ReleasedLossWork, check_private_deployment
from fedfew_med.dp import DPSiteWork
from fedfew_med.runtime import ModelFacts, make_algorithm
from fedfew_med.simulation import run
from fedfew_med.training import SiteWork
from tests.conftest import tiny_dict

DATA = {"num_sites": 3, "image_size": 16, "train_min": 24, "train_max": 24, "test_per_site": 12, "seed": 1}
PRIVACY = {"epsilon": 8.0}


def _config(algorithm="fedfew", params=None, privacy=PRIVACY, rounds=3, **run):
    d = tiny_dict(run={"name": "dep", "seed": 3, "rounds": rounds, "eval_every": 1, **run},
                  algorithm={"name": algorithm, "params": {"k": 2, **(params or {})}}, data={"name": "synthetic", "params": DATA})
    if algorithm in ("fedavg", "fedavg_ft", "ditto", "local"):
        d["algorithm"]["params"].pop("k")
    if algorithm.startswith("fedfew"):
        d["algorithm"]["params"].update({"mu": 0.5, "reseed_after": 0})
    if privacy is not None:
        d["privacy"] = privacy
    return federation_from_dict(d, source="dep.toml")


class _Work:
    num_samples = 10
    state: dict = {}

    def loss(self, params, *, slot, split="train"):
        raise AssertionError("not reached")

    def train(self, params, *, slot, epochs=None, prox=None, from_slot=None):
        raise AssertionError("not reached")


@pytest.mark.parametrize(
    ("released", "models", "call", "outcome"),
    [
        ([0.4, 0.2], 2, "losses", [0.4, 0.2]),
        (None, 2, "losses", "has not released losses"),
        ([0.4, 0.2, 0.1], 2, "losses", "3 released losses for 2 server models"),
        ([0.4, 0.2], 2, "loss", "may not compute a fresh loss on its train records"),
        ([0.4, 0.2], 2, "train", "fine-tuning at deployment"),
    ],
)
def test_released_loss_work_gives_only_the_released_losses(released, models, call, outcome):
    work = ReleasedLossWork(_Work(), released, site="a")
    params = [{} for _ in range(models)]
    act = {"losses": lambda: work.losses(params, slots=["s0", "s1"]), "loss": lambda: work.loss({}, slot="s0"),
           "train": lambda: work.train({}, slot="s0")}[call]
    if isinstance(outcome, list):
        assert act() == outcome
    else:
        with pytest.raises(PrivateDeploymentError, match=outcome):
            act()
    assert work.num_samples == 10 and work.state == {}


@pytest.mark.parametrize(
    ("algorithm", "params", "finetune_eval", "refused"),
    [
        ("fedfew", {}, 0, None),
        ("ifca", {}, 0, None),
        ("fedavg", {}, 0, None),
        ("ditto", {}, 0, None),
        ("local", {}, 0, None),
        ("fedfew_ft", {}, 0, "fine-tunes at deployment"),
        ("fedavg_ft", {}, 0, "fine-tunes at deployment"),
        ("fedfew", {}, 2, "finetune_eval_epochs must be 0"),
    ],
)
def test_a_dp_run_refuses_deployment_that_trains(algorithm, params, finetune_eval, refused):
    config = _config(algorithm, params, finetune_eval_epochs=finetune_eval)
    facts = ModelFacts.common(build_sites(config.data))
    alg, models = make_algorithm(config, facts)
    if refused is None:
        check_private_deployment(config, alg, models, ["site-0"])
    else:
        with pytest.raises(ConfigError, match=refused) as err:
            check_private_deployment(config, alg, models, ["site-0"])
        assert "dep.toml" in str(err.value) and "site-0" in str(err.value)
    check_private_deployment(config, alg, models, [])  # without DP sites anything goes


def test_the_simulation_refuses_fedfew_ft_with_dp_before_training(tmp_path):
    with pytest.raises(ConfigError, match="fine-tunes at deployment"):
        run(_config("fedfew_ft"), run_dir=tmp_path / "r")
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


@pytest.fixture
def spy(monkeypatch):
    """Every loss / train call of a site's work: (work class, site, what, split)."""
    calls: list[tuple[str, str, str, str]] = []
    for cls in (SiteWork, DPSiteWork):
        for name in ("loss", "losses", "train"):
            original = cls.__dict__[name]

            def wrapped(self, *args, _original=original, _name=name, _cls=cls.__name__, **kwargs):
                calls.append((_cls, self.data.name, _name, kwargs.get("split", "train")))
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(cls, name, wrapped)
    return calls


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm", ["fedfew", "ifca"])
def test_dp_sites_deploy_by_their_released_losses_and_evaluation_charges_nothing(tmp_path, spy, algorithm):
    result = run(_config(algorithm), run_dir=tmp_path / "r")
    records = _records(tmp_path / "r")
    sites = sorted(records[0]["metrics"])
    assert len(sites) == 3
    # every loss or training step on a site's training records went through the DP work (charged first)
    # (DPSiteWork's own methods; a plain SiteWork call on the training records would be uncharged)
    on_train = [c for c in spy if c[3] == "train"]
    assert on_train and {c[0] for c in on_train} == {"DPSiteWork"}, sorted(set(on_train))
    for rec in records:
        for s in sites:
            released = rec["site_losses"][s]
            assert len(released) == 2
            assert rec["assignments"][s] == min(range(2), key=lambda k: (released[k], k))
    for entry in result.summary["privacy"].values():  # the ledger holds the training rounds' releases, nothing more
        assert entry["loss_releases"] == 3 * entry["planned"]["loss_releases_per_round"]
        assert entry["epsilon"] == pytest.approx(entry["planned"]["epsilon"], rel=1e-12)


@pytest.mark.slow  # three DP federations
def test_a_resumed_dp_run_deploys_as_an_uninterrupted_one(tmp_path):
    whole = run(_config(), run_dir=tmp_path / "whole")
    run(_config(), run_dir=tmp_path / "cut", stop_after=1)
    resumed = run(_config(), run_dir=tmp_path / "cut", resume=True)
    assert _records(tmp_path / "cut") == [{**r, "seconds": c["seconds"]} for r, c in
                                          zip(_records(tmp_path / "whole"), _records(tmp_path / "cut"), strict=True)]
    assert resumed.summary["per_site"] == whole.summary["per_site"]


def test_without_dp_deployment_is_unchanged(tmp_path, spy):
    run(_config(privacy=None, rounds=1), run_dir=tmp_path / "r")
    evaluated = [c for c in spy if c[2] == "losses" and c[0] == "SiteWork"]
    assert evaluated  # the plain sites rank the models by fresh losses on their records, as before

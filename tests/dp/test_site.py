"""SitePrivacy in a small round loop: calibrated budget, stop on exhaustion, resume from JSON state bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from fedfew_med.algorithms import RoundInfo, build_algorithm
from fedfew_med.algorithms.base import clone
from fedfew_med.config import TrainingConfig
from fedfew_med.data import SyntheticOptions, make_synthetic_federation
from fedfew_med.dp import DPSiteWork, LedgerStateError, PrivacyOptions, SitePrivacy
from fedfew_med.models import buffers_of, parameters_of
from fedfew_med.training import SiteState, SiteWork
from tests.dp.conftest import CURVES, tiny_net

TRAINING = TrainingConfig(lr=0.1, batch_size=8, local_epochs=1)


class MiniFederation:
    """Just enough of a round loop to drive SitePrivacy as the simulation will."""

    def __init__(self, options: PrivacyOptions, rounds: int) -> None:
        self.sites = {s.name: s for s in make_synthetic_federation(
            SyntheticOptions(num_sites=2, image_size=16, train_min=16, train_max=24, val_fraction=0.0, test_per_site=4, seed=2))}
        self.net = tiny_net()
        self.buffers = buffers_of(self.net)
        self.algorithm = build_algorithm("fedfew", {"k": 2, "mu": 0.5}, seed=0)
        self.models = self.algorithm.init_models(lambda i: parameters_of(self.net))
        self.states = {s: SiteState() for s in self.sites}
        self.rounds = rounds
        info = self.info(0)
        self.privacy = {
            s: SitePrivacy.plan(s, options, algorithm=self.algorithm, info=info, models=dict(enumerate(self.models)),
                                num_samples=d.size("train"), batch_size=TRAINING.batch_size, local_epochs=TRAINING.local_epochs,
                                rounds=rounds, network=self.net, curves=CURVES)
            for s, d in self.sites.items()
        }
        self.trained: dict[int, list[str]] = {}
        self.reports: list[dict] = []

    def info(self, r: int) -> RoundInfo:
        n = {s: d.size("train") for s, d in self.sites.items()}
        return RoundInfo(round=r, num_rounds=self.rounds, participants=tuple(sorted(n)),
                         site_weight={s: v / sum(n.values()) for s, v in n.items()}, extras=self.algorithm.round_extras(r, self.rounds))

    def run(self, start: int, end: int) -> None:
        for r in range(start, end):
            info = self.info(r)
            replies = {}
            for s in sorted(self.sites):
                privacy = self.privacy[s]
                if not privacy.can_train(r):  # out of budget: the site stops training
                    continue
                base = SiteWork(data=self.sites[s], network=self.net, initial_buffers=self.buffers, state=self.states[s],
                                training=TRAINING, seed=0, round_idx=r)
                replies[s] = self.algorithm.local_round(s, info, {k: clone(m) for k, m in enumerate(self.models)}, privacy.work(base))
            self.trained[r] = sorted(replies)
            self.models = self.algorithm.aggregate(info, self.models, replies).models
            self.reports.append({s: p.report(r) for s, p in self.privacy.items()})

    def state(self) -> str:
        return json.dumps({s: p.state_dict() for s, p in self.privacy.items()})


@pytest.mark.slow
def test_sites_stop_when_the_planned_budget_is_spent():
    options = PrivacyOptions(epsilon=3.0)
    fed = MiniFederation(options, rounds=2)
    fed.run(0, 4)  # two rounds more than planned
    names = sorted(fed.sites)
    assert fed.trained == {0: names, 1: names, 2: [], 3: []}
    for p in fed.privacy.values():
        assert p.ledger.epsilon() <= 3.0
        assert p.ledger.epsilon() == pytest.approx(p.calibration.epsilon, rel=1e-12)  # the run went as planned
        assert p.stopped and p.stopped_round == 2
    first = names[0]
    last = fed.reports[-1][first]
    json.dumps(fed.reports)  # JSON-able as is
    assert last["stopped"] and last["steps"] == 2 * fed.privacy[first].calibration.steps_per_round
    assert last["loss_releases"] == 2 * 2 and last["epsilon"] <= last["target_epsilon"] == 3.0
    assert {m["kind"] for m in last["mechanisms"]} == {"dp-sgd", "loss"}
    assert set(last) >= {"epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "steps", "accountant",
                         "loss_noise_multiplier", "mechanisms", "digest", "grad_sample_mode"}


@pytest.mark.slow
def test_a_resumed_run_continues_exactly_like_an_uninterrupted_one():
    options = PrivacyOptions(epsilon=8.0)
    straight = MiniFederation(options, rounds=4)
    straight.run(0, 4)

    first = MiniFederation(options, rounds=4)
    first.run(0, 2)
    saved_models = [clone(m) for m in first.models]
    saved_states = first.states
    blob = first.state()  # what the checkpoint's state.json holds

    resumed = MiniFederation(options, rounds=4)  # a new process: plan again, then load the spent budget
    for s, state in json.loads(blob).items():
        resumed.privacy[s].load_state_dict(state)
    assert all(resumed.privacy[s].ledger.epsilon() == first.privacy[s].ledger.epsilon() > 0 for s in resumed.sites)
    resumed.models, resumed.states = saved_models, saved_states
    resumed.run(2, 4)

    for k, m in enumerate(straight.models):
        assert all(torch.equal(m[n], resumed.models[k][n]) for n in m)
    for s in straight.sites:
        assert resumed.privacy[s].ledger.digest() == straight.privacy[s].ledger.digest()
        assert resumed.privacy[s].report(3) == straight.privacy[s].report(3)


def test_loading_a_state_made_under_another_calibration_is_refused():
    a = MiniFederation(PrivacyOptions(epsilon=8.0), rounds=2)
    b = MiniFederation(PrivacyOptions(epsilon=8.0), rounds=3)  # a different plan, a different σ
    with pytest.raises(LedgerStateError, match="calibration differs"):
        name = sorted(a.sites)[0]
        b.privacy[name].load_state_dict(a.privacy[name].state_dict())


def test_work_factory_takes_sitework_arguments_and_charges_the_site_ledger():
    fed = MiniFederation(PrivacyOptions(epsilon=8.0), rounds=2)
    name = sorted(fed.sites)[0]
    p = fed.privacy[name]
    work = p.work_factory(data=fed.sites[name], network=fed.net, initial_buffers=fed.buffers, state=SiteState(),
                          training=TRAINING, seed=0, round_idx=0)
    assert isinstance(work, DPSiteWork) and work.ledger is p.ledger
    work.loss(fed.models[0], slot="server/0")
    assert p.ledger.total_steps("loss") == 1

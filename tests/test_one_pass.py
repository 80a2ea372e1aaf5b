"""[training] one_pass: a site's K copies trained in one vectorised pass equal K separate runs on that data order."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedfew_med.config import ConfigError, TrainingConfig, federation_from_dict
from fedfew_med.data import SyntheticOptions, make_synthetic_federation
from fedfew_med.models import buffers_of, build_model, parameters_of
from fedfew_med.simulation import run
from fedfew_med.training import SiteState, SiteWork
from tests.conftest import tiny_dict


def _work(site, one_pass: bool, *, momentum: float = 0.0, weight_decay: float = 0.0, epochs: int = 1):
    net = build_model("classifier", {"channels": (4, 8)}, task="classification", in_channels=1, num_classes=2,
                      spatial_dims=2, image_size=16, seed=0)
    training = TrainingConfig(lr=0.05, batch_size=8, momentum=momentum, weight_decay=weight_decay, local_epochs=epochs, one_pass=one_pass)
    return SiteWork(data=site, network=net, initial_buffers=buffers_of(net), state=SiteState(), training=training, seed=5, round_idx=2)


def _copies(k: int):
    return [parameters_of(build_model("classifier", {"channels": (4, 8)}, task="classification", in_channels=1,
                                      num_classes=2, spatial_dims=2, image_size=16, seed=100 + i)) for i in range(k)]


@pytest.fixture(scope="module")
def site():
    return make_synthetic_federation(SyntheticOptions(num_sites=1, image_size=16, train_min=30, train_max=30, test_per_site=10))[0]


@pytest.mark.parametrize(("momentum", "weight_decay", "epochs"), [(0.0, 0.0, 1), (0.9, 1e-3, 2)])
def test_one_pass_equals_separate_runs_on_the_first_slots_order(site, momentum, weight_decay, epochs):
    params, slots = _copies(3), ["server/0", "server/1", "server/2"]
    together = _work(site, True, momentum=momentum, weight_decay=weight_decay, epochs=epochs).train_many(params, slots=slots)
    # the reference: each copy alone, every one on the data order of slots[0]
    alone = [_work(site, False, momentum=momentum, weight_decay=weight_decay, epochs=epochs).train(p, slot=slots[0]) for p in params]
    for a, b in zip(together, alone, strict=True):
        assert a.steps == b.steps and a.samples == b.samples
        assert a.loss == pytest.approx(b.loss, rel=1e-5)
        for n in b.params:
            assert a.params[n].device.type == "cpu" and a.params[n].dtype == torch.float32
            torch.testing.assert_close(a.params[n], b.params[n], rtol=1e-5, atol=1e-6)
    # and the copies did move apart from where they started, differently
    name = next(iter(params[0]))
    assert not torch.equal(together[0].params[name], together[1].params[name])


def test_one_pass_losses_equal_separate_losses(site):
    params, slots = _copies(3), ["server/0", "server/1", "server/2"]
    together = _work(site, True).losses(params, slots=slots, split="train")
    alone = [_work(site, False).loss(p, slot=s, split="train") for p, s in zip(params, slots, strict=True)]
    assert together == pytest.approx(alone, rel=1e-5)


def test_without_one_pass_train_many_is_train_in_turn_to_the_bit(site):
    params, slots = _copies(2), ["server/0", "server/1"]
    many = _work(site, False).train_many(params, slots=slots)
    turn = [_work(site, False).train(p, slot=s) for p, s in zip(params, slots, strict=True)]
    for a, b in zip(many, turn, strict=True):
        assert all(torch.equal(a.params[n], b.params[n]) for n in a.params)


def _fed(one_pass: bool, **extra):
    d = tiny_dict(training={"one_pass": one_pass})
    d.update(extra)
    return federation_from_dict(d, source="tiny.toml")


def test_a_federation_with_one_pass_runs_and_resumes_to_the_bit(tmp_path):
    straight = run(_fed(True), run_dir=tmp_path / "a")
    run(_fed(True), run_dir=tmp_path / "b", stop_after=2)
    resumed = run(_fed(True), run_dir=tmp_path / "b", resume=True)
    for x, y in zip(straight.models, resumed.models, strict=True):
        assert all(torch.equal(x[n], y[n]) for n in x)
    sequential = run(_fed(False), run_dir=tmp_path / "c")  # another data order per copy: another run, a similar score
    assert straight.summary["summary"]["mean"] == pytest.approx(sequential.summary["summary"]["mean"], abs=0.2)
    assert _fed(True).digest() != _fed(False).digest()


def test_one_pass_refuses_networks_with_running_statistics(tmp_path):
    cfg = _fed(True, model={"name": "classifier", "params": {"channels": [4, 8], "strides": [2, 2], "norm": "BATCH"}})
    with pytest.raises(ConfigError, match=r"one_pass needs a network without buffers.*'classifier'"):
        run(cfg, run_dir=tmp_path / "r")


def test_one_pass_refuses_dp_sites(tmp_path):
    cfg = _fed(True, privacy={"epsilon": 8.0})
    with pytest.raises(ConfigError, match=r"one_pass cannot be used when a site trains with DP"):
        run(cfg, run_dir=tmp_path / "r")


def test_training_config_default_is_sequential():
    assert dataclasses.replace(TrainingConfig()).one_pass is False

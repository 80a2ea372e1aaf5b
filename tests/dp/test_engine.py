"""DP local training: differs from plain SGD, deterministic, both clipping modes, small sites, prox, the ledger."""

from __future__ import annotations

import pytest
import torch

from fedfew_med.algorithms import Prox
from fedfew_med.dp import (
    DPSiteWork,
    PerSampleLoss,
    PrivacyBudgetExhausted,
    PrivacyLedger,
    PrivacyOptions,
    dp_train,
    resolve_grad_sample_mode,
)
from fedfew_med.models import build_model
from tests.dp.conftest import tiny_net, tiny_site


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # five trainings: several seconds on 2 cores
def test_dp_training_differs_from_plain_sgd_and_is_deterministic(dp_work):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    work = dp_work()
    a = work.train(work.initial_params, slot="server/0")
    b = dp_work().train(work.initial_params, slot="server/0")
    plain = dp_work(plain=True).train(work.initial_params, slot="server/0")
    assert _same(a.params, b.params) and a.loss == b.loss  # same (seed, round, site, slot): bit-exact
    assert not _same(a.params, plain.params)
    assert not _same(a.params, work.initial_params)
    assert torch.equal(torch.random.get_rng_state(), before)  # no global RNG
    other_round = dp_work(round_idx=1).train(work.initial_params, slot="server/0")
    other_slot = dp_work().train(work.initial_params, slot="server/1")
    assert not _same(a.params, other_round.params) and not _same(a.params, other_slot.params)
    assert work.initial_params.keys() == a.params.keys()


def test_train_charges_the_ledger_exactly_and_reports_a_data_independent_count(dp_work):
    work = dp_work(n=20, batch_size=8, epochs=2)  # S = 3 steps per epoch, q = 1/3
    result = work.train(work.initial_params, slot="server/0")
    assert (result.steps, result.samples) == (6, 40)
    (sgd, loss) = work.ledger.history
    assert (sgd.kind, sgd.noise_multiplier, sgd.sample_rate, sgd.steps, sgd.label) == (
        "dp-sgd", work.calibration.noise_multiplier, 1 / 3, 6, "server/0")
    assert (loss.kind, loss.sample_rate, loss.steps) == ("loss", 1.0, 1)
    work.loss(work.initial_params, slot="server/1")
    assert work.ledger.history[-1].label == "server/1:train" and work.ledger.total_steps("loss") == 2
    assert 0.0 <= result.loss <= work.options.loss_clip


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_both_clipping_modes_train(dp_work, mode):
    """Tiny noise and ε large: a few epochs of DP-SGD must lower the training loss."""
    opts = PrivacyOptions(epsilon=1e4, grad_sample_mode=mode, max_grad_norm=5.0, loss_noise_multiplier=1e3)
    work = dp_work(n=32, batch_size=8, epochs=4, lr=0.3, options=opts, rounds=1)
    plain = dp_work(n=32, plain=True)
    start = plain.loss(work.initial_params, slot="s")
    trained = work.train(work.initial_params, slot="s")
    assert plain.loss(trained.params, slot="s") < start - 0.02


def test_hooks_and_ghost_clip_the_same_sum():
    """With σ ≈ 0 both modes compute the same clipped mean gradient (up to float rounding)."""
    site = tiny_site(16)
    out = {}
    for mode in ("hooks", "ghost"):
        net = tiny_net()
        dp_train(net, site.splits["train"], loss_fn=PerSampleLoss("classification"), epochs=1, sample_rate=0.5, steps_per_epoch=2,
                 noise_multiplier=1e-9, max_grad_norm=0.01, lr=1.0, grad_sample_mode=mode,
                 sampling_generator=torch.Generator().manual_seed(0), noise_generator=torch.Generator().manual_seed(1))
        out[mode] = dict(net.named_parameters())
    for k in out["hooks"]:
        torch.testing.assert_close(out["hooks"][k], out["ghost"][k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_physical_batches_give_the_same_update_as_whole_batches(mode):
    site = tiny_site(24)
    out = {}
    for physical in (0, 3):
        net = tiny_net()
        dp_train(net, site.splits["train"], loss_fn=PerSampleLoss("classification"), epochs=1, sample_rate=0.5, steps_per_epoch=2,
                 noise_multiplier=1.0, max_grad_norm=1.0, lr=0.5, physical_batch_size=physical, grad_sample_mode=mode,
                 sampling_generator=torch.Generator().manual_seed(0), noise_generator=torch.Generator().manual_seed(1))
        out[physical] = {k: v.detach().clone() for k, v in net.named_parameters()}
    for k in out[0]:
        torch.testing.assert_close(out[0][k], out[3][k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_empty_poisson_batches_on_a_three_record_site_are_stepped_with_noise(mode):
    site = tiny_site(3)
    net, before = tiny_net(), None
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    stats = None
    for seed in range(20):  # P(empty) = (2/3)^3 per step with q = 1/3: some of 3 × 20 steps are empty
        stats = dp_train(net, site.splits["train"], loss_fn=PerSampleLoss("classification"), epochs=1, sample_rate=1 / 3,
                         steps_per_epoch=3, noise_multiplier=1.0, max_grad_norm=1.0, lr=0.1, grad_sample_mode=mode,
                         sampling_generator=torch.Generator().manual_seed(seed), noise_generator=torch.Generator().manual_seed(seed))
        if stats.empty_batches:
            break
    assert stats is not None and stats.empty_batches > 0 and stats.steps == 3
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert not _same(before, dict(net.named_parameters()))


def test_a_three_record_site_trains_through_dpsitework(dp_work):
    work = dp_work(n=3, batch_size=1, epochs=3)  # q = 1/3
    result = work.train(work.initial_params, slot="server/0")
    assert result.steps == 9 and all(torch.isfinite(t).all() for t in result.params.values())


def test_prox_gradient_is_added_after_clipping_and_noise(dp_work):
    """σ tiny, clip tiny: the data gradient is ≈ 0, so the step is the proximal pull alone."""
    opts = PrivacyOptions(epsilon=1e4, max_grad_norm=1e-6, loss_noise_multiplier=1e3)
    work = dp_work(lr=0.001, options=opts, rounds=1)
    params = work.initial_params
    centre = {k: v + 1.0 for k, v in params.items()}
    pulled = work.train(params, slot="a", prox=Prox(center=centre, strength=100.0))
    # 3 steps of lr 1e-3 on strength·(θ − c) = −100: θ moves by ≈ +0.1·3·(1 − small) toward the centre
    for k in params:
        moved = pulled.params[k] - params[k]
        assert float(moved.mean()) == pytest.approx(0.3 - 0.03 + 0.001, rel=0.05)


def test_budget_exhaustion_is_raised_before_any_data_is_touched(dp_work):
    opts = PrivacyOptions(epsilon=2.0)
    ledger = PrivacyLedger(delta=opts.delta, target_epsilon=opts.epsilon, name="x")
    work = dp_work(options=opts, ledger=ledger, rounds=2)
    work.train(work.initial_params, slot="server/0")
    work.train(work.initial_params, slot="server/0")  # the two planned rounds
    assert ledger.epsilon() <= 2.0
    before = {k: v.clone() for k, v in work.network.state_dict().items()}
    entries = len(ledger)
    with pytest.raises(PrivacyBudgetExhausted):
        work.train({k: v + 1 for k, v in work.initial_params.items()}, slot="server/0")
    assert _same(before, work.network.state_dict()) and len(ledger) == entries  # nothing loaded, nothing recorded
    with pytest.raises(PrivacyBudgetExhausted):
        for _ in range(1000):  # loss releases are cheap, but not free
            work.loss(work.initial_params, slot="server/0")
    assert ledger.epsilon() <= 2.0
    assert len([m for m in ledger.history if m.kind == "dp-sgd"]) == 2


def test_a_network_with_batchnorm_is_refused(dp_work):
    work = dp_work()
    bad = build_model("resnet18", {}, task="classification", in_channels=1, num_classes=2, spatial_dims=2, image_size=16, seed=0)
    with pytest.raises(ValueError, match="not DP-ready"):
        DPSiteWork(data=work.data, network=bad, initial_buffers={}, state=work.site_state, training=work.training, seed=0,
                   round_idx=0, options=work.options, calibration=work.calibration, ledger=work.ledger)


def test_auto_mode_is_static_per_architecture():
    assert resolve_grad_sample_mode("auto", tiny_net()) == "hooks"
    assert resolve_grad_sample_mode("auto", torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))) == "ghost"
    assert resolve_grad_sample_mode("ghost", tiny_net()) == "ghost"
    with pytest.raises(ValueError):
        resolve_grad_sample_mode("functorch", tiny_net())

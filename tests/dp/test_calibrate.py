"""Calibration over the whole run, and the round plan read off the algorithms."""

from __future__ import annotations

import pytest

from fedfew_med.algorithms import RoundInfo, build_algorithm
from fedfew_med.dp import (
    CalibrationError,
    Mechanism,
    PrivacyLedger,
    PrivacyOptions,
    RoundUsage,
    calibrate,
    calibrate_site,
    epsilon_of,
    poisson_plan,
    probe_round,
)
from tests.dp import rdp_reference as ref


@pytest.mark.parametrize(
    "n, batch, expected",
    [(200, 32, (1 / 7, 7)), (64, 32, (0.5, 2)), (3, 8, (1.0, 1)), (33, 32, (0.5, 2)), (1, 1, (1.0, 1))],
)
def test_poisson_plan_follows_the_dp_data_loader_convention(n, batch, expected):
    assert poisson_plan(n, batch) == expected


# (options, sample_rate, steps_per_round, rounds, loss_releases_per_round)
PLANS = [
    (PrivacyOptions(epsilon=8.0, delta=1e-5), 1 / 7, 21, 15, 3),  # demo-like: K = 3, E = 1, 200 records, batch 32
    (PrivacyOptions(epsilon=1.0, delta=1e-5), 1 / 7, 21, 15, 3),
    (PrivacyOptions(epsilon=3.0, delta=1e-6, loss_noise_multiplier=60.0), 1 / 4, 8, 20, 2),
    (PrivacyOptions(epsilon=8.0, delta=1e-5), 0.02, 50, 10, 0),  # no loss channel: Opacus' get_noise_multiplier
    pytest.param(PrivacyOptions(epsilon=4.0, delta=1e-5, accountant="prv"), 1 / 7, 21, 10, 3, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("options, q, steps, rounds, releases", PLANS)
def test_calibrated_run_spends_at_most_the_target_and_close_to_it(options, q, steps, rounds, releases):
    cal = calibrate(options, sample_rate=q, steps_per_round=steps, rounds=rounds, loss_releases_per_round=releases)
    assert cal.epsilon <= options.epsilon
    assert cal.epsilon >= 0.97 * options.epsilon  # within a few % of the target (no wasted budget)
    # replaying the plan round by round in a ledger gives the same ε, and every round is affordable
    led = PrivacyLedger(delta=options.delta, accountant=options.accountant, target_epsilon=options.epsilon)
    for r in range(rounds):
        assert led.can_afford(cal.round_mechanisms(r))
        led.spend(cal.round_mechanisms(r))
    assert led.epsilon() == pytest.approx(cal.epsilon, rel=1e-12)
    assert not led.can_afford(cal.round_mechanisms(rounds))  # one round more would exceed the budget
    if options.accountant == "rdp":  # and the independent RDP computation agrees that it is within the budget (+1%)
        history = [(cal.noise_multiplier, q, rounds * steps)] + ([(cal.loss_noise_multiplier, 1.0, rounds * releases)] if releases else [])
        assert ref.epsilon(history, options.delta) <= options.epsilon * 1.01


def test_auto_loss_noise_spends_the_configured_share_alone():
    o = PrivacyOptions(epsilon=8.0, delta=1e-5, loss_budget_share=0.25)
    cal = calibrate(o, sample_rate=1 / 7, steps_per_round=21, rounds=15, loss_releases_per_round=3)
    alone = epsilon_of([(cal.loss_noise_multiplier, 1.0, 45)], delta=1e-5, accountant="rdp")
    assert 0.97 * 2.0 <= alone <= 2.0


def test_more_rounds_need_more_noise_and_a_loss_channel_costs_budget():
    o = PrivacyOptions(epsilon=4.0)
    sig = [calibrate(o, sample_rate=0.1, steps_per_round=10, rounds=r, loss_releases_per_round=1).noise_multiplier for r in (5, 20, 80)]
    assert sig[0] < sig[1] < sig[2]
    without = calibrate(o, sample_rate=0.1, steps_per_round=10, rounds=20, loss_releases_per_round=0).noise_multiplier
    assert without < sig[1]


def test_a_loss_channel_that_alone_exceeds_the_budget_is_refused():
    o = PrivacyOptions(epsilon=1.0, loss_noise_multiplier=2.0)
    with pytest.raises(CalibrationError, match="loss channel alone spends"):
        calibrate(o, sample_rate=0.1, steps_per_round=10, rounds=30, loss_releases_per_round=3)


def _info(sites=("a", "b"), mu=0.01):
    return RoundInfo(round=0, num_rounds=5, participants=tuple(sites), site_weight={s: 1 / len(sites) for s in sites}, extras={"mu": mu})


@pytest.mark.parametrize(
    "name, params, expected",
    [
        ("fedfew", {"k": 3, "mu": 0.01, "loss_source": "train"}, RoundUsage((2, 2, 2), 0)),
        ("fedfew", {"k": 2, "mu": 0.01, "loss_source": "received"}, RoundUsage((2, 2), 2)),
        ("fedavg", {}, RoundUsage((2,), 0)),
        ("fedprox", {"mu_prox": 0.1}, RoundUsage((2,), 0)),
        ("ditto", {"lam": 0.1}, RoundUsage((2, 2), 0)),
        ("ifca", {"k": 3}, RoundUsage((2,), 3)),
        ("local", {}, RoundUsage((2,), 0)),
    ],
)
def test_probe_round_counts_what_each_algorithm_asks_of_a_site(name, params, expected):
    alg = build_algorithm(name, params, seed=0)
    import torch

    init = {"w": torch.zeros(3)}
    models = {k: dict(init) for k in range(alg.num_models)}
    alg.init_models(lambda i: {"w": torch.zeros(3)})  # Local keeps a copy of the initial model
    usage = probe_round(alg, "a", _info(), models, num_samples=50, local_epochs=2)
    assert usage == expected
    assert usage.loss_releases == len(expected.train_epochs) + expected.loss_calls


def test_calibrate_site_uses_the_probed_plan():
    o = PrivacyOptions(epsilon=8.0)
    cal = calibrate_site(o, num_samples=200, batch_size=32, rounds=15, usage=RoundUsage((1, 1, 1), 0))
    assert (cal.sample_rate, cal.steps_per_epoch, cal.steps_per_round, cal.loss_releases_per_round) == (1 / 7, 7, 21, 3)
    assert cal.round_mechanisms(4) == [
        Mechanism(cal.noise_multiplier, 1 / 7, 21, kind="dp-sgd", round=4, label="plan"),
        Mechanism(cal.loss_noise_multiplier, 1.0, 3, kind="loss", round=4, label="plan"),
    ]


def test_a_fixed_noise_multiplier_is_kept_and_its_plan_may_exceed_the_budget():
    o = PrivacyOptions(epsilon=3.0, noise_multiplier=2.0)
    cal = calibrate(o, sample_rate=0.5, steps_per_round=4, rounds=3, loss_releases_per_round=2)
    assert cal.noise_multiplier == 2.0
    expected = epsilon_of([(2.0, 0.5, 12), (cal.loss_noise_multiplier, 1.0, 6)], delta=o.delta, accountant="rdp")
    assert cal.epsilon == pytest.approx(expected, rel=1e-12) and cal.epsilon > 3.0  # the ledger stops the site in time
    led = PrivacyLedger(delta=o.delta, target_epsilon=o.epsilon)
    rounds = 0
    while led.can_afford(cal.round_mechanisms(rounds)):
        led.spend(cal.round_mechanisms(rounds))
        rounds += 1
    assert rounds == 1 and led.epsilon() <= 3.0

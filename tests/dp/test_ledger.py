"""The ledger: ε against Opacus and an independent RDP computation, persistence, budget checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.rdp import _compute_rdp, compute_rdp

from fedfew_med.dp import LedgerStateError, Mechanism, PrivacyBudgetExhausted, PrivacyLedger
from fedfew_med.dp.ledger import RDP_ORDERS
from tests.dp import rdp_reference as ref

DELTA = 1e-5

# (history [(σ, q, steps)], what it stands for)
CASES = [
    ([(1.0, 0.01, 1000)], "DP-SGD, small q"),
    ([(1.1, 1 / 7, 105)], "one site: 15 rounds × K=1 × 7 steps"),
    ([(1.1, 1 / 7, 105), (20.0, 1.0, 45)], "DP-SGD + loss channel (K=3 × 15 rounds)"),
    ([(2.0, 1 / 4, 180), (35.0, 1.0, 30)], "DP-SGD + loss channel, coarser sampling"),
    ([(1.3, 1 / 3, 30), (8.0, 1.0, 6)], "small site, two mechanisms"),
    ([(5.0, 1.0, 10)], "full-batch Gaussian"),
]


def _ledger(history, accountant="rdp", target=None):
    led = PrivacyLedger(delta=DELTA, accountant=accountant, target_epsilon=target, name="a")
    for r, (sigma, q, steps) in enumerate(history):
        led.record([Mechanism(sigma, q, steps, kind="loss" if q == 1.0 else "dp-sgd", round=r)])
    return led


@pytest.mark.parametrize("history, what", CASES, ids=[c[1] for c in CASES])
@pytest.mark.filterwarnings("ignore:Optimal order:UserWarning")
def test_epsilon_equals_opacus_accountant_fed_step_by_step(history, what):
    acc = RDPAccountant()
    for sigma, q, steps in history:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    assert _ledger(history).epsilon() == pytest.approx(acc.get_epsilon(DELTA, alphas=list(RDP_ORDERS)), rel=1e-12)
    assert _ledger(history).epsilon() <= acc.get_epsilon(DELTA)  # more orders than Opacus' default grid: never looser


@pytest.mark.parametrize("history, what", CASES, ids=[c[1] for c in CASES])
def test_epsilon_matches_independent_rdp_within_one_percent(history, what):
    """The reference uses integer orders only (Opacus also has fractional ones, so it can only be tighter)."""
    mine = _ledger(history).epsilon()
    theirs = ref.epsilon(history, DELTA)
    assert mine <= theirs * (1 + 1e-9)
    assert mine == pytest.approx(theirs, rel=0.01)


@pytest.mark.parametrize("q, sigma", [(0.01, 1.0), (1 / 7, 1.1), (0.25, 0.9), (1.0, 3.0)])
def test_opacus_rdp_equals_reference_at_integer_orders(q, sigma):
    orders = [2, 3, 5, 8, 16, 32, 63]
    opacus = compute_rdp(q=q, noise_multiplier=sigma, steps=7, orders=orders)
    mine = [7 * ref.sgm_rdp(q, sigma, a) for a in orders]
    np.testing.assert_allclose(opacus, mine, rtol=1e-9)


@pytest.mark.parametrize("q, sigma, alpha", [(0.01, 1.0, 2.5), (0.1, 0.8, 4.7), (1 / 7, 1.1, 8.3), (0.3, 2.0, 1.5)])
def test_opacus_fractional_rdp_equals_numerical_integration(q, sigma, alpha):
    assert _compute_rdp(q, sigma, alpha) == pytest.approx(ref.sgm_rdp_numeric(q, sigma, alpha), rel=1e-7)


def test_composition_is_more_than_either_part_and_order_free():
    dpsgd, loss = (1.1, 1 / 7, 105), (20.0, 1.0, 45)
    both = _ledger([dpsgd, loss]).epsilon()
    assert both > _ledger([dpsgd]).epsilon() and both > _ledger([loss]).epsilon()
    assert _ledger([loss, dpsgd]).epsilon() == both  # same grouped history, same float
    split = PrivacyLedger(delta=DELTA)
    for _ in range(15):  # recorded round by round, interleaved
        split.record([Mechanism(1.1, 1 / 7, 7), Mechanism(20.0, 1.0, 3, kind="loss")])
    assert split.epsilon() == both and split.opacus_history() == [(1.1, 1 / 7, 105), (20.0, 1.0, 45)]


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:Optimal order:UserWarning")
def test_prv_ledger_is_close_to_prv_accountant_and_below_rdp():
    history = [(1.1, 1 / 7, 105), (20.0, 1.0, 45)]
    acc = PRVAccountant()
    acc.history = list(history)
    led = _ledger(history, accountant="prv")
    assert led.epsilon() == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
    assert led.epsilon() < _ledger(history).epsilon()  # PRV is the tighter accountant


def test_state_dict_is_json_and_round_trips_exactly():
    led = _ledger(CASES[2][0])
    state = json.loads(json.dumps(led.state_dict()))
    back = PrivacyLedger.from_state_dict(state)
    assert back.epsilon() == led.epsilon() and back.history == led.history and back.digest() == led.digest()
    assert state["opacus"] == {"mechanism": "rdp", "history": [[1.1, 1 / 7, 105], [20.0, 1.0, 45]]}


def test_restored_ledger_continues_exactly_like_an_uninterrupted_one():
    def round_(r):
        return [Mechanism(1.1, 1 / 7, 21, round=r, label="server/0"), Mechanism(20.0, 1.0, 3, kind="loss", round=r)]

    straight = PrivacyLedger(delta=DELTA, target_epsilon=50.0)
    for r in range(6):
        straight.spend(round_(r))
    first = PrivacyLedger(delta=DELTA, target_epsilon=50.0)
    for r in range(3):
        first.spend(round_(r))
    blob = json.dumps(first.state_dict())  # what the checkpoint stores
    resumed = PrivacyLedger(delta=DELTA, target_epsilon=50.0)
    resumed.load_state_dict(json.loads(blob))
    assert resumed.epsilon() == first.epsilon() > 0  # a restart does not reset spent ε
    for r in range(3, 6):
        resumed.spend(round_(r))
    assert resumed.epsilon() == straight.epsilon() and resumed.digest() == straight.digest()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s["history"].pop(), "digest does not match"),
        (lambda s: s["history"][0].update(steps=1), "digest does not match"),
        (lambda s: s.update(accountant="prv"), "accountant 'prv'"),
        (lambda s: s.update(delta=1e-6), "δ = 1e-06"),
        (lambda s: s.update(target_epsilon=100.0), "target ε = 100.0"),
        (lambda s: s.update(version=0), "version"),
    ],
)
def test_edited_or_foreign_state_is_refused(edit, message):
    state = _ledger(CASES[2][0], target=50.0).state_dict()
    edit(state)
    with pytest.raises(LedgerStateError, match=message.replace("(", r"\(")):
        PrivacyLedger(delta=DELTA, target_epsilon=50.0, name="a").load_state_dict(state)


def test_can_afford_refuses_the_round_that_would_exceed_the_budget():
    per_round = [Mechanism(1.0, 0.1, 10), Mechanism(10.0, 1.0, 1, kind="loss")]
    led = PrivacyLedger(delta=DELTA, target_epsilon=6.0)
    rounds = 0
    while led.can_afford(per_round):
        assert led.epsilon_after(per_round) <= 6.0
        led.spend(per_round)
        rounds += 1
    assert rounds == 5 and led.epsilon() <= 6.0 < led.epsilon_after(per_round)
    before = (len(led), led.epsilon())
    with pytest.raises(PrivacyBudgetExhausted, match="target is ε = 6"):
        led.spend(per_round)
    assert (len(led), led.epsilon()) == before  # nothing recorded
    assert led.can_afford([]) and led.remaining_epsilon == pytest.approx(6.0 - led.epsilon())


def test_can_afford_leaves_the_ledger_unchanged_and_no_target_means_record_only():
    led = _ledger(CASES[0][0])
    eps, digest = led.epsilon(), led.digest()
    assert led.can_afford([Mechanism(0.1, 1.0, 1000)])  # no target
    assert (led.epsilon(), led.digest()) == (eps, digest)


@pytest.mark.parametrize("bad", [dict(noise_multiplier=0.0), dict(noise_multiplier=math.inf), dict(sample_rate=0.0),
                                 dict(sample_rate=1.5), dict(steps=0), dict(steps=2.0)])
def test_mechanism_rejects_values_that_would_make_epsilon_meaningless(bad):
    with pytest.raises(ValueError):
        Mechanism(**{"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 1, **bad})


def test_empty_ledger_spends_nothing():
    assert PrivacyLedger(delta=DELTA, accountant="prv").epsilon() == 0.0

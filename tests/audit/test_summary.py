"""The report's plain-words opening: rounds left against a brute-force count, sentences for each case, 3 digits."""

from __future__ import annotations

import pytest

from fedfew_med.audit.summary import MAX_FORECAST, plain_summary, rounds_left, sig3
from fedfew_med.dp.ledger import Mechanism, PrivacyLedger


def _round(r: int) -> list[Mechanism]:
    return [Mechanism(1.1, 0.05, 40, kind="dp-sgd", round=r), Mechanism(5.0, 1.0, 1, kind="loss", round=r)]


def _ledger(rounds: int, target: float | None) -> PrivacyLedger:
    ledger = PrivacyLedger(delta=1e-5, accountant="rdp", target_epsilon=target)
    for r in range(rounds):
        ledger.record(_round(r))
    return ledger


@pytest.mark.parametrize(("rounds", "target"), [(3, 8.0), (3, 3.0), (1, 20.0)])
def test_rounds_left_equals_a_round_by_round_count(rounds, target):
    ledger = _ledger(rounds, target)
    brute, trial = 0, ledger.copy()
    while brute < 500:  # one more round at a time, each checked by the accountant
        nxt = _round(rounds + brute)
        if not trial.can_afford(nxt):
            break
        trial.record(nxt)
        brute += 1
    assert rounds_left(ledger.state_dict()) == brute


def test_rounds_left_without_a_target_or_history_and_at_the_cap():
    assert rounds_left(_ledger(2, None).state_dict()) is None
    assert rounds_left(_ledger(0, 8.0).state_dict()) is None
    tiny = PrivacyLedger(delta=1e-5, accountant="rdp", target_epsilon=1e6)
    tiny.record([Mechanism(50.0, 0.001, 1, kind="dp-sgd", round=0)])
    assert rounds_left(tiny.state_dict()) == MAX_FORECAST


@pytest.mark.parametrize(("x", "text"), [(2.41234, "2.41"), (8.0, "8"), (1e-05, "1.00e-05"), (0.5, "0.5"), (1234.5, "1.23e+03"), (0.0, "0")])
def test_three_significant_digits(x, text):
    assert sig3(x) == text


def _report(**extra):
    base = {"run": {"rounds": 20, "sites": ["a", "b", "c"]},
            "privacy": {"sites": {"a": {"epsilon": 2.41234, "target_epsilon": 8.0, "delta": 1e-5, "rounds_left": 37, "stopped": False},
                                  "b": {"epsilon": 3.0, "target_epsilon": 3.0, "delta": 1e-5, "rounds_left": 0, "stopped": True}},
                        "server": None}}
    return {**base, **extra}


def test_plain_summary_speaks_of_each_site_budget_records_and_the_attack():
    attack = {"run": {"a": {"auc": 0.52, "auc_ci": [0.46, 0.58]}, "b": {"auc": 0.49, "auc_ci": [0.44, 0.55]}},
              "baseline": {"a": {"auc": 0.55, "auc_ci": [0.49, 0.61]}, "b": {"auc": 0.5, "auc_ci": [0.45, 0.56]}}, "checks": {}}
    lines = plain_summary(_report(attack=attack, policy={"compliant": True}))
    text = " ".join(lines)
    assert "Site a spent ε = 2.41 of its budget ε = 8 (δ = 1.00e-05) over 20 rounds; its budget allows 37 more rounds like its last one." in lines
    assert "Site b spent ε = 3 of its budget ε = 3" in text and "stopped training" in text
    assert "Without differential privacy: c." in text
    assert "per record" in text and "not per patient" in text and "k times" in text
    assert "no server-side DP" in text and "complies" in text
    assert "could not tell" in text and "inconclusive, not a proof" in text and "too weak on this data" in text


def test_plain_summary_when_the_attack_succeeds_and_without_dp():
    attack = {"run": {"a": {"auc": 0.71, "auc_ci": [0.65, 0.77]}}, "checks": {"a": {"consistent": False}}}
    text = " ".join(plain_summary(_report(attack=attack)))
    assert "did better than guessing on a" in text and "not private until explained" in text
    none = plain_summary({"run": {"rounds": 3, "sites": ["a"]}, "privacy": {"sites": {}}})
    assert none[0].startswith("No site trained with differential privacy")

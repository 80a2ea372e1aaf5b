"""The privacy policy: loading (errors name file, key, expectation, value), checks, and refusal before training."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedfew_med import cli
from fedfew_med.config import federation_from_dict
from fedfew_med.data import build_sites
from fedfew_med.privacy import (
    PolicyError,
    PolicyViolation,
    PrivacyPolicy,
    check_config,
    check_deployment,
    enforce,
    load_policy,
)
from fedfew_med.privacy.policy import RULES, policy_from_dict
from tests.conftest import tiny_dict

REPO_POLICY = Path(__file__).resolve().parents[2] / "privacy" / "policy.toml"
DATA = {"num_sites": 3, "image_size": 16, "train_min": 24, "train_max": 24, "test_per_site": 12, "seed": 1}


def _config(privacy=None):
    d = tiny_dict(data={"name": "synthetic", "params": DATA})
    if privacy is not None:
        d["privacy"] = privacy
    config = federation_from_dict(d, source="fed.toml")
    return config, build_sites(config.data)


def test_the_repository_policy_loads_into_a_frozen_dataclass():
    policy = load_policy(REPO_POLICY)
    assert (policy.dp_mandatory, policy.max_epsilon, policy.max_delta) == (True, 8.0, 1e-5)
    assert policy.private_loss_channel and policy.require_tls and policy.require_authenticated_sites
    assert policy.source == str(REPO_POLICY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_epsilon = 100.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[policy]\nmax_epsilon = -1\n", ["p.toml", "[policy].max_epsilon", "be > 0", "-1"]),
        ("[policy]\nmax_delta = 2.0\n", ["p.toml", "[policy].max_delta", "be in (0, 1)", "2.0"]),
        ("[policy]\ndp_mandatory = 'yes'\n", ["p.toml", "[policy].dp_mandatory", "true or false", "'yes'"]),
        ("[policy]\nmax_eps = 3\n", ["p.toml", "[policy]", "unknown key 'max_eps'", "max_epsilon"]),
        ("[sites.a]\nmax_epsilon = 1\n", ["p.toml", "[policy] is required"]),
        ("[policy]\n[sites.a]\nmax_delta = 0\n", ["p.toml", "[sites.a].max_delta", "be in (0, 1)", "0"]),
        ("[policy\n", ["p.toml", "not valid TOML"]),
    ],
)
def test_policy_errors_name_file_key_expectation_and_value(tmp_path, text, expected):
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(PolicyError) as exc:
        load_policy(path)
    for part in expected:
        assert part in str(exc.value)


def test_a_site_limit_is_stricter_than_the_policy():
    policy = policy_from_dict({"policy": {"max_epsilon": 8.0}, "sites": {"site01-dark": {"max_epsilon": 3.0}}})
    assert policy.epsilon_limit("site01-dark") == 3.0 and policy.epsilon_limit("other") == 8.0
    assert policy.delta_limit("x", 1000) == 1e-5 and policy.delta_limit("x", 10) == 1e-5
    loose = policy_from_dict({"policy": {"max_delta": 0.5}})
    assert loose.delta_limit("x", 10) == pytest.approx(0.1)


def test_a_compliant_federation_passes_every_rule():
    config, sites = _config({"epsilon": 8.0, "delta": 1e-5})
    verdicts = enforce(PrivacyPolicy(), config, sites)
    assert {(v.site, v.rule) for v in verdicts} == {(s.name, r) for s in sites for r in RULES[:5]}
    assert all(v.ok for v in verdicts)


def test_one_site_over_budget_is_named_with_its_rule():
    config, sites = _config({"epsilon": 8.0, "sites": {"site01-dark": {"epsilon": 20.0}}})
    with pytest.raises(PolicyViolation) as exc:
        enforce(PrivacyPolicy(), config, sites)
    msg = str(exc.value)
    assert "site 'site01-dark' breaks rule max_epsilon: required ε <= 8, has target ε = 20" in msg
    assert "site00-bright" not in msg and "site02-noisy" not in msg
    assert [(v.site, v.rule) for v in exc.value.verdicts] == [("site01-dark", "max_epsilon")]


def test_delta_above_one_over_records_breaks_its_rule_only():
    config, sites = _config({"epsilon": 8.0, "delta": 0.1})  # 24 records: 1/24 < 0.1
    policy = policy_from_dict({"policy": {"max_delta": 0.5}})
    broken = [v for v in check_config(policy, config, sites) if v.ok is False]
    assert {v.rule for v in broken} == {"delta_at_most_inverse_records"} and len(broken) == 3
    assert broken[0].required == "δ <= 1/24 = 0.0416667"


def test_without_dp_the_mandatory_and_loss_channel_rules_break():
    config, sites = _config()
    broken = {(v.site, v.rule) for v in check_config(PrivacyPolicy(), config, sites) if v.ok is False}
    assert ("site00-bright", "dp_mandatory") in broken and ("site00-bright", "private_loss_channel") in broken
    lax = PrivacyPolicy(dp_mandatory=False, private_loss_channel=False)
    by_rule = {(v.site, v.rule): v.ok for v in check_config(lax, config, sites)}
    assert by_rule[("site00-bright", "dp_mandatory")] is None and by_rule[("site00-bright", "private_loss_channel")] is None


def test_deployment_rules():
    policy = PrivacyPolicy()
    assert [v.ok for v in check_deployment(policy, tls=True, authenticated=False)] == [True, False]
    assert [v.ok for v in check_deployment(policy, tls=None, authenticated=None)] == [None, None]
    assert [v.ok for v in check_deployment(PrivacyPolicy(require_tls=False), tls=False, authenticated=True)] == [None, True]


FED_TOML = """
[run]
name = "tiny"
seed = 3
rounds = 1
[algorithm]
name = "fedfew"
[algorithm.params]
k = 2
[training]
batch_size = 16
[model]
name = "classifier"
[model.params]
channels = [4, 8]
strides = [2, 2]
[data]
name = "synthetic"
[data.params]
num_sites = 3
image_size = 16
train_min = 24
train_max = 24
test_per_site = 12
seed = 1
[privacy]
epsilon = 8.0
[privacy.sites."site02-noisy"]
epsilon = 50.0
"""


def test_simulate_refuses_before_any_training(tmp_path, monkeypatch, capsys):
    fed = tmp_path / "fed.toml"
    fed.write_text(FED_TOML)

    def no_run(*args, **kwargs):
        raise AssertionError("the run started although the policy is broken")

    monkeypatch.setattr(cli, "run", no_run)
    out = tmp_path / "run"
    code = cli.main(["simulate", str(fed), "--policy", str(REPO_POLICY), "-o", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert "site 'site02-noisy' breaks rule max_epsilon: required ε <= 8, has target ε = 50" in err
    assert "nothing was trained" in err and str(REPO_POLICY) in err
    assert not out.exists()

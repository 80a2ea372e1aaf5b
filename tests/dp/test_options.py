"""PrivacyOptions: validated from a raw [privacy] table with messages that name key, rule and value."""

from __future__ import annotations

import pytest

from fedfew_med.config import ConfigError
from fedfew_med.dp import PrivacyOptions

WHERE = "sites.toml: [site.a.privacy]"


def test_defaults_and_full_table():
    o = PrivacyOptions.from_table({}, where=WHERE)
    assert (o.enabled, o.accountant, o.grad_sample_mode, o.physical_batch_size, o.loss_clip) == (True, "rdp", "auto", 0, 3.0)
    full = {"enabled": True, "epsilon": 3, "delta": 1e-6, "max_grad_norm": 0.5, "accountant": "prv", "grad_sample_mode": "ghost",
            "physical_batch_size": 16, "loss_noise_multiplier": 20.0, "loss_clip": 2.0, "loss_budget_share": 0.2,
            "noise_multiplier": 1.5}
    o = PrivacyOptions.from_table(full, where=WHERE)
    assert o.epsilon == 3.0 and isinstance(o.epsilon, float) and o.to_dict() == {**full, "epsilon": 3.0}


@pytest.mark.parametrize(
    "table, message",
    [
        ({"epsilon": 0}, "[site.a.privacy].epsilon must be > 0, got 0"),
        ({"delta": 1.0}, "delta must be in (0, 1), got 1.0"),
        ({"max_grad_norm": -1.0}, "max_grad_norm must be > 0"),
        ({"accountant": "gdp"}, "accountant must be one of 'rdp', 'prv', got 'gdp'"),
        ({"grad_sample_mode": "functorch"}, "grad_sample_mode must be one of 'auto', 'hooks', 'ghost'"),
        ({"physical_batch_size": -2}, "physical_batch_size must be an integer >= 0 (0 = no limit), got -2"),
        ({"noise_multiplier": -1.0}, "noise_multiplier must be >= 0 (0 = calibrated for the whole run), got -1.0"),
        ({"physical_batch_size": 1.5}, "physical_batch_size must be an integer"),
        ({"loss_noise_multiplier": -1.0}, "loss_noise_multiplier must be >= 0"),
        ({"loss_clip": 0}, "loss_clip must be > 0"),
        ({"loss_budget_share": 1.0}, "loss_budget_share must be in (0, 1)"),
        ({"enabled": "yes"}, "enabled must be true or false"),
        ({"epsilom": 1.0}, "unknown key 'epsilom'"),
    ],
)
def test_invalid_tables_name_key_rule_and_value(table, message):
    with pytest.raises(ConfigError) as exc:
        PrivacyOptions.from_table(table, where=WHERE)
    assert message in str(exc.value) and str(exc.value).startswith("sites.toml")

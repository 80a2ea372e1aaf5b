"""The privacy officer's policy (``privacy/policy.toml``) and its checks.

- :mod:`~fedfew_med.privacy.policy` — :class:`PrivacyPolicy` (frozen, loaded from TOML with errors
  naming file, key, expectation and value), :func:`check_config` (a federation's resolved per-site
  privacy options against the policy, before any training), :func:`check_spent` (a finished run's
  ledgers against the policy, for the report), :func:`check_deployment` (TLS, authenticated sites) and
  :func:`check_recorded_transport` (the same rules against what a run's coordinator recorded).

Layer 2: it reads :mod:`fedfew_med.dp` (how every site's options resolve), never a runner.
"""

from fedfew_med.privacy.policy import (
    PolicyError,
    PolicyViolation,
    PrivacyPolicy,
    SiteLimits,
    Verdict,
    check_config,
    check_deployment,
    check_recorded_transport,
    check_spent,
    enforce,
    load_policy,
)

__all__ = [
    "PolicyError",
    "PolicyViolation",
    "PrivacyPolicy",
    "SiteLimits",
    "Verdict",
    "check_config",
    "check_deployment",
    "check_recorded_transport",
    "check_spent",
    "enforce",
    "load_policy",
]

"""Aggregation as replies arrive: same step whatever the order, stable for tiny μ, O(K) state."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fedfew_med.algorithms import REGISTRY, RoundInfo, SiteReply, build_algorithm
from fedfew_med.algorithms.aggregate import DeltaSum, LogWeightedDeltaSum

N = {"a": 10, "b": 30, "c": 60, "d": 25}
rng = np.random.default_rng(0)
BASE = [{"w": torch.tensor(rng.normal(size=3))} for _ in range(2)]
RETURNED = {s: {k: {"w": torch.tensor(rng.normal(size=3))} for k in range(2)} for s in N}
LOSSES = {s: tuple(float(x) for x in rng.uniform(0.2, 3.0, size=2)) for s in N}


def info(mu: float) -> RoundInfo:
    total = sum(N.values())
    return RoundInfo(round=0, num_rounds=1, participants=tuple(N), site_weight={s: n / total for s, n in N.items()},
                     extras={"mu": mu})


def replies() -> dict[str, SiteReply]:
    return {s: SiteReply(num_samples=N[s], losses=LOSSES[s], models=RETURNED[s]) for s in N}


@pytest.mark.parametrize(("name", "params"), [("fedfew", {"k": 2}), ("ifca", {"k": 2}), ("fedavg", {})])
def test_arrival_order_does_not_matter(name, params):
    algo = build_algorithm(name, params)
    base = BASE[: algo.num_models]
    reps = {s: SiteReply(num_samples=r.num_samples, losses=r.losses[: max(algo.num_models, 1)] if name != "fedfew" else r.losses,
                         models={k: m for k, m in r.models.items() if k < algo.num_models}) for s, r in replies().items()}
    if name == "ifca":  # one model per site
        reps = {s: SiteReply(num_samples=r.num_samples, losses=r.losses, models={i % 2: r.models[i % 2]})
                for i, (s, r) in enumerate(reps.items())}
    results = []
    for order in itertools.permutations(reps):
        step = algo.begin_aggregation(info(0.01), base)
        for s in order:
            step.add(s, reps[s])
        results.append(step.result().models)
    for models in results[1:]:
        for a, b in zip(results[0], models, strict=True):
            torch.testing.assert_close(a["w"], b["w"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mu", [1e-4, 1e-3, 0.01, 1.0, 10.0])
def test_fedfew_stream_matches_numpy_even_for_tiny_mu(mu):
    """exp(-A/μ) underflows for μ = 1e-4; the log-weighted running sum must still give the exact step."""
    sites = list(N)
    lam = np.array([N[s] for s in sites], dtype=np.float64) / sum(N.values())
    losses = np.array([LOSSES[s] for s in sites])
    z = -lam[:, None] * losses / mu
    log_s = np.logaddexp.reduce(z, axis=1)
    log_alpha = -log_s - np.logaddexp.reduce(-log_s)
    step_w = np.exp(log_alpha[:, None] + z - log_s[:, None])  # α_i w_ik
    got = build_algorithm("fedfew", {"preset": "reference", "k": 2}).aggregate(info(mu), BASE, replies()).models
    for k in range(2):
        expected = BASE[k]["w"].numpy() + sum(step_w[i, k] * (RETURNED[s][k]["w"].numpy() - BASE[k]["w"].numpy())
                                              for i, s in enumerate(sites))
        np.testing.assert_allclose(got[k]["w"].numpy(), expected, rtol=1e-10, atol=1e-12)


def test_log_weighted_sum_rescales_without_overflow():
    base = {"w": torch.zeros(2, dtype=torch.float64)}
    acc = LogWeightedDeltaSum(base)
    for lw, v in [(-2000.0, 1.0), (-1000.0, 2.0), (-3000.0, 4.0)]:  # exp() of each underflows to 0
        acc.add({"w": torch.full((2,), v, dtype=torch.float64)}, lw)
    # Σ exp(lw_i) v_i / Σ exp(lw_i) ≈ 2 (the -1000 term dominates); normalise with log_scale = -(-1000)
    out = acc.apply(log_scale=1000.0)
    torch.testing.assert_close(out["w"], torch.full((2,), 2.0, dtype=torch.float64))


def test_aggregation_state_does_not_grow_with_sites():
    """The FedFew step keeps K running sums, not the replies."""
    algo = build_algorithm("fedfew", {"k": 2})
    step = algo.begin_aggregation(info(0.01), BASE)
    for s, r in replies().items():
        step.add(s, r)
    sums = step.sums  # type: ignore[attr-defined]
    assert len(sums) == 2 and all(isinstance(x.inner, DeltaSum) for x in sums)
    assert not any(isinstance(v, (dict, list)) and v and isinstance(next(iter(v)), SiteReply) for v in vars(step).values())


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_streams(name):
    assert callable(REGISTRY[name].begin_aggregation)

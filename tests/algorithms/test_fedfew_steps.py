"""FedFew's server-step options against numpy: reference and normalised steps, scale-free temperatures,
the c_k guard, ownership and re-seeding, collapse diagnostics, presets and fedfew_ft."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfew_med.algorithms import RoundInfo, SiteReply, build_algorithm
from fedfew_med.algorithms.fedfew import PRESETS, FedFewFineTune
from fedfew_med.algorithms.fedfew_collapse import Ownership, WorstServed, collapse_note, model_spread, reseed
from fedfew_med.algorithms.fedfew_math import fedfew_weights, objective_gradient, smooth_objective
from fedfew_med.config import ConfigError

SITES = ("a", "b", "c", "d")
N = {"a": 10, "b": 30, "c": 60, "d": 20}
LOSSES = {"a": (0.9, 0.2, 0.5), "b": (0.4, 1.1, 0.45), "c": (0.7, 0.6, 0.65), "d": (1.3, 1.2, 2.0)}
RNG = np.random.default_rng(3)
BASE = [{"w": RNG.normal(size=(2, 3)), "b": RNG.normal(size=2)} for _ in range(3)]
RETURNED = {s: {k: {n: v + RNG.normal(size=v.shape) for n, v in BASE[k].items()} for k in range(3)} for s in SITES}


def lse(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.exp(x - m).sum(axis=axis))


def numpy_weights(L: np.ndarray, lam: np.ndarray, mu: float, mu_site: float | None, scale: str) -> tuple[np.ndarray, np.ndarray]:
    """α (M,) and w (M, K) of the two-temperature scalarization, written out independently."""
    A = np.log(lam)[:, None] + np.log(L) if scale == "log" else lam[:, None] * L
    z = -A / mu
    log_s = lse(z, 1)
    softmin = -mu * log_s  # (M,)
    t = mu if mu_site is None else mu_site
    alpha = np.exp(softmin / t - lse(softmin / t, 0))
    return alpha, np.exp(z - log_s[:, None])


def info(sites: tuple[str, ...] = SITES, mu: float = 0.1, round_idx: int = 0) -> RoundInfo:
    total = sum(N[s] for s in sites)
    return RoundInfo(round=round_idx, num_rounds=10, participants=sites, site_weight={s: N[s] / total for s in sites},
                     extras={"mu": mu})


def torchify(p: dict) -> dict[str, torch.Tensor]:
    return {n: torch.tensor(v, dtype=torch.float64) for n, v in p.items()}


def replies(losses: dict | None = None) -> dict[str, SiteReply]:
    losses = losses or LOSSES
    return {s: SiteReply(num_samples=N[s], losses=losses[s], models={k: torchify(RETURNED[s][k]) for k in range(3)})
            for s in losses}


def lambdas(weights: str, sites: tuple[str, ...] = SITES) -> np.ndarray:
    if weights == "uniform":
        return np.full(len(sites), 1 / len(sites))
    return np.array([N[s] for s in sites], dtype=float) / sum(N[s] for s in sites)


CASES = [  # (step, loss_scale, mu, mu_site, site_weights)
    ("reference", "linear", 0.01, None, "samples"),
    ("reference", "linear", 0.5, None, "uniform"),
    ("normalized", "linear", 0.05, None, "samples"),
    ("normalized", "log", 0.1, 1.0, "uniform"),
    ("normalized", "log", 0.3, 0.2, "samples"),
    ("reference", "log", 0.1, 1.0, "uniform"),
]


@pytest.mark.parametrize(("step", "scale", "mu", "mu_site", "weights"), CASES)
def test_step_equals_numpy(step: str, scale: str, mu: float, mu_site: float | None, weights: str) -> None:
    params = {"preset": "reference", "k": 3, "step": step, "loss_scale": scale, "mu": mu, "site_weights": weights,
              "c_floor": 1e-12}
    if mu_site is not None:
        params["mu_site"] = mu_site
    got = build_algorithm("fedfew", params).aggregate(info(mu=mu), [torchify(b) for b in BASE], replies()).models
    L = np.array([LOSSES[s] for s in SITES])
    alpha, w = numpy_weights(L, lambdas(weights), mu, mu_site, scale)
    a = alpha[:, None] * w  # (M, K) α_i w_ik
    c = a.sum(axis=0)
    for k in range(3):
        coef = a[:, k] / c[k] if step == "normalized" else a[:, k]
        for name, base in BASE[k].items():
            want = base + sum(coef[i] * (RETURNED[s][k][name] - base) for i, s in enumerate(SITES))
            np.testing.assert_allclose(got[k][name].numpy(), want, rtol=1e-10, atol=1e-12)


def test_reference_preset_is_the_authors_update_by_hand() -> None:
    """Two sites, one parameter, K = 2, μ = 1, λ = (1/4, 3/4): every weight written out on paper."""
    L = {"a": (1.0, 2.0), "b": (2.0, 1.0)}
    base = [{"x": torch.tensor([0.0], dtype=torch.float64)}, {"x": torch.tensor([10.0], dtype=torch.float64)}]
    reps = {"a": SiteReply(num_samples=1, losses=L["a"], models={0: {"x": torch.tensor([1.0], dtype=torch.float64)},
                                                               1: {"x": torch.tensor([12.0], dtype=torch.float64)}}),
            "b": SiteReply(num_samples=3, losses=L["b"], models={0: {"x": torch.tensor([-1.0], dtype=torch.float64)},
                                                               1: {"x": torch.tensor([11.0], dtype=torch.float64)}})}
    rinfo = RoundInfo(round=0, num_rounds=1, participants=("a", "b"), site_weight={"a": 0.25, "b": 0.75}, extras={"mu": 1.0})
    got = build_algorithm("fedfew", {"preset": "reference", "k": 2, "mu": 1.0}).aggregate(rinfo, base, reps).models
    # S_a = e^-0.25 + e^-0.5, S_b = e^-1.5 + e^-0.75; α ∝ 1/S; w_ik = e^{-A_ik}/S_i
    sa, sb = np.exp(-0.25) + np.exp(-0.5), np.exp(-1.5) + np.exp(-0.75)
    alpha_a, alpha_b = (1 / sa) / (1 / sa + 1 / sb), (1 / sb) / (1 / sa + 1 / sb)
    w = {("a", 0): np.exp(-0.25) / sa, ("a", 1): np.exp(-0.5) / sa, ("b", 0): np.exp(-1.5) / sb, ("b", 1): np.exp(-0.75) / sb}
    want0 = 0.0 + alpha_a * w["a", 0] * 1.0 + alpha_b * w["b", 0] * (-1.0)
    want1 = 10.0 + alpha_a * w["a", 1] * 2.0 + alpha_b * w["b", 1] * 1.0
    assert float(got[0]["x"]) == pytest.approx(want0, rel=1e-12)
    assert float(got[1]["x"]) == pytest.approx(want1, rel=1e-12)


@pytest.mark.parametrize(("c_floor", "expect_scale"), [(1e-12, 1.0), (0.5, None)])
def test_c_floor_guards_a_model_almost_no_weight_reaches(c_floor: float, expect_scale: float | None) -> None:
    """Every site prefers model 0 by far: c_1 ≈ 0. Unguarded, model 1 still takes a full weighted-mean step;
    with c_floor the step shrinks by c_1 / c_floor."""
    losses = {s: (0.1, 5.0, 5.0) for s in SITES}
    params = {"preset": "reference", "k": 3, "step": "normalized", "mu": 0.05, "site_weights": "uniform", "c_floor": c_floor}
    got = build_algorithm("fedfew", params).aggregate(info(mu=0.05), [torchify(b) for b in BASE], replies(losses)).models
    L = np.array([losses[s] for s in SITES])
    alpha, w = numpy_weights(L, lambdas("uniform"), 0.05, None, "linear")
    a = alpha[:, None] * w
    c1 = a[:, 1].sum()
    assert c1 < 1e-10
    scale = 1.0 if expect_scale is not None else c1 / c_floor
    mean_delta = sum(a[i, 1] / c1 * (RETURNED[s][1]["b"] - BASE[1]["b"]) for i, s in enumerate(SITES))
    np.testing.assert_allclose(got[1]["b"].numpy(), BASE[1]["b"] + scale * mean_delta, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("mu", "mu_site", "scale"), [(0.1, 1.0, "log"), (0.2, None, "log"), (0.05, 0.3, "linear")])
def test_two_temperature_gradient_matches_autograd(mu: float, mu_site: float | None, scale: str) -> None:
    L = torch.tensor([LOSSES[s] for s in SITES], dtype=torch.float64, requires_grad=True)
    lam = torch.tensor(lambdas("samples"), dtype=torch.float64)
    smooth_objective(L, lam, mu, mu_site=mu_site, loss_scale=scale).backward()
    analytic = objective_gradient(L.detach(), lam, mu, mu_site=mu_site, loss_scale=scale)
    torch.testing.assert_close(analytic, L.grad, rtol=1e-9, atol=1e-12)
    got = fedfew_weights(L.detach(), lam, mu, mu_site=mu_site, loss_scale=scale)
    alpha, w = numpy_weights(L.detach().numpy(), lam.numpy(), mu, mu_site, scale)
    np.testing.assert_allclose(got.alpha.numpy(), alpha, rtol=1e-10)
    np.testing.assert_allclose(got.w.numpy(), w, rtol=1e-10)


def test_log_scale_is_scale_free() -> None:
    """Multiplying every loss by a constant changes no weight on the log scale (it does on the linear one)."""
    L = torch.tensor([LOSSES[s] for s in SITES], dtype=torch.float64)
    lam = torch.tensor(lambdas("uniform"), dtype=torch.float64)
    a, b = fedfew_weights(L, lam, 0.1, mu_site=1.0, loss_scale="log"), fedfew_weights(7 * L, lam, 0.1, mu_site=1.0, loss_scale="log")
    torch.testing.assert_close(a.alpha, b.alpha)
    torch.testing.assert_close(a.w, b.w)
    lin_a, lin_b = fedfew_weights(L, lam, 0.1), fedfew_weights(7 * L, lam, 0.1)
    assert not torch.allclose(lin_a.alpha, lin_b.alpha)


@pytest.mark.parametrize(("idle", "owners", "want"), [
    ([0, 0, 0], [0, 0, 2], [0, 1, 0]),
    ([3, 1, 0], [1], [4, 0, 1]),
    ([], [2, 2], [1, 1, 0]),  # no state yet (round 0 or an old checkpoint): counts start at 0
])
def test_ownership_counts_idle_rounds(idle: list[int], owners: list[int], want: list[int]) -> None:
    assert Ownership(idle).updated(owners, 3) == want


def test_reseed_copies_the_worst_served_sites_update_and_says_so() -> None:
    worst = WorstServed()
    models = [torchify(b) for b in BASE]
    for s in SITES:  # d has the largest best loss (1.2, on model 1)
        worst.offer(s, list(LOSSES[s]), {k: torchify(RETURNED[s][k]) for k in range(3)}, keep=True)
    assert (worst.site, worst.model) == ("d", 1)
    new, idle, record = reseed(models, [0, 0, 4], 3, worst, round_idx=7)
    assert record == [{"model": 2, "idle_rounds": 4, "from_site": "d", "from_model": 1, "round": 7}]
    assert idle == [0, 0, 0]
    np.testing.assert_array_equal(new[2]["w"].numpy(), RETURNED["d"][1]["w"])
    assert new[0] is models[0] and new[1] is models[1]
    assert reseed(models, [0, 0, 2], 3, worst, 7)[2] == []  # not idle long enough
    assert reseed(models, [0, 0, 9], 0, worst, 7)[2] == []  # re-seeding off
    assert reseed(models, [0, 9, 0], 3, worst, 7)[2] == []  # the idle model is the worst site's own best


def test_reseeding_in_the_server_step_is_recorded_and_kept_as_state() -> None:
    algo = build_algorithm("fedfew", {"k": 3, "reseed_after": 2, "site_weights": "uniform"})
    losses = {s: (0.1, 0.2, 9.0) for s in SITES}  # model 2 never owned
    models = [torchify(b) for b in BASE]
    # round 0: models 1, 2 idle once; round 1: both idle twice, the lower index (1) is re-seeded from the worst-served
    # site's (ties: the first, "a") update of its best model 0; round 2: model 2 idle three times, re-seeded
    want_idle = [[0, 1, 1], [0, 0, 2], [0, 1, 0]]
    want_model = [None, 1, 2]
    for r in range(3):
        step = algo.aggregate(info(mu=0.1, round_idx=r), models, replies(losses))
        algo.commit(step)
        models = step.models
        assert step.log["models_in_use"] == 1 and step.log["idle_rounds"] == want_idle[r]
        if want_model[r] is None:
            assert step.log["reseeded"] == []
        else:
            assert step.log["reseeded"] == [{"model": want_model[r], "idle_rounds": r + 1, "from_site": "a", "from_model": 0,
                                             "round": r}]
            np.testing.assert_array_equal(models[want_model[r]]["w"].numpy(), RETURNED["a"][0]["w"])
    assert algo.server_state() == {"idle": [0, 1, 0]}
    restored = build_algorithm("fedfew", {"k": 3, "reseed_after": 2, "site_weights": "uniform"})
    restored.load_server_state(algo.server_state())
    assert restored.server_state() == algo.server_state()
    with pytest.raises(ValueError, match="idle"):
        restored.load_server_state({"idle": [-1, "x"]})


def test_model_spread_and_collapse_note() -> None:
    one = {"x": torch.tensor([3.0, 4.0])}
    assert model_spread([one, one, one]) == 0.0
    other = {"x": torch.tensor([0.0, 0.0])}
    assert model_spread([one, other]) == pytest.approx(5.0 / 2.5)
    assert "collapsed into one" in collapse_note(1, 3, 0.001)
    assert collapse_note(2, 3, 0.5).startswith("sites use 2 of 3 models: the other 1 fit no site better")
    assert "α put 0.95 of the weight on one site" in collapse_note(1, 3, 0.5, alpha_max=0.95)
    assert "α put" not in collapse_note(1, 3, 0.5, alpha_max=0.3)
    assert collapse_note(3, 3, 0.5).startswith("sites use all 3")


def test_presets_fill_only_what_the_config_leaves_out() -> None:
    ref = build_algorithm("fedfew", {"preset": "reference", "k": 3}).options
    assert {k: getattr(ref, k) for k in PRESETS["reference"]} == PRESETS["reference"]
    default = build_algorithm("fedfew", {}).options
    assert {k: getattr(default, k) for k in PRESETS["default"]} == PRESETS["default"]
    mixed = build_algorithm("fedfew", {"preset": "reference", "step": "normalized", "mu": 0.3}).options
    assert (mixed.step, mixed.mu, mixed.init, mixed.mu_site) == ("normalized", 0.3, "identical", None)
    with pytest.raises(ConfigError, match="preset"):
        build_algorithm("fedfew", {"preset": "paper"})
    with pytest.raises(ConfigError, match="reseed_after"):
        build_algorithm("fedfew", {"reseed_after": -1})


class _Work:
    """A LocalWork whose losses are fixed and whose training adds a constant."""

    num_samples = 5
    state: dict = {}

    def __init__(self) -> None:
        self.trained: list[tuple[str, str | None, int | None]] = []

    def loss(self, params, *, slot, split="train"):
        return float(params["x"].sum())

    def train(self, params, *, slot, epochs=None, prox=None, from_slot=None):
        from fedfew_med.algorithms import TrainResult

        self.trained.append((slot, from_slot, epochs))
        return TrainResult(params={"x": params["x"] + 1}, loss=0.0, steps=1, samples=5)


def test_fedfew_ft_fine_tunes_the_chosen_model_at_deployment() -> None:
    algo = build_algorithm("fedfew_ft", {"k": 3, "finetune_epochs": 4})
    assert isinstance(algo, FedFewFineTune)
    models = [{"x": torch.tensor([2.0])}, {"x": torch.tensor([0.5])}, {"x": torch.tensor([1.0])}]
    work = _Work()
    dep = algo.deploy("s", models, work)
    assert dep.model_index == 1 and dep.slot == "finetune" and float(dep.params["x"]) == 1.5
    assert work.trained == [("finetune", "server/1", 4)]
    assert dep.scores == (2.0, 0.5, 1.0)

"""FedFew's site side (local_round with a fake LocalWork), deployment and initialisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfew_med.algorithms import RoundInfo, SiteReply, TrainResult
from fedfew_med.algorithms.fedfew import FedFew, FedFewOptions


class FakeWork:
    """Deterministic LocalWork: training adds 1 to every parameter; losses come from fixed tables."""

    def __init__(self, n: int, train_loss: dict[str, float], eval_loss: dict[tuple[str, str], float]) -> None:
        self._n, self._state = n, {}
        self.train_loss, self.eval_loss = train_loss, eval_loss
        self.trained: list[str] = []
        self.evaluated: list[tuple[str, str]] = []

    @property
    def num_samples(self) -> int:
        return self._n

    @property
    def state(self) -> dict:
        return self._state

    def train(self, params, *, slot, epochs=None, prox=None, from_slot=None) -> TrainResult:
        self.trained.append(slot)
        new = {k: v + 1.0 for k, v in params.items()}
        return TrainResult(params=new, loss=self.train_loss[slot], steps=1, samples=self._n)

    def loss(self, params, *, slot, split="train") -> float:
        self.evaluated.append((slot, split))
        return self.eval_loss[(slot, split)]


TRAIN3 = {"server/0": 0.9, "server/1": 0.45, "server/2": 0.6}
RECV3 = {"server/0": 0.5, "server/1": 0.2, "server/2": 0.35}
EVAL3 = {**{(s, "train"): v for s, v in RECV3.items()}, ("server/0", "val"): 0.3, ("server/1", "val"): 0.8,
         ("server/2", "val"): 0.4}
MODELS3 = {k: {"w": torch.full((2,), float(k)), "b": torch.tensor(-float(k))} for k in range(3)}


def site_round(lam: float = 0.5, mu: float = 0.1, **opts) -> tuple[SiteReply, FakeWork]:
    work = FakeWork(20, TRAIN3, EVAL3)
    info = RoundInfo(round=0, num_rounds=2, participants=("x", "y"), site_weight={"x": lam, "y": 1 - lam},
                     extras={"mu": mu})
    return FedFew(FedFewOptions(preset="reference", k=3, **opts)).local_round("x", info, MODELS3, work), work


@pytest.mark.parametrize(("source", "losses", "evaluated"), [
    ("train", (0.9, 0.45, 0.6), []),
    ("received", (0.5, 0.2, 0.35), [("server/0", "train"), ("server/1", "train"), ("server/2", "train")]),
])
def test_local_round_loss_source(source: str, losses: tuple, evaluated: list) -> None:
    reply, work = site_round(loss_source=source)
    assert reply.losses == pytest.approx(losses) and reply.num_samples == 20
    assert work.evaluated == evaluated and work.trained == ["server/0", "server/1", "server/2"]
    assert sorted(reply.models) == [0, 1, 2]
    for k in range(3):
        np.testing.assert_array_equal(reply.models[k]["w"].numpy(), [k + 1.0, k + 1.0])


# λ = 0.5, μ = 0.1, received L = (0.5, 0.2, 0.35): w = softmax(-5 L) ≈ (0.131, 0.589, 0.279)
@pytest.mark.parametrize(("sparse", "r", "thr", "selected"), [
    ("top_r", 1, 0.1, [1]),
    ("top_r", 2, 0.1, [1, 2]),
    ("top_r", 3, 0.1, [0, 1, 2]),
    ("threshold", 1, 0.1, [0, 1, 2]),
    ("threshold", 1, 0.2, [1, 2]),
    ("threshold", 1, 0.5, [1]),
    ("threshold", 1, 0.9, [1]),  # nothing passes: keep the best one
])
@pytest.mark.parametrize("source", ["train", "received"])
def test_sparse_selection(sparse: str, r: int, thr: float, selected: list, source: str) -> None:
    w = np.exp(-0.5 * np.array([0.5, 0.2, 0.35]) / 0.1)
    w /= w.sum()
    by_numpy = sorted(np.argsort(-w)[:r].tolist()) if sparse == "top_r" else ([k for k in range(3) if w[k] >= thr]
                                                                             or [int(np.argmax(w))])
    assert by_numpy == selected
    reply, work = site_round(sparse=sparse, sparse_r=r, sparse_threshold=thr, loss_source=source)
    assert sorted(reply.models) == selected and reply.info["trained"] == selected
    assert work.trained == [f"server/{k}" for k in selected]
    train = [0.9, 0.45, 0.6] if source == "train" else [0.5, 0.2, 0.35]
    assert reply.losses == pytest.approx([train[k] if k in selected else [0.5, 0.2, 0.35][k] for k in range(3)])


@pytest.mark.parametrize("site_weights", [
    "samples",
    "uniform",  # the site used n_i/N here while the server used 1/M, until FedFew.site_lambda
])
def test_threshold_selection_agrees_with_server_w(site_weights: str) -> None:
    """A site trains exactly the models whose server-side w_ik (as logged by aggregate) reaches the threshold.

    Sites a, b, c hold 10, 30, 60 records and all see received losses (1.0, 1.2); μ = 0.1, threshold 0.25.
    With λ = n/N site c (λ = 0.6) has w_c1 ≈ 0.23 and keeps model 0 only; with λ = 1/3 every w_i1 ≈ 0.34.
    """
    algo = FedFew(FedFewOptions(preset="reference", k=2, sparse="threshold", sparse_threshold=0.25, loss_source="received",
                                site_weights=site_weights))
    n = {"a": 10, "b": 30, "c": 60}
    info = RoundInfo(round=0, num_rounds=1, participants=tuple(n), site_weight={s: v / 100 for s, v in n.items()},
                     extras={"mu": 0.1})  # site_weight = n_i/N, as the simulation broadcasts it
    models = [MODELS3[0], MODELS3[1]]
    replies: dict[str, SiteReply] = {}
    for s in n:
        work = FakeWork(n[s], TRAIN3, {("server/0", "train"): 1.0, ("server/1", "train"): 1.2})
        replies[s] = algo.local_round(s, info, dict(enumerate(models)), work)
    log = algo.aggregate(info, models, replies).log
    for i, s in enumerate(n):
        assert replies[s].info["trained"] == [k for k in range(2) if log["w"][i][k] >= 0.25]


@pytest.mark.parametrize(("split", "best", "scores"), [("train", 1, (0.5, 0.2, 0.35)), ("val", 0, (0.3, 0.8, 0.4))])
def test_deploy_picks_argmin_on_selection_split(split: str, best: int, scores: tuple) -> None:
    work = FakeWork(20, TRAIN3, EVAL3)
    models = [MODELS3[k] for k in range(3)]
    dep = FedFew(FedFewOptions(preset="reference", k=3, selection_split=split)).deploy("x", models, work)
    assert dep.model_index == best and dep.slot == f"server/{best}" and dep.scores == pytest.approx(scores)
    assert dep.params is models[best] and work.trained == []
    assert work.evaluated == [(f"server/{k}", split) for k in range(3)]


def make_init(calls: list):
    def init(i: int) -> dict[str, torch.Tensor]:
        calls.append(i)
        g = torch.Generator().manual_seed(100 + i)
        return {"w": torch.randn(50, generator=g), "b": torch.tensor(0.5 + i)}
    return init


@pytest.mark.parametrize("k", [1, 3])
def test_init_identical_and_independent(k: int) -> None:
    calls: list[int] = []
    same = FedFew(FedFewOptions(preset="reference", k=k, init="identical")).init_models(make_init(calls))
    assert calls == [0] and len(same) == k
    for m in same:
        torch.testing.assert_close(m, same[0], rtol=0, atol=0)
    same[0]["w"].add_(1.0)  # copies, not shared tensors
    assert k == 1 or not torch.equal(same[0]["w"], same[-1]["w"])
    calls.clear()
    indep = FedFew(FedFewOptions(preset="reference", k=k, init="independent")).init_models(make_init(calls))
    assert calls == list(range(k))
    for i, m in enumerate(indep):
        torch.testing.assert_close(m, make_init([])(i), rtol=0, atol=0)


@pytest.mark.parametrize("scale", [0.01, 0.05])
def test_init_perturbed_small_and_deterministic(scale: float) -> None:
    first = FedFew(FedFewOptions(preset="reference", k=3, init="perturbed", perturb_scale=scale), seed=4).init_models(make_init([]))
    again = FedFew(FedFewOptions(preset="reference", k=3, init="perturbed", perturb_scale=scale), seed=4).init_models(make_init([]))
    other = FedFew(FedFewOptions(preset="reference", k=3, init="perturbed", perturb_scale=scale), seed=5).init_models(make_init([]))
    base = make_init([])(0)
    torch.testing.assert_close(first[0], base, rtol=0, atol=0)
    for k in (1, 2):
        torch.testing.assert_close(first[k], again[k], rtol=0, atol=0)
        assert not torch.equal(first[k]["w"], other[k]["w"])
        for name in ("w", "b"):
            rel = float((first[k][name] - base[name]).norm() / base[name].norm())
            assert 0 < rel < 5 * scale
    assert not torch.equal(first[1]["w"], first[2]["w"])


def test_round_extras_anneal_mu() -> None:
    algo = FedFew(FedFewOptions(preset="reference", mu=0.1, mu_end=0.001))
    assert [algo.round_extras(r, 3)["mu"] for r in range(3)] == pytest.approx([0.1, 0.01, 0.001])
    assert FedFew(FedFewOptions(preset="reference", mu=0.1)).round_extras(5, 10) == {"mu": 0.1}

"""Baselines (FedAvg, FedProx, FedAvg+FT, IFCA, Ditto, Local), DeltaSum and build_algorithm, against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfew_med.algorithms import (
    IFCA,
    REGISTRY,
    Ditto,
    FedAvg,
    FedAvgFineTune,
    FedProx,
    Local,
    Prox,
    RoundInfo,
    SiteReply,
    TrainResult,
    build_algorithm,
)
from fedfew_med.algorithms.aggregate import DeltaSum, weighted_average
from fedfew_med.algorithms.ditto import DittoOptions
from fedfew_med.algorithms.fedavg import FedAvgOptions, FedProxOptions, FineTuneOptions
from fedfew_med.algorithms.ifca import IFCAOptions
from fedfew_med.config import ConfigError


class FakeWork:
    """Deterministic LocalWork: training adds ``step`` to every parameter and records how it was called."""

    def __init__(self, n: int = 10, eval_loss: dict[str, float] | None = None, step: float = 1.0) -> None:
        self._n, self._state, self.step = n, {}, step
        self.eval_loss = eval_loss or {}
        self.calls: list[dict] = []

    @property
    def num_samples(self) -> int:
        return self._n

    @property
    def state(self) -> dict:
        return self._state

    def train(self, params, *, slot, epochs=None, prox=None, from_slot=None) -> TrainResult:
        self.calls.append({"slot": slot, "epochs": epochs, "prox": prox, "from_slot": from_slot,
                           "params": {k: v.clone() for k, v in params.items()}})
        new = {k: v + self.step for k, v in params.items()}
        return TrainResult(params=new, loss=0.25 * self.step, steps=1, samples=self._n)

    def loss(self, params, *, slot, split="train") -> float:
        return self.eval_loss[slot]


def rand_params(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(2, generator=g), "b": torch.randn((), generator=g)}


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


INFO = RoundInfo(round=0, num_rounds=1, participants=("a", "b", "c"), site_weight={"a": 0.2, "b": 0.3, "c": 0.5})
NS = [(5, 20, 75), (1, 1, 1), (100, 3, 40)]


@pytest.mark.parametrize("ns", NS)
@pytest.mark.parametrize("algo", [FedAvg(), FedProx(FedProxOptions(mu_prox=0.1)), FedAvgFineTune(), Ditto()],
                         ids=lambda a: a.name)
def test_global_model_step_is_sample_weighted_mean(algo, ns: tuple) -> None:
    base = rand_params(0)
    sent = [rand_params(i + 1) for i in range(3)]
    replies = {s: SiteReply(num_samples=n, losses=(0.1,), models={0: p}) for s, n, p in zip("abc", ns, sent, strict=True)}
    new = algo.aggregate(INFO, [base], replies).models
    assert len(new) == 1
    for name in ("w", "b"):
        expected = np.average(np.stack([p[name].double().numpy() for p in sent]), axis=0, weights=ns)
        np.testing.assert_allclose(new[0][name].numpy(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("lr", [0.5, 2.0])
def test_fedavg_server_lr_and_missing_model(lr: float) -> None:
    base, p_a, p_b = rand_params(0), rand_params(1), rand_params(2)
    replies = {"a": SiteReply(num_samples=10, losses=(), models={0: p_a}),
               "b": SiteReply(num_samples=30, losses=(), models={0: p_b}),
               "c": SiteReply(num_samples=60, losses=(), models={})}  # sent nothing back: not in the mean
    new = FedAvg(FedAvgOptions(server_lr=lr)).aggregate(INFO, [base], replies).models[0]
    for name in ("w", "b"):
        b, a, c = (t[name].double().numpy() for t in (base, p_a, p_b))
        np.testing.assert_allclose(new[name].numpy(), b + lr * (0.25 * (a - b) + 0.75 * (c - b)), rtol=1e-6, atol=1e-6)


def test_fedavg_local_round_and_deploy() -> None:
    work, model = FakeWork(n=7), rand_params(3)
    reply = FedAvg().local_round("a", INFO, {0: model}, work)
    assert reply.num_samples == 7 and reply.losses == (0.25,) and list(reply.models) == [0]
    assert same(reply.models[0], {k: v + 1 for k, v in model.items()})
    assert [(c["slot"], c["prox"], c["epochs"]) for c in work.calls] == [("server/0", None, None)]
    dep = FedAvg().deploy("a", [model], work)
    assert dep.params is model and dep.model_index == 0 and dep.slot == "server/0" and len(work.calls) == 1


@pytest.mark.parametrize(("mu", "expect_prox"), [(0.1, True), (2.5, True), (0.0, False)])
def test_fedprox_passes_prox_toward_received(mu: float, expect_prox: bool) -> None:
    work, model = FakeWork(), rand_params(4)
    FedProx(FedProxOptions(mu_prox=mu)).local_round("a", INFO, {0: model}, work)
    prox = work.calls[0]["prox"]
    if expect_prox:
        assert isinstance(prox, Prox) and prox.strength == mu and same(prox.center, model)
    else:
        assert prox is None


@pytest.mark.parametrize("epochs", [1, 3])
def test_fedavg_finetune_deploy_trains_from_global(epochs: int) -> None:
    work, model = FakeWork(step=0.5), rand_params(5)
    dep = FedAvgFineTune(FineTuneOptions(finetune_epochs=epochs)).deploy("a", [model], work)
    call = work.calls[0]
    assert len(work.calls) == 1 and same(call["params"], model)
    assert (call["slot"], call["from_slot"], call["epochs"], call["prox"]) == ("finetune", "server/0", epochs, None)
    assert dep.slot == "finetune" and dep.model_index == 0 and same(dep.params, {k: v + 0.5 for k, v in model.items()})


@pytest.mark.parametrize(("losses", "best"), [((0.9, 0.2, 0.5), 1), ((0.1, 0.2, 0.3), 0), ((0.4, 0.4, 0.1), 2),
                                              ((0.3, 0.3, 0.3), 0)])
def test_ifca_local_round_trains_only_argmin(losses: tuple, best: int) -> None:
    models = {k: rand_params(10 + k) for k in range(3)}
    work = FakeWork(n=12, eval_loss={f"server/{k}": v for k, v in enumerate(losses)})
    reply = IFCA(IFCAOptions(k=3)).local_round("a", INFO, models, work)
    assert list(reply.models) == [best] and reply.info["cluster"] == best and reply.losses == losses
    assert [c["slot"] for c in work.calls] == [f"server/{best}"] and same(work.calls[0]["params"], models[best])
    dep = IFCA(IFCAOptions(k=3)).deploy("a", [models[k] for k in range(3)], work)
    assert dep.model_index == best and dep.params is models[best] and dep.scores == losses


def test_ifca_aggregate_per_cluster_mean_and_empty_cluster() -> None:
    base = [rand_params(20 + k) for k in range(3)]
    ret = {s: rand_params(30 + i) for i, s in enumerate("abc")}
    choice, ns = {"a": 0, "b": 2, "c": 0}, {"a": 10, "b": 5, "c": 30}
    replies = {s: SiteReply(num_samples=ns[s], losses=(0, 0, 0), models={choice[s]: ret[s]}) for s in "abc"}
    step = IFCA(IFCAOptions(k=3)).aggregate(INFO, base, replies)
    for name in ("w", "b"):
        m0 = np.average([ret["a"][name].numpy(), ret["c"][name].numpy()], axis=0, weights=[10, 30])
        np.testing.assert_allclose(step.models[0][name].numpy(), m0, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(step.models[2][name].numpy(), ret["b"][name].numpy(), rtol=1e-6, atol=1e-6)
    assert same(step.models[1], base[1])
    assert step.log["clusters"] == {0: ["a", "c"], 1: [], 2: ["b"]}


@pytest.mark.parametrize(("init", "inits"), [("independent", [0, 1, 2]), ("identical", [0, 0, 0])])
def test_ifca_init(init: str, inits: list) -> None:
    seen: list[int] = []
    models = IFCA(IFCAOptions(k=3, init=init)).init_models(lambda i: seen.append(i) or rand_params(i))
    assert sorted(set(seen)) == sorted(set(inits))
    assert len(models) == 3 and all(same(m, rand_params(c)) for m, c in zip(models, inits, strict=True))


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_ditto_personal_model(lam: float) -> None:
    algo, work = Ditto(DittoOptions(lam=lam)), FakeWork(n=9)
    g1, g2 = rand_params(40), rand_params(41)
    assert same(algo.deploy("a", [g1], work).params, g1)  # never trained: the global model
    reply = algo.local_round("a", INFO, {0: g1}, work)
    assert list(reply.models) == [0] and same(reply.models[0], {k: v + 1 for k, v in g1.items()})
    glob, pers = work.calls
    assert (glob["slot"], glob["prox"]) == ("server/0", None) and same(glob["params"], g1)
    assert pers["slot"] == "personal" and same(pers["params"], g1)  # starts as a copy of the received model
    assert same(work.state["personal"], {k: v + 1 for k, v in g1.items()})
    algo.local_round("a", INFO, {0: g2}, work)
    pers2 = work.calls[3]
    assert same(pers2["params"], {k: v + 1 for k, v in g1.items()})  # continues from the kept personal model
    if lam > 0:
        assert pers2["prox"].strength == lam and same(pers2["prox"].center, g2)  # toward the received global
    else:
        assert pers2["prox"] is None
    dep = algo.deploy("a", [g2], work)
    assert dep.model_index is None and dep.slot == "personal" and same(dep.params, {k: v + 2 for k, v in g1.items()})


def test_local_never_shares() -> None:
    algo, init, work = Local(), rand_params(50), FakeWork(n=4)
    with pytest.raises(RuntimeError):
        algo.local_round("a", INFO, {}, work)
    assert algo.init_models(lambda i: rand_params(50 + i)) == [] and algo.num_models == 0
    assert same(algo.deploy("a", [], work).params, init)
    for r in (1, 2):
        reply = algo.local_round("a", INFO, {}, work)
        assert reply.models == {} and reply.losses == () and reply.num_samples == 4
        assert work.calls[-1]["slot"] == "local" and same(work.state["local"], {k: v + r for k, v in init.items()})
    dep = algo.deploy("a", [], work)
    assert dep.params is work.state["local"] and dep.model_index is None and dep.slot == "local"
    assert algo.aggregate(INFO, [], {"a": reply}).models == []


@pytest.mark.parametrize("weights", [[1.0, 2.0, 7.0], [0.5, 0.5, 0.0], [3.0]])
def test_weighted_average_matches_numpy(weights: list) -> None:
    base = rand_params(60)
    ups = [rand_params(61 + i) for i in range(len(weights))]
    got = weighted_average(base, list(zip(ups, weights, strict=True)))
    for name in ("w", "b"):
        expected = np.average([u[name].double().numpy() for u in ups], axis=0, weights=weights)
        np.testing.assert_allclose(got[name].numpy(), expected, rtol=1e-6, atol=1e-6)
        assert got[name].dtype == torch.float32


def test_delta_sum_apply_and_empty_average() -> None:
    base, p = rand_params(70), rand_params(71)
    acc = DeltaSum(base)
    assert same(acc.average(), base)
    acc.add(p, 0.3)
    assert acc.count == 1 and acc.weight == pytest.approx(0.3)
    for scale in (1.0, 2.0):
        got = acc.apply(scale=scale)
        expected = base["w"].double().numpy() + scale * 0.3 * (p["w"].double() - base["w"].double()).numpy()
        np.testing.assert_allclose(got["w"].numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("bad", [
    {"w": torch.zeros(2)},  # missing key
    {"w": torch.zeros(2), "b": torch.zeros(()), "extra": torch.zeros(1)},  # unexpected key
    {"w": torch.zeros(3), "b": torch.zeros(())},  # wrong shape
    {"w": torch.zeros(2), "b": torch.zeros(1)},
])
def test_delta_sum_rejects_mismatched_updates(bad: dict) -> None:
    with pytest.raises(ValueError):
        DeltaSum(rand_params(0)).add(bad, 1.0)
    with pytest.raises(ValueError):
        weighted_average(rand_params(0), [(rand_params(1), 1.0), (bad, 1.0)])


@pytest.mark.parametrize(("name", "params", "cls"), [("fedfew", {"k": 2, "mu": 0.1}, "FedFew"), ("fedavg", {}, "FedAvg"),
                                                     ("fedprox", {"mu_prox": 1}, "FedProx"), ("ifca", {"k": 4}, "IFCA"),
                                                     ("ditto", {"lam": 0.5}, "Ditto"), ("local", {}, "Local"),
                                                     ("fedavg_ft", {"finetune_epochs": 2}, "FedAvgFineTune")])
def test_build_algorithm_valid(name: str, params: dict, cls: str) -> None:
    algo = build_algorithm(name, params, seed=3)
    assert type(algo).__name__ == cls and type(algo) is REGISTRY[name]
    for key, value in params.items():
        assert getattr(algo.options, key) == value


@pytest.mark.parametrize(("name", "params", "needle"), [
    ("fedfw", {}, "got 'fedfw'"),
    ("fedfew", {"kk": 2}, "unknown key 'kk'"),
    ("fedavg", {"mu_prox": 0.1}, "unknown key 'mu_prox'"),
    ("fedfew", {"k": 2.5}, "params.k must be an integer"),
    ("fedfew", {"k": True}, "params.k must be an integer"),
    ("fedfew", {"mu": "small"}, "params.mu must be a number"),
    ("fedfew", {"init": "random"}, "params.init must be one of"),
    ("fedfew", {"mu": 0}, "params.mu must be > 0"),
    ("fedfew", {"k": 2, "sparse_r": 3}, "params.sparse_r must"),
    ("fedfew", {"sparse_threshold": 1.5}, "params.sparse_threshold must"),
    ("ifca", {"k": 0}, "params.k must"),
    ("ditto", {"lam": -1.0}, "params.lam must"),
    ("fedprox", {"mu_prox": None}, "params.mu_prox must"),
    ("fedavg_ft", {"finetune_epochs": 0}, "params.finetune_epochs must"),
])
def test_build_algorithm_errors_name_the_key(name: str, params: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_algorithm(name, params, where="run.toml: [algorithm]")
    assert str(err.value).startswith("run.toml: [algorithm]") and needle in str(err.value)

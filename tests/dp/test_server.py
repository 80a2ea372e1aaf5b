"""ServerDP: clips each site's update, delegates to the inner algorithm, adds noise of the stated std."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from fedfew_med.algorithms import RoundInfo, SiteReply, build_algorithm
from fedfew_med.dp import ServerDP, clip_update


def _info(sites, r=0, mu=0.01):
    return RoundInfo(round=r, num_rounds=10, participants=tuple(sites), site_weight={s: 1 / len(sites) for s in sites}, extras={"mu": mu})


def _model(n=6, value=0.0):
    return {"w": torch.full((n,), value), "b": torch.full((2, 2), value)}


def _reply(base, delta, n, losses=(1.0,), ks=(0,)):
    return SiteReply(num_samples=n, losses=tuple(losses), models={k: {name: t + delta[name] for name, t in base[k].items()} for k in ks})


def test_clip_update_bounds_the_global_norm_and_keeps_small_updates():
    base = _model()
    big = {"w": torch.full((6,), 3.0), "b": torch.full((2, 2), 4.0)}  # ‖Δ‖ = sqrt(54 + 64)
    clipped, norm = clip_update({k: base[k] + big[k] for k in base}, base, 2.0)
    assert norm == pytest.approx(np.sqrt(118))
    assert np.sqrt(sum(float((clipped[k] - base[k]).pow(2).sum()) for k in base)) == pytest.approx(2.0, rel=1e-6)
    torch.testing.assert_close(clipped["w"] / clipped["b"][0, 0], torch.full((6,), 0.75))  # direction kept
    small, _ = clip_update({k: base[k] + 0.01 for k in base}, base, 2.0)
    assert all(torch.equal(small[k], base[k] + 0.01) for k in base)


def test_serverdp_over_fedavg_clips_then_averages_as_np_average():
    inner = build_algorithm("fedavg", {}, seed=0)
    snapshot = copy.deepcopy(inner.__dict__)
    dp = ServerDP(inner, clip=1.0, noise_multiplier=1e-12, seed=0)
    base = [_model()]
    deltas = {"a": 5.0, "b": 0.1, "c": -2.0}
    ns = {"a": 10, "b": 30, "c": 60}
    replies = {s: _reply(base, {"w": torch.full((6,), d), "b": torch.full((2, 2), d)}, ns[s]) for s, d in deltas.items()}
    step = dp.aggregate(_info(deltas), base, replies)
    # clipped per-coordinate delta: d · min(1, 1/(|d|·sqrt(10)))
    clipped = [d * min(1.0, 1.0 / (abs(d) * np.sqrt(10))) for d in deltas.values()]
    expected = np.average(clipped, weights=list(ns.values()))
    torch.testing.assert_close(step.models[0]["w"], torch.full((6,), float(expected)), atol=1e-6, rtol=0)
    assert step.log["server_dp"]["clipped"] == 2 and step.log["server_dp"]["updates"] == 3
    assert inner.__dict__ == snapshot  # the inner algorithm is untouched
    # the inner algorithm's own aggregate of the same clipped replies gives the same models (σ ≈ 0)
    clipped_replies = {s: SiteReply(num_samples=r.num_samples, losses=r.losses, models={0: clip_update(r.models[0], base[0], 1.0)[0]})
                       for s, r in replies.items()}
    plain = inner.aggregate(_info(deltas), base, clipped_replies)
    torch.testing.assert_close(plain.models[0]["w"], step.models[0]["w"], atol=1e-6, rtol=0)


def test_noise_std_is_sigma_times_clip_times_the_largest_weight():
    inner = build_algorithm("fedavg", {}, seed=0)
    sigma, clip = 2.0, 0.5
    dp = ServerDP(inner, clip=clip, noise_multiplier=sigma, seed=3)
    base = [{"w": torch.zeros(40000)}]
    replies = {"a": SiteReply(num_samples=10, losses=(1.0,), models={0: {"w": torch.zeros(40000)}}),
               "b": SiteReply(num_samples=30, losses=(1.0,), models={0: {"w": torch.zeros(40000)}})}
    step = dp.aggregate(_info(["a", "b"]), base, replies)
    expected = sigma * clip * 0.75  # the weight of the larger site, 30/40
    assert step.log["server_dp"]["noise_std"] == [pytest.approx(expected)]
    w = step.models[0]["w"].double()
    assert float(w.mean()) == pytest.approx(0.0, abs=4 * expected / 200)
    assert float(w.std()) == pytest.approx(expected, rel=0.02)
    again = ServerDP(build_algorithm("fedavg", {}, seed=0), clip=clip, noise_multiplier=sigma, seed=3).aggregate(_info(["a", "b"]), base, replies)
    assert torch.equal(again.models[0]["w"], step.models[0]["w"])  # the same seed and round: bit-exact (resume)


@pytest.mark.parametrize("params", [{"preset": "reference"}, {"preset": "default", "reseed_after": 0}])
def test_step_weights_are_read_off_fedfew_without_touching_it(params):
    """Reference step: site i's weight in model k is α_i w_ik; normalised step: α_i w_ik / c_k."""
    inner = build_algorithm("fedfew", {"k": 2, "mu": 0.5, **params}, seed=0)
    dp = ServerDP(inner, clip=10.0, noise_multiplier=1.0, seed=0)
    base = [_model(), _model()]
    losses = {"a": (0.2, 0.9), "b": (0.8, 0.3), "c": (0.5, 0.5)}
    sites = list(losses)
    replies = {s: _reply(base, {"w": torch.ones(6) * 0.1, "b": torch.ones(2, 2) * 0.1}, 20 + 10 * i, losses[s], ks=(0, 1))
               for i, s in enumerate(sites)}
    weights = dp.step_weights(_info(sites, mu=0.5), base, list(replies.items()))
    step = inner.aggregate(_info(sites, mu=0.5), base, replies)
    alpha, w, c = np.array(step.log["alpha"]), np.array(step.log["w"]), np.array(step.log["c"])  # (M,), (M, K), (K,)
    normalised = inner.options.step == "normalized"
    for k in range(2):
        for i, s in enumerate(sites):
            assert weights[k][s] == pytest.approx(alpha[i] * w[i, k] / (c[k] if normalised else 1.0), rel=1e-6)


def test_server_dp_refuses_a_fedfew_that_re_seeds():
    with pytest.raises(ValueError, match="reseed_after = 0"):
        ServerDP(build_algorithm("fedfew", {"k": 2}, seed=0), clip=1.0, noise_multiplier=1.0, seed=0)


def test_probes_work_with_fewer_coordinates_than_sites():
    inner = build_algorithm("fedavg", {}, seed=0)
    dp = ServerDP(inner, clip=1.0, noise_multiplier=1.0, seed=0)
    base = [{"w": torch.zeros(2)}]
    sites = [f"s{i}" for i in range(5)]
    replies = [(s, SiteReply(num_samples=i + 1, losses=(1.0,), models={0: {"w": torch.zeros(2)}})) for i, s in enumerate(sites)]
    weights = dp.step_weights(_info(sites), base, replies)
    assert weights[0] == pytest.approx({s: (i + 1) / 15 for i, s in enumerate(sites)})


def test_streaming_equals_aggregate_and_the_server_ledger_persists():
    base = [_model()]
    replies = {s: _reply(base, {"w": torch.ones(6) * d, "b": torch.ones(2, 2) * d}, 10) for s, d in (("a", 1.0), ("b", -0.5))}
    one = ServerDP(build_algorithm("fedavg", {}, seed=0), clip=1.0, noise_multiplier=1.0, seed=1)
    two = ServerDP(build_algorithm("fedavg", {}, seed=0), clip=1.0, noise_multiplier=1.0, seed=1)
    a = one.aggregate(_info(replies), base, replies)
    agg = two.begin_aggregation(_info(replies), base)
    for s, r in replies.items():
        agg.add(s, r)
    b = agg.result()
    assert all(torch.equal(a.models[0][k], b.models[0][k]) for k in base[0])
    assert one.ledger.history[0].steps == 1 and one.ledger.history[0].kind == "server"
    restored = ServerDP(build_algorithm("fedavg", {}, seed=0), clip=1.0, noise_multiplier=1.0, seed=1)
    restored.load_state_dict(json.loads(json.dumps(one.state_dict())))
    assert restored.ledger.epsilon() == one.ledger.epsilon() > 0
    with pytest.raises(ValueError, match="clip=1.0"):
        ServerDP(build_algorithm("fedavg", {}, seed=0), clip=2.0, noise_multiplier=1.0, seed=1).load_state_dict(one.state_dict())


def test_server_stops_updating_when_its_budget_is_spent():
    dp = ServerDP(build_algorithm("fedavg", {}, seed=0), clip=1.0, noise_multiplier=8.0, seed=0, target_epsilon=2.0)
    base = [_model()]
    replies = {"a": _reply(base, {"w": torch.ones(6), "b": torch.ones(2, 2)}, 10)}
    rounds = 0
    for r in range(100):
        step = dp.aggregate(_info(["a"], r=r), base, replies)
        if "stopped" in step.log["server_dp"]:
            assert all(torch.equal(step.models[0][k], base[0][k]) for k in base[0])
            break
        rounds += 1
    assert 0 < rounds < 100 and dp.ledger.epsilon() <= 2.0


def test_delegation_of_the_policy_hooks():
    inner = build_algorithm("fedfew", {"k": 3, "reseed_after": 0}, seed=0)
    dp = ServerDP(inner, clip=1.0, noise_multiplier=1.0, seed=0)
    assert dp.num_models == 3 and list(dp.models_to_send("a", _info(["a"]))) == [0, 1, 2]
    assert dp.round_extras(0, 10) == inner.round_extras(0, 10)

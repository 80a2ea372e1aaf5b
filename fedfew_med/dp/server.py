"""Server-side (central, site-level) DP as a wrapper around any algorithm.

``ServerDP(inner, clip=C, noise_multiplier=σ, seed=s)`` is an :class:`Algorithm` that
delegates everything to ``inner`` except that, in ``aggregate``, it

1. clips every returned model's update ``Δ_ik = θ_k^(i) − θ_k`` to L2 norm ``C``
   (over all its tensors; ``θ_k^(i) ← θ_k + Δ_ik · min(1, C/‖Δ_ik‖)``),
2. lets ``inner.aggregate`` combine the clipped replies, unchanged,
3. adds ``N(0, (σ · C · c_max,k)²)`` to every coordinate of each new model k, where
   ``c_max,k = max_i |c_ik|`` is the largest weight any one site's delta received in model
   k's step (with ``θ_k ← θ_k + Σ_i c_ik Δ_ik``: FedAvg ``c_ik = lr·n_i/N``, FedFew
   ``c_ik = α_i w_ik``),
4. records ``Mechanism(σ, 1.0, K')`` in its own ledger (K' = models that moved).

Sensitivity and neighbouring relation
-------------------------------------
Unit of privacy: one *site* (site-level DP). Neighbouring rounds differ in one site's
updates being replaced by zero updates ("zero-out", as in DP-FedAvg, McMahan et al. 2018,
and Kairouz et al. 2021), with the participant set, sample counts and reported losses —
hence the weights ``c_ik`` — held fixed (those are public or protected by the site's own
ledger). Model k then moves by at most ``|c_ik| · C`` ≤ ``c_max,k · C``, so the noise
above gives each model a Gaussian mechanism with multiplier σ, and the K models together
are K compositions. Rounds are not subsampled for accounting (``sample_rate = 1``): the
participation draw is seeded from the public run seed, so it gives no amplification.
This protects the *released* models against inference about a site; the server itself is
trusted (it sees the clipped updates).

The weights ``c_ik`` are read off the inner algorithm without changing it: every built-in
aggregation is linear in the deltas with weights that do not depend on them, so one extra
inner aggregation of probe replies — zero base, site i's update = 1 at coordinate i, the
replies' losses and counts unchanged — returns ``c_ik`` at coordinate i of model k (one
probe per block of sites when a model has fewer coordinates than there are sites).
Streaming is kept: replies are clipped and forwarded as they arrive; only their small
metadata (counts, losses, which models) is kept for the probe. (Non-linear aggregators,
e.g. a median, are outside this wrapper's guarantee.)

Noise comes from a generator seeded by ``(seed, "server-dp", round)``: resumable bit for
bit. The ledger's state is JSON (:meth:`ServerDP.state_dict`), for the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import torch

from fedfew_med.algorithms.base import (
    Aggregation,
    Algorithm,
    Deployment,
    LocalWork,
    Params,
    RoundInfo,
    ServerStep,
    SiteReply,
)
from fedfew_med.dp.ledger import Mechanism, PrivacyLedger
from fedfew_med.training import derive_seed


def clip_update(params: Params, base: Params, clip: float) -> tuple[Params, float]:
    """``base + Δ·min(1, clip/‖Δ‖)`` with ``Δ = params − base`` (global L2 over all tensors), and ‖Δ‖."""
    deltas = {k: params[k].to(torch.float64) - base[k].to(torch.float64) for k in sorted(base)}  # sorted: the
    norm = math.sqrt(sum(float((d * d).sum()) for d in deltas.values()))  # same float sum whatever the dict order
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: (base[k].to(torch.float64) + scale * deltas[k]).to(base[k].dtype) for k in base}, norm


class ServerDP(Algorithm):
    """Clip, aggregate with ``inner``, add Gaussian noise; see the module docstring.

    Parameters
    ----------
    inner
        Any algorithm whose aggregation is linear in the deltas (all built-in ones). Not modified.
    clip
        C: L2 bound of each site's update of each model.
    noise_multiplier
        σ: noise std on model k is ``σ · C · c_max,k``.
    seed
        Run seed (noise stream per round).
    delta, accountant, target_epsilon
        The server ledger's δ, accountant and (optional) budget; once a round would exceed
        the budget the server stops updating (returns the models unchanged).
    """

    name: ClassVar[str] = "server_dp"

    def __init__(
        self,
        inner: Algorithm,
        *,
        clip: float,
        noise_multiplier: float,
        seed: int,
        delta: float = 1e-5,
        accountant: str = "rdp",
        target_epsilon: float | None = None,
    ) -> None:
        if not clip > 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        if not noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
        if getattr(inner, "reseeds", False):  # a re-seeded model is one site's update: not linear, not clipped+noised
            raise ValueError(
                f"server DP cannot wrap {inner.name} with re-seeding: set [algorithm.params] reseed_after = 0"
            )
        self.inner = inner
        self.clip = float(clip)
        self.noise_multiplier = float(noise_multiplier)
        self.seed = seed
        self.ledger = PrivacyLedger(delta=delta, accountant=accountant, target_epsilon=target_epsilon, name="server")

    # ------------------------------------------------------------ delegated policy
    @property
    def num_models(self) -> int:
        return self.inner.num_models

    def init_models(self, make_init: Callable[[int], Params]) -> list[Params]:
        return self.inner.init_models(make_init)

    def round_extras(self, round_idx: int, num_rounds: int) -> dict[str, float]:
        return self.inner.round_extras(round_idx, num_rounds)

    def models_to_send(self, site: str, info: RoundInfo) -> Sequence[int]:
        return self.inner.models_to_send(site, info)

    def local_round(self, site: str, info: RoundInfo, models: Mapping[int, Params], work: LocalWork) -> SiteReply:
        return self.inner.local_round(site, info, models, work)

    def deploy(self, site: str, models: Sequence[Params], work: LocalWork) -> Deployment:
        return self.inner.deploy(site, models, work)

    def commit(self, step: ServerStep) -> None:
        self.inner.commit(step)

    def server_state(self) -> dict[str, Any]:
        return self.inner.server_state()

    def load_server_state(self, state: Mapping[str, Any]) -> None:
        self.inner.load_server_state(state)

    # ------------------------------------------------------------ the DP aggregation
    def begin_aggregation(self, info: RoundInfo, models: list[Params]) -> Aggregation:
        return ServerDPAggregation(self, info, models)

    def step_weights(self, info: RoundInfo, models: list[Params], replies: Sequence[tuple[str, SiteReply]]) -> list[dict[str, float]]:
        """``c_ik`` of every site i in each model k's step, read off the inner aggregation by linear probes.

        Only ``num_samples``, ``losses``, ``info`` and the *keys* of ``models`` of the replies are used.
        """
        out: list[dict[str, float]] = [{} for _ in models]
        if not replies or not models:
            return out
        size = min(sum(t.numel() for t in m.values()) for m in models)  # coordinates available per probe
        if size < 1:
            raise ValueError("server DP needs models with at least one parameter")
        for start in range(0, len(replies), size):
            block = replies[start : start + size]  # these sites get a one-hot coordinate, the others a zero delta
            zero = [{k: torch.zeros_like(v, dtype=torch.float64) for k, v in m.items()} for m in models]
            agg = self.inner.begin_aggregation(info, zero)
            for i, (site, reply) in enumerate(replies):
                coord = i - start if start <= i < start + size else None
                probe_models = {k: _one_hot(models[k], coord) for k in reply.models}
                agg.add(site, replace(reply, models=probe_models))
            step = agg.result()
            for k, new in enumerate(step.models):
                flat = torch.cat([new[name].reshape(-1).to(torch.float64) for name in models[k]])
                for j, (site, reply) in enumerate(block):
                    if k in reply.models:
                        out[k][site] = float(flat[j])
        return out

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (the server ledger) for the checkpoint."""
        return {"ledger": self.ledger.state_dict(), "clip": self.clip, "noise_multiplier": self.noise_multiplier}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the server ledger (clip and σ must match the configured ones)."""
        if state.get("clip") != self.clip or state.get("noise_multiplier") != self.noise_multiplier:
            raise ValueError(
                f"server DP state was made with clip={state.get('clip')}, noise_multiplier={state.get('noise_multiplier')}; "
                f"this run uses clip={self.clip}, noise_multiplier={self.noise_multiplier}"
            )
        self.ledger.load_state_dict(state["ledger"])


class ServerDPAggregation(Aggregation):
    """One DP server step: clip each reply as it arrives, forward it, noise the result."""

    def __init__(self, owner: ServerDP, info: RoundInfo, models: list[Params]) -> None:
        self.owner = owner
        self.info = info
        self.models = models
        self.inner = owner.inner.begin_aggregation(info, models)
        self.skeletons: list[tuple[str, SiteReply]] = []  # replies without their tensors, for the weight probe
        self.norms: list[float] = []

    def add(self, site: str, reply: SiteReply) -> None:
        clipped = {}
        for k, params in reply.models.items():
            clipped[k], norm = clip_update(params, self.models[k], self.owner.clip)
            self.norms.append(norm)
        self.inner.add(site, replace(reply, models=clipped))
        self.skeletons.append((site, replace(reply, models={k: {} for k in reply.models})))

    def result(self) -> ServerStep:
        o = self.owner
        step = self.inner.result()
        weights = o.step_weights(self.info, self.models, self.skeletons)
        c_max = [max((abs(w) for w in wk.values()), default=0.0) for wk in weights]
        moved = sum(1 for c in c_max if c > 0)
        log: dict[str, Any] = {
            "clip": o.clip,
            "noise_multiplier": o.noise_multiplier,
            "noise_std": [o.noise_multiplier * o.clip * c for c in c_max],
            "clipped": sum(1 for n in self.norms if n > o.clip),
            "updates": len(self.norms),
        }
        mechanisms = [Mechanism(o.noise_multiplier, 1.0, moved, kind="server", round=self.info.round, label="aggregate")] if moved else []
        if not o.ledger.can_afford(mechanisms):
            log.update(stopped="server privacy budget exhausted", epsilon=o.ledger.epsilon(), delta=o.ledger.delta)
            return ServerStep(models=[{k: v.clone() for k, v in m.items()} for m in self.models], log={"server_dp": log})
        o.ledger.spend(mechanisms)
        gen = torch.Generator().manual_seed(derive_seed(o.seed, "server-dp", self.info.round))
        noisy: list[Params] = []
        for k, new in enumerate(step.models):
            std = o.noise_multiplier * o.clip * c_max[k]
            if std > 0:  # drawn in sorted name order: a model reloaded from a checkpoint gets the same noise
                noise = {n: torch.normal(0.0, std, size=new[n].shape, generator=gen, dtype=torch.float64) for n in sorted(new)}
                new = {n: t + noise[n].to(t.dtype) for n, t in new.items()}
            noisy.append(new)
        log.update(epsilon=o.ledger.epsilon(), delta=o.ledger.delta)
        return ServerStep(models=noisy, log={**step.log, "server_dp": log})


def _one_hot(like: Params, coord: int | None) -> Params:
    """Float64 tensors shaped like ``like``, all zero but coordinate ``coord`` of the flattened whole (if given)."""
    flat = torch.zeros(sum(t.numel() for t in like.values()), dtype=torch.float64)
    if coord is not None:
        flat[coord] = 1.0
    out, offset = {}, 0
    for name, t in like.items():
        out[name] = flat[offset : offset + t.numel()].reshape(t.shape)
        offset += t.numel()
    return out

"""Tiny DP fixtures: a 16×16 synthetic site, a DP-ready classifier, a site work factory."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import pytest

from fedfew_med.config import TrainingConfig
from fedfew_med.data import SiteData, SyntheticOptions, make_synthetic_federation
from fedfew_med.dp import (
    Calibration,
    DPSiteWork,
    PrivacyLedger,
    PrivacyOptions,
    RdpCurves,
    calibrate,
    make_dp_ready,
    poisson_plan,
)
from fedfew_med.models import buffers_of, build_model, parameters_of
from fedfew_med.training import SiteState, SiteWork

CURVES = RdpCurves()  # one RDP memo for the test session, as a run shares one between its sites


def tiny_site(n: int = 20, *, seed: int = 0, task: str = "classification") -> SiteData:
    opts = SyntheticOptions(num_sites=1, image_size=16, train_min=n, train_max=n, val_fraction=0.0, test_per_site=4, seed=seed, task=task)  # type: ignore[arg-type]
    return make_synthetic_federation(opts)[0]


def tiny_net(task: str = "classification"):
    name, strides = ("classifier", (2, 2)) if task == "classification" else ("unet", (2,))
    return make_dp_ready(
        build_model(name, {"channels": (4, 8), "strides": strides}, task=task, in_channels=1, num_classes=2, spatial_dims=2, image_size=16, seed=5)
    )


@cache  # calibration is deterministic; tests reuse a few plans
def make_calibration(n: int, *, batch_size: int, options: PrivacyOptions, rounds: int = 5, trains_per_round: int = 1, epochs: int = 1) -> Calibration:
    q, s = poisson_plan(n, batch_size)
    return calibrate(options, sample_rate=q, steps_per_round=trains_per_round * epochs * s, rounds=rounds,
                     loss_releases_per_round=trains_per_round, steps_per_epoch=s, curves=CURVES)


WorkFactory = Callable[..., DPSiteWork]


@pytest.fixture
def dp_work() -> WorkFactory:
    """``dp_work(n=20, seed=0, round_idx=0, lr=0.1, batch_size=8, epochs=1, options=None, ledger=None, plain=False)``."""

    def factory(n: int = 20, *, seed: int = 0, round_idx: int = 0, lr: float = 0.1, batch_size: int = 8, epochs: int = 1,
                options: PrivacyOptions | None = None, ledger: PrivacyLedger | None = None, plain: bool = False,
                rounds: int = 5, task: str = "classification"):
        site = tiny_site(n, task=task)
        net = tiny_net(task)
        training = TrainingConfig(lr=lr, batch_size=batch_size, local_epochs=epochs)
        base = SiteWork(data=site, network=net, initial_buffers=buffers_of(net), state=SiteState(), training=training,
                        seed=seed, round_idx=round_idx)
        base.initial_params = parameters_of(net)  # type: ignore[attr-defined]
        if plain:
            return base
        opts = options or PrivacyOptions(epsilon=8.0, delta=1e-5)
        cal = make_calibration(n, batch_size=batch_size, options=opts, rounds=rounds, epochs=epochs)
        led = ledger if ledger is not None else PrivacyLedger(delta=opts.delta, accountant=opts.accountant, target_epsilon=opts.epsilon, name=site.name, curves=CURVES)
        work = DPSiteWork.wrap(base, options=opts, calibration=cal, ledger=led)
        work.initial_params = base.initial_params  # type: ignore[attr-defined]
        return work

    return factory

"""Cost of DP local training: time per local epoch with DP-SGD (hooks, ghost) over time without DP.

:func:`benchmark_epoch_times` times, on a federation's own sites and network, one local epoch
of plain SGD (``SiteWork.train``) and one of DP-SGD (:func:`~fedfew_med.dp.engine.dp_train`) in
each clipping mode, interleaved (none, hooks, ghost, none, hooks, ...) so that a busy machine
slows every mode alike; the ratios of the medians are what to compare. The DP epochs use the
sample rate and steps the site would use (Poisson sampling, ``ceil(n / batch)`` steps) and a
noise multiplier of 1 (σ does not change the cost). Nothing is accounted: this is a timing.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from fedfew_med.config import FederationConfig, load_federation
from fedfew_med.data import build_sites
from fedfew_med.dp.calibrate import poisson_plan
from fedfew_med.dp.engine import dp_train
from fedfew_med.dp.loss_channel import PerSampleLoss
from fedfew_med.dp.networks import make_dp_ready
from fedfew_med.models import buffers_of, build_model, parameters_of
from fedfew_med.training import SiteState, SiteWork, derive_seed

MODES = ("none", "hooks", "ghost")


def benchmark_epoch_times(config: FederationConfig | str | Path, *, epochs: int = 3, max_grad_norm: float = 1.0) -> dict[str, Any]:
    """Median seconds of one local epoch over all sites of ``config``, without DP and with DP (hooks, ghost).

    Parameters
    ----------
    config
        A federation config or its TOML file (e.g. ``site_configs/demo_federation.toml``).
    epochs
        Timed repetitions of each mode (interleaved); the first, untimed pass warms every mode up.
    max_grad_norm
        Clip norm of the DP epochs.

    Returns
    -------
    dict
        ``{"seconds": {mode: median s per epoch (all sites)}, "ratios": {"hooks": .., "ghost": ..},
        "ratios_min": (the same from the fastest epoch of each mode: on a busy machine the least
        disturbed estimate), "samples": {mode: [s, ...]}, "epochs": epochs, "sites": M, "records": N,
        "model": name}``.
    """
    cfg = config if isinstance(config, FederationConfig) else load_federation(config)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    sites = build_sites(cfg.data, source=cfg.source)
    first = sites[0]
    size = int(first.splits["train"][0]["image"].shape[-1]) if first.spatial_dims else 0
    net = make_dp_ready(build_model(cfg.model.name, cfg.model.params, task=first.task, in_channels=first.in_channels,
                                    num_classes=first.num_classes, spatial_dims=first.spatial_dims, image_size=size,
                                    seed=derive_seed(cfg.run.seed, "init", 0)))
    params, buffers, t = parameters_of(net), buffers_of(net), cfg.training

    def epoch(mode: str, rep: int) -> float:
        start = time.perf_counter()
        for site in sites:
            if mode == "none":
                work = SiteWork(data=site, network=net, initial_buffers=buffers, state=SiteState(), training=t, seed=rep,
                                round_idx=0)
                work.train(params, slot="bench", epochs=1)
                continue
            q, steps = poisson_plan(site.size("train"), t.batch_size)
            net.load_state_dict({**params, **buffers})
            dp_train(net, site.splits["train"], loss_fn=PerSampleLoss(site.task), epochs=1, sample_rate=q, steps_per_epoch=steps,
                     noise_multiplier=1.0, max_grad_norm=max_grad_norm, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                     grad_sample_mode=mode, sampling_generator=torch.Generator().manual_seed(rep),
                     noise_generator=torch.Generator().manual_seed(rep + 1))
        return time.perf_counter() - start

    for mode in MODES:  # warm-up: first calls pay for lazy initialisation
        epoch(mode, 0)
    samples: dict[str, list[float]] = {m: [] for m in MODES}
    for rep in range(epochs):
        for mode in MODES:
            samples[mode].append(epoch(mode, rep + 1))
    seconds = {m: statistics.median(v) for m, v in samples.items()}
    return {
        "seconds": seconds,
        "ratios": {m: seconds[m] / seconds["none"] for m in ("hooks", "ghost")},
        "ratios_min": {m: min(samples[m]) / min(samples["none"]) for m in ("hooks", "ghost")},
        "samples": samples,
        "epochs": epochs,
        "sites": len(sites),
        "records": sum(s.size("train") for s in sites),
        "model": cfg.model.name,
    }

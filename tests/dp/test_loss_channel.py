"""The loss channel: clipping, the noise std it promises, determinism; per-sample losses match the task loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfew_med.dp import PerSampleLoss, loss_mechanism, per_sample_losses, private_losses
from fedfew_med.training import task_loss
from tests.dp.conftest import tiny_net, tiny_site


def test_noise_std_on_the_mean_is_sigma_times_clip_over_n():
    n, clip, sigma = 50, 2.0, 3.0
    losses = torch.full((1, n), 1.0)  # true mean 1.0, inside [0, clip]
    gen = torch.Generator().manual_seed(0)
    draws = np.array([private_losses(losses, clip=clip, noise_multiplier=sigma, generator=gen, clamp=False)[0] for _ in range(4000)])
    expected_std = sigma * clip / n  # 0.12
    assert draws.mean() == pytest.approx(1.0, abs=4 * expected_std / np.sqrt(4000))
    assert draws.std() == pytest.approx(expected_std, rel=0.05)


def test_losses_are_clipped_to_zero_and_clip_before_averaging():
    losses = torch.tensor([[10.0, 10.0, -1.0, 1.0], [0.5, 0.5, 0.5, float("inf")]])  # (K=2, n=4)
    gen = torch.Generator().manual_seed(0)
    out = private_losses(losses, clip=2.0, noise_multiplier=1e-9, generator=gen)
    assert out == pytest.approx(((2 + 2 + 0 + 1) / 4, (0.5 * 3 + 2) / 4), abs=1e-6)


def test_clamping_is_post_processing_into_the_loss_range():
    gen = torch.Generator().manual_seed(1)
    out = private_losses(torch.zeros(3, 5), clip=1.0, noise_multiplier=50.0, generator=gen)
    assert all(0.0 <= v <= 1.0 for v in out) and len(out) == 3


def test_same_generator_seed_gives_the_same_release_and_the_global_rng_is_untouched():
    torch.manual_seed(7)
    before = torch.random.get_rng_state()
    x = torch.rand(3, 40, generator=torch.Generator().manual_seed(3))
    a = private_losses(x, clip=1.0, noise_multiplier=2.0, generator=torch.Generator().manual_seed(9))
    b = private_losses(x, clip=1.0, noise_multiplier=2.0, generator=torch.Generator().manual_seed(9))
    c = private_losses(x, clip=1.0, noise_multiplier=2.0, generator=torch.Generator().manual_seed(10))
    assert a == b != c and torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize("bad", [dict(clip=0.0), dict(noise_multiplier=0.0)])
def test_a_release_without_noise_or_clip_is_refused(bad):
    with pytest.raises(ValueError):
        private_losses(torch.ones(1, 3), generator=torch.Generator(), **{"clip": 1.0, "noise_multiplier": 1.0, **bad})


def test_loss_mechanism_is_a_full_data_gaussian():
    m = loss_mechanism(12.0, 3, round_idx=2, label="server/1:train")
    assert (m.noise_multiplier, m.sample_rate, m.steps, m.kind, m.round) == (12.0, 1.0, 3, "loss", 2)


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_per_sample_losses_average_to_the_training_loss(task):
    site, net = tiny_site(12, task=task), tiny_net(task)
    per = per_sample_losses(net, site.splits["train"], PerSampleLoss(task), batch_size=5)
    assert per.shape == (12,)
    ds = site.splits["train"]
    x = torch.stack([ds[i]["image"] for i in range(12)])
    y = torch.stack([ds[i]["label"] for i in range(12)])
    with torch.no_grad():
        expected = float(task_loss(task)(net(x), y))
    assert float(per.mean()) == pytest.approx(expected, rel=1e-5)

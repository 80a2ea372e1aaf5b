"""Local training: seeds derived without global state, the proximal term, eval-mode losses."""

from __future__ import annotations

import pytest
import torch

from fedfew_med.algorithms import Prox
from fedfew_med.config import ConfigError, TrainingConfig
from fedfew_med.data import SyntheticOptions, make_synthetic_federation
from fedfew_med.models import buffers_of, build_model, parameters_of
from fedfew_med.training import SiteState, SiteWork, derive_seed


def _work(lr=0.1, seed=0, round_idx=0, epochs=1):
    site = make_synthetic_federation(SyntheticOptions(num_sites=1, image_size=16, train_min=20, train_max=20, test_per_site=8))[0]
    net = build_model("classifier", {"channels": (4, 8)}, task="classification", in_channels=1, num_classes=2,
                      spatial_dims=2, image_size=16, seed=5)
    work = SiteWork(data=site, network=net, initial_buffers=buffers_of(net), state=SiteState(),
                    training=TrainingConfig(lr=lr, batch_size=8, local_epochs=epochs), seed=seed, round_idx=round_idx)
    return work, parameters_of(net)


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(1, 2, "site", "server/0") == derive_seed(1, 2, "site", "server/0")
    seeds = {derive_seed(1, r, "site", slot) for r in range(3) for slot in ("server/0", "server/1", "personal")}
    assert len(seeds) == 9


def test_training_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    work, params = _work()
    a = work.train(params, slot="server/0")
    b = _work()[0].train(params, slot="server/0")
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    c = _work(round_idx=1)[0].train(params, slot="server/0")  # another round shuffles differently
    assert not all(torch.equal(a.params[k], c.params[k]) for k in a.params)
    assert a.steps == 3 and a.samples == 20  # 20 records, batch 8


def test_input_params_are_not_modified():
    work, params = _work()
    snapshot = {k: v.clone() for k, v in params.items()}
    work.train(params, slot="server/0")
    assert all(torch.equal(params[k], snapshot[k]) for k in params)


def test_prox_term_pulls_toward_centre():
    """With a huge proximal strength and lr small enough, one step moves θ toward the centre."""
    work, params = _work(lr=0.001)
    centre = {k: v + 1.0 for k, v in params.items()}
    free = work.train(params, slot="a")
    pulled = _work(lr=0.001)[0].train(params, slot="a", prox=Prox(center=centre, strength=100.0))
    dist = lambda p: sum(float(((p[k] - centre[k]) ** 2).sum()) for k in p)  # noqa: E731
    assert dist(pulled.params) < dist(free.params)
    # gradient of strength/2 ||θ − c||² is strength (θ − c) = −100 per coordinate; 3 SGD steps of lr 1e-3
    k = "final.weight" if "final.weight" in params else next(iter(params))
    assert float((pulled.params[k] - free.params[k]).mean()) == pytest.approx(0.1 * 3 * 1.0, rel=0.2)


def test_eval_loss_matches_manual_cross_entropy():
    work, params = _work()
    net = work.network
    net.load_state_dict(params, strict=False)
    net.eval()
    ds = work.data.splits["train"]
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    y = torch.stack([ds[i]["label"] for i in range(len(ds))])
    with torch.no_grad():
        expected = float(torch.nn.functional.cross_entropy(net(x), y))
    assert work.loss(params, slot="server/0") == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # hand count, 28 × 28 × 1 inputs, 10 classes, fc 512:
        # conv1 32·1·25 + 32, conv2 64·32·25 + 64, fc1 64·s·s·512 + 512, fc2 512·10 + 10 with s = 4 (no padding) or 7 (padded)
        ("pflcnn", 832 + 51264 + (64 * 4 * 4 * 512 + 512) + 5130),  # 582,026: the pFL papers' CNN
        ("smallcnn", 832 + 51264 + (64 * 7 * 7 * 512 + 512) + 5130),  # 1,663,370: McMahan et al. 2017's
    ],
)
def test_named_cnn_parameter_counts(name, expected):
    net = build_model(name, {}, task="classification", in_channels=1, num_classes=10, spatial_dims=2, image_size=28, seed=0)
    assert sum(p.numel() for p in net.parameters()) == expected
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert {"pflcnn": 582_026, "smallcnn": 1_663_370}[name] == expected


def test_pflcnn_refuses_an_input_too_small_for_its_unpadded_convolutions():
    with pytest.raises(ConfigError, match="too small"):
        build_model("pflcnn", {}, task="classification", in_channels=1, num_classes=2, spatial_dims=2, image_size=12, seed=0)


@pytest.mark.parametrize(
    ("name", "task", "listed"),
    [
        ("classifier", "tabular", "networks for 'tabular': logreg, mlp"),
        ("unet", "classification", "networks for 'classification': classifier, densenet121, pflcnn, resnet18, smallcnn"),
        ("mlp", "segmentation", "networks for 'segmentation': basicunet, unet"),
    ],
)
def test_a_network_for_another_task_is_refused_with_the_networks_that_fit(name, task, listed):
    with pytest.raises(ConfigError, match=f"is a .* network, but the sites' task is '{task}'") as err:
        build_model(name, {}, task=task, in_channels=1, num_classes=2, spatial_dims=2, image_size=16, seed=0)
    assert str(err.value).endswith(listed)

"""[training] channels_last: the same training in another memory layout, and the pool-before-ReLU SmallCNN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedfew_med.config import ConfigError, TrainingConfig, federation_from_dict
from fedfew_med.data import SyntheticOptions, make_synthetic_federation
from fedfew_med.devices import memory_format, to_device
from fedfew_med.models import SmallCNN, buffers_of, build_model, parameters_of
from fedfew_med.simulation import run
from fedfew_med.training import SiteState, SiteWork
from tests.conftest import tiny_dict

CPU = torch.device("cpu")


def _net(name: str, *, dims: int = 2, task: str = "classification", size: int = 16) -> nn.Module:
    params = {"channels": [4, 8], "strides": [2] if name == "unet" else [2, 2]} if name in ("classifier", "unet") else {}
    return build_model(name, params, task=task, in_channels=1, num_classes=2, spatial_dims=dims, image_size=size, seed=0)


@pytest.mark.parametrize(
    ("name", "dims", "task", "asked", "expected"),
    [
        ("smallcnn", 2, "classification", True, torch.channels_last),
        ("classifier", 2, "classification", True, torch.channels_last),
        ("unet", 3, "segmentation", True, torch.channels_last_3d),
        ("logreg", 1, "tabular", True, None),  # no convolution: nothing to lay out
        ("smallcnn", 2, "classification", False, None),
        ("unet", 3, "segmentation", False, None),
    ],
)
def test_memory_format_follows_the_rank_of_the_convolutions(name, dims, task, asked, expected):
    if name == "logreg":
        net = build_model("logreg", {}, task="tabular", in_channels=13, num_classes=2, spatial_dims=1, image_size=1, seed=0)
    else:
        net = _net(name, dims=dims, task=task)
    assert memory_format(net, asked) == expected


@pytest.mark.parametrize(
    ("shape", "fmt", "channels_last_after"),
    [
        ((2, 3, 8, 8), torch.channels_last, True),
        ((2, 3, 4, 4, 4), torch.channels_last_3d, True),
        ((2, 3, 4, 4, 4), torch.channels_last, False),  # a batch of another rank keeps its layout
        ((2, 13), torch.channels_last, False),
        ((2, 3, 8, 8), None, False),
    ],
)
def test_to_device_lays_out_only_batches_of_the_formats_rank(shape, fmt, channels_last_after):
    x = torch.randn(*shape)
    y = to_device(x, CPU, fmt)
    assert torch.equal(x, y)
    if channels_last_after:
        assert y.is_contiguous(memory_format=fmt) and not y.is_contiguous()
    else:
        assert y.is_contiguous()


@pytest.fixture(scope="module")
def site():
    return make_synthetic_federation(SyntheticOptions(num_sites=1, image_size=16, train_min=30, train_max=30, test_per_site=10))[0]


@pytest.fixture(scope="module")
def seg_site():
    options = SyntheticOptions(num_sites=1, image_size=16, train_min=12, train_max=12, test_per_site=6, task="segmentation")
    return make_synthetic_federation(options)[0]


def _work(site, name: str, channels_last: bool, task: str = "classification") -> SiteWork:
    net = _net(name, task=task)
    training = TrainingConfig(lr=0.05, batch_size=8, momentum=0.9, channels_last=channels_last)
    return SiteWork(data=site, network=net, initial_buffers=buffers_of(net), state=SiteState(), training=training, seed=5, round_idx=1)


@pytest.mark.parametrize(("name", "task"), [("smallcnn", "classification"), ("classifier", "classification"), ("unet", "segmentation")])
def test_channels_last_trains_as_the_default_layout_and_returns_contiguous_tensors(site, seg_site, name, task):
    data = seg_site if task == "segmentation" else site
    start = parameters_of(_net(name, task=task))
    default, fast = _work(data, name, False, task), _work(data, name, True, task)
    assert any(not p.is_contiguous() for p in fast.network.parameters())  # the scratch network really is channels-last
    a, b = default.train(start, slot="s"), fast.train(start, slot="s")
    assert a.steps == b.steps and a.loss == pytest.approx(b.loss, rel=1e-4)
    for n in a.params:
        assert b.params[n].is_contiguous()  # what leaves a site does not depend on the layout
        torch.testing.assert_close(b.params[n], a.params[n], rtol=1e-4, atol=1e-5)
    assert fast.loss(b.params, slot="s", split="test") == pytest.approx(default.loss(a.params, slot="s", split="test"), rel=1e-4)
    pa, _ = default.predict(a.params, slot="s")
    pb, _ = fast.predict(b.params, slot="s")
    torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5)


def _fed(channels_last: bool, **extra):
    d = tiny_dict(run={"rounds": 2}, training={"channels_last": channels_last}, model={"name": "smallcnn", "params": {"hidden": 32}})
    d.update(extra)
    return federation_from_dict(d, source="tiny.toml")


def test_a_channels_last_federation_matches_the_default_and_resumes_to_the_bit(tmp_path):
    default = run(_fed(False), run_dir=tmp_path / "a")
    fast = run(_fed(True), run_dir=tmp_path / "b")
    run(_fed(True), run_dir=tmp_path / "c", stop_after=1)
    resumed = run(_fed(True), run_dir=tmp_path / "c", resume=True)
    for x, y, z in zip(default.models, fast.models, resumed.models, strict=True):
        for n in x:
            torch.testing.assert_close(y[n], x[n], rtol=1e-3, atol=1e-4)
            assert torch.equal(y[n], z[n])
    assert fast.summary["summary"]["mean"] == pytest.approx(default.summary["summary"]["mean"], abs=0.02)


def test_channels_last_is_not_part_of_the_digest():
    assert _fed(True).digest() == _fed(False).digest()
    assert "channels_last" not in _fed(False).identity()["training"]


def test_channels_last_refuses_dp_sites(tmp_path):
    with pytest.raises(ConfigError, match=r"tiny.toml: \[training\].channels_last cannot be used when a site trains with DP"):
        run(_fed(True, privacy={"epsilon": 8.0}), run_dir=tmp_path / "r")


def test_channels_last_must_be_a_boolean():
    with pytest.raises(ConfigError, match=r"tiny.toml.*channels_last.*'yes'"):
        _fed("yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("padding", [0, 2])
def test_smallcnn_pools_before_relu_to_the_bit_of_the_papers_order(padding):
    """ReLU and max-pooling commute: the papers' conv → ReLU → pool, built here, gives the same bits and gradients."""
    net = SmallCNN(1, 10, image_size=28, hidden=64, padding=padding)
    c1, c2 = net.features[0], net.features[3]
    head = net.head
    papers = nn.Sequential(c1, nn.ReLU(), nn.MaxPool2d(2), c2, nn.ReLU(), nn.MaxPool2d(2), head)
    x = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    grads = []
    for model in (net, papers):
        model.zero_grad()
        out = model(x)
        nn.functional.cross_entropy(out, y).backward()
        grads.append((out.detach().clone(), [p.grad.clone() for p in net.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1], strict=True))

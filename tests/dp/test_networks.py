"""Every named network of the table in fedfew_med/dp/networks.py takes a DP-SGD step (hooks and ghost)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedfew_med.data.synthetic import TensorDictDataset
from fedfew_med.dp import (
    NotDPReadyError,
    PerSampleLoss,
    check_dp_ready,
    dp_problems,
    dp_train,
    make_dp_ready,
    resolve_grad_sample_mode,
)
from fedfew_med.models import TASKS, build_model, model_names

# name -> (in_channels, spatial_dims, image_size, auto mode)
SHAPES = {
    "classifier": (1, 2, 16, "hooks"),
    "smallcnn": (1, 2, 16, "ghost"),
    "pflcnn": (1, 2, 28, "ghost"),
    "densenet121": (1, 2, 32, "hooks"),
    "resnet18": (1, 2, 32, "hooks"),
    "unet": (1, 2, 16, "hooks"),
    "basicunet": (1, 2, 32, "hooks"),
    "logreg": (8, 0, 1, "ghost"),
    "mlp": (8, 0, 1, "ghost"),
}


def _net(name: str) -> nn.Module:
    c, d, s, _ = SHAPES[name]
    return build_model(name, {}, task=TASKS[name], in_channels=c, num_classes=2, spatial_dims=d, image_size=s, seed=0)


def _data(name: str, n: int = 3) -> TensorDictDataset:
    c, d, s, _ = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn((n, c, *([s] * d)), generator=g) if d else torch.randn((n, c), generator=g)
    if TASKS[name] == "segmentation":
        y = torch.randint(0, 2, (n, 1, *([s] * d)), generator=g)
    else:
        y = torch.randint(0, 2, (n,), generator=g)
    return TensorDictDataset(x, y)


def test_the_table_covers_every_named_network():
    assert sorted(SHAPES) == model_names()


BIG = {"densenet121", "resnet18", "basicunet"}  # several seconds each on 2 cores: they run with -m slow (CI runs both)
CASES = [pytest.param(name, mode, marks=[pytest.mark.slow] if name in BIG else [])
         for name in sorted(SHAPES) for mode in ("hooks", "ghost")]


@pytest.mark.parametrize("name, mode", CASES)
def test_one_dp_step_per_network(name, mode):
    net = make_dp_ready(_net(name))
    assert dp_problems(net) == []
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    stats = dp_train(net, _data(name), loss_fn=PerSampleLoss(TASKS[name]), epochs=1, sample_rate=1.0, steps_per_epoch=1,
                     noise_multiplier=1.0, max_grad_norm=1.0, lr=0.01, grad_sample_mode=mode,
                     sampling_generator=torch.Generator().manual_seed(0), noise_generator=torch.Generator().manual_seed(1))
    assert stats.steps == 1 and stats.empty_batches == 0
    after = dict(net.named_parameters())
    assert set(after) == set(before) and all(torch.isfinite(p).all() for p in after.values())
    assert all(not torch.equal(before[k], after[k]) for k in before)  # noise reaches every parameter
    assert resolve_grad_sample_mode("auto", net) == SHAPES[name][3]


@pytest.mark.parametrize("name, batchnorms", [("densenet121", 121), ("resnet18", 20)])
def test_batchnorm_becomes_groupnorm_with_the_same_parameters(name, batchnorms):
    net = _net(name)
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()) == batchnorms
    assert dp_problems(net)
    fixed = make_dp_ready(net)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fixed.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in fixed.modules()) == batchnorms
    assert {k: v.shape for k, v in fixed.named_parameters()} == {k: v.shape for k, v in net.named_parameters()}
    assert list(fixed.buffers()) == []  # no running statistics left to share
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())  # the input is untouched


def test_inplace_activations_are_switched_off():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    assert any("in-place" in p for p in dp_problems(net))
    fixed = make_dp_ready(net)
    assert fixed[1].inplace is False and net[1].inplace is True


def test_batchnorm_without_parameters_is_caught_and_fixed_too():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False))  # Opacus' validator skips it (no parameters)
    assert any("mixes the records" in p for p in dp_problems(net))
    fixed = make_dp_ready(net)
    assert isinstance(fixed[1], nn.GroupNorm) and dp_problems(fixed) == []


def test_check_dp_ready_names_the_problem():
    with pytest.raises(NotDPReadyError, match="is not DP-ready .*BatchNorm"):
        check_dp_ready(_net("resnet18"))

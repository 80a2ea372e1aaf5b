"""Networks by name, from MONAI where MONAI has them.

``build_model(name, params, ...)`` returns a fresh ``torch.nn.Module`` whose
initial weights depend only on ``seed`` (the global RNG is forked and restored,
so building a model never disturbs anyone else's random stream).

=================  =====================================  ==================
name               network                                tasks
=================  =====================================  ==================
``classifier``     ``monai.networks.nets.Classifier``     classification
``smallcnn``       two conv layers + two linear layers     classification
                   with padded ("same") convolutions:
                   McMahan et al. 2017's CNN (1,663,370
                   parameters on 28 × 28 × 1, 10 classes)
``pflcnn``         the same layers without padding: the   classification
                   CNN of the personalized-FL papers'
                   code (PFLlib, FedFew's reference
                   code; 582,026 parameters on 28 × 28 ×
                   1, 10 classes), so results and speed
                   compare like for like with their tables
``densenet121``    ``monai.networks.nets.DenseNet121``    classification
``resnet18``       ``monai.networks.nets.resnet18``       classification
``unet``           ``monai.networks.nets.UNet``           segmentation
``basicunet``      ``monai.networks.nets.BasicUNet``      segmentation
``logreg``         logistic regression (one linear layer) tabular
``mlp``            ``monai.networks.nets.FullyConnectedNet`` tabular
=================  =====================================  ==================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from monai.networks import nets
from torch import nn

from fedfew_med.config import ConfigError


class SmallCNN(nn.Module):
    """conv(32, 5) → ReLU → pool → conv(64, 5) → ReLU → pool → fc(512) → ReLU → fc(classes), for 2-D inputs.

    ``padding=2`` keeps each convolution's output the size of its input (``smallcnn``);
    ``padding=0`` is the personalized-FL papers' network (``pflcnn``): on 28 × 28 the
    feature map after the second pooling is 4 × 4 instead of 7 × 7, hence a third of the
    parameters (the first linear layer holds 90 % of them).
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int = 32, hidden: int = 512, padding: int = 2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            # pool before ReLU: max and ReLU commute (ReLU is monotone), so this is the papers' conv → ReLU →
            # pool to the bit, with the ReLU on a quarter of the elements. Parameter names are unchanged.
            nn.Conv2d(in_channels, 32, 5, padding=padding),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Conv2d(32, 64, 5, padding=padding),
            nn.MaxPool2d(2),
            nn.ReLU(),
        )
        side = ((image_size + 2 * padding - 4) // 2 + 2 * padding - 4) // 2  # conv 5 (-4 + 2p), pool 2, twice
        if side < 1:
            raise ConfigError(f"[model] a {image_size} × {image_size} input is too small for two 5 × 5 convolutions "
                              f"with padding {padding} and two 2 × 2 poolings (the last feature map would be {side} pixels wide)")
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * side * side, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        return self.head(self.features(x))


def _classifier(p: Mapping[str, Any], c: int, k: int, dims: int, size: int) -> nn.Module:
    channels = tuple(p.get("channels", (8, 16, 32)))
    return nets.Classifier(
        in_shape=(c, *([size] * dims)),
        classes=k,
        channels=channels,
        strides=tuple(p.get("strides", (2,) * len(channels))),
        num_res_units=int(p.get("num_res_units", 1)),
        norm=p.get("norm", "INSTANCE"),
    )


_BUILDERS: dict[str, Callable[[Mapping[str, Any], int, int, int, int], nn.Module]] = {
    "classifier": _classifier,
    "smallcnn": lambda p, c, k, d, s: SmallCNN(c, k, image_size=s, hidden=int(p.get("hidden", 512))),
    "pflcnn": lambda p, c, k, d, s: SmallCNN(c, k, image_size=s, hidden=int(p.get("hidden", 512)), padding=0),
    "densenet121": lambda p, c, k, d, s: nets.DenseNet121(spatial_dims=d, in_channels=c, out_channels=k),
    "resnet18": lambda p, c, k, d, s: nets.resnet18(spatial_dims=d, n_input_channels=c, num_classes=k),
    "unet": lambda p, c, k, d, s: nets.UNet(
        spatial_dims=d,
        in_channels=c,
        out_channels=k,
        channels=tuple(p.get("channels", (8, 16, 32))),
        strides=tuple(p.get("strides", (2, 2))),
        num_res_units=int(p.get("num_res_units", 1)),
        norm=p.get("norm", "INSTANCE"),
    ),
    "basicunet": lambda p, c, k, d, s: nets.BasicUNet(
        spatial_dims=d, in_channels=c, out_channels=k, features=tuple(p.get("features", (8, 8, 16, 32, 64, 8)))
    ),
    "logreg": lambda p, c, k, d, s: nn.Linear(c, k),
    "mlp": lambda p, c, k, d, s: nets.FullyConnectedNet(c, k, hidden_channels=tuple(p.get("hidden", (32,))), act="RELU"),
}

TASKS = {
    "classifier": "classification",
    "smallcnn": "classification",
    "pflcnn": "classification",
    "densenet121": "classification",
    "resnet18": "classification",
    "unet": "segmentation",
    "basicunet": "segmentation",
    "logreg": "tabular",
    "mlp": "tabular",
}


def model_names() -> list[str]:
    """Registered network names."""
    return sorted(_BUILDERS)


def build_model(
    name: str,
    params: Mapping[str, Any],
    *,
    task: str,
    in_channels: int,
    num_classes: int,
    spatial_dims: int,
    image_size: int,
    seed: int,
) -> nn.Module:
    """Build network ``name`` with weights drawn from ``seed``.

    Raises
    ------
    ConfigError
        For an unknown name or a network that does not fit the task.
    """
    if name not in _BUILDERS:
        raise ConfigError(f"[model].name must be one of {', '.join(model_names())}, got {name!r}")
    if TASKS[name] != task:
        fitting = ", ".join(n for n in model_names() if TASKS[n] == task)
        raise ConfigError(f"[model].name {name!r} is a {TASKS[name]} network, but the sites' task is {task!r}; "
                          f"networks for {task!r}: {fitting}")
    with torch.random.fork_rng(devices=[]):  # MONAI initialises from the global RNG; keep it untouched
        torch.manual_seed(seed)
        return _BUILDERS[name](params, in_channels, num_classes, spatial_dims, image_size)


def parameters_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable parameters (what is shared)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def buffers_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the buffers (norm statistics; kept at the site)."""
    return {n: b.detach().clone() for n, b in model.named_buffers()}

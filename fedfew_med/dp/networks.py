"""DP-ready networks: no BatchNorm, no in-place activations, validated by Opacus.

:func:`make_dp_ready` returns a copy of a network that DP-SGD can train: Opacus'
registered module fixers (``ModuleValidator.FIXERS``, the ones ``ModuleValidator.fix``
runs: BatchNorm → GroupNorm, InstanceNorm with running statistics → without, LSTM/GRU →
DP variants) are applied to a ``copy.deepcopy`` of the module (``ModuleValidator.fix``
itself clones through ``torch.save``/``torch.load``, i.e. an in-memory pickle round trip,
which this project does not use), every ``inplace`` activation is switched off (in-place
ops break the full backward hooks that per-sample gradients use), and the result must
pass ``ModuleValidator.validate(strict=True)``.

BatchNorm mixes the records of a batch, so one record's influence on a step is not its
own gradient; its running statistics would also be shared without noise. GroupNorm
normalises each record on its own. Parameter names and shapes do not change
(``weight``/``bias`` of C channels); BatchNorm's running-statistics buffers disappear.
Build the federation's network through :func:`make_dp_ready` *before* taking initial
parameters and buffers, so every site and the server agree on the architecture.

Which named networks (``fedfew_med.models``) train under DP — one DP-SGD step each on
tiny inputs, hooks and ghost, checked by ``tests/dp/test_networks.py``:

=============  ==================================  ===========================  ===========
name           change by make_dp_ready             per-sample gradients         auto mode
=============  ==================================  ===========================  ===========
classifier     none (InstanceNorm w/o stats,        Conv2d, Linear hooks;        hooks
               PReLU)                               PReLU via functorch
smallcnn       none                                 Conv2d, Linear hooks         ghost
pflcnn         none                                 Conv2d, Linear hooks         ghost
densenet121    121 BatchNorm2d → GroupNorm;         Conv2d, GroupNorm, Linear    hooks
               ReLU in-place off                    hooks
resnet18       20 BatchNorm2d → GroupNorm;          Conv2d, GroupNorm, Linear    hooks
               ReLU in-place off; residual          hooks
               ``out += residual`` made
               out-of-place
unet           none (InstanceNorm w/o stats,        Conv2d hooks; PReLU and      hooks
               PReLU)                               ConvTranspose2d via functorch
basicunet      LeakyReLU in-place off               Conv2d, InstanceNorm hooks;  hooks
                                                    ConvTranspose2d via functorch
logreg         none                                 Linear hooks                 ghost
mlp            none                                 Linear hooks                 ghost
=============  ==================================  ===========================  ===========

"auto mode" is what :func:`fedfew_med.dp.engine.resolve_grad_sample_mode` picks: ghost
clipping when most trainable weights sit in ``Linear`` layers (the only ones here Opacus
ghost-clips without materialising per-sample gradients), hooks otherwise. Measured on 2 CPU
cores, one local epoch of 200 records 1×32×32, batch 32: classifier — no DP 0.03 s, hooks
0.09 s, ghost 0.11 s; smallcnn (2 M weights in one Linear) — no DP 0.18 s, hooks 1.6 s,
ghost 0.5 s.
"""

from __future__ import annotations

import copy

import torch
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from opacus.validators import ModuleValidator
from opacus.validators.errors import IllegalModuleConfigurationError
from torch import nn


class NotDPReadyError(ValueError):
    """A network cannot be trained with DP-SGD as it is."""


class _DPResNetBlock(ResNetBlock):
    """MONAI's ``ResNetBlock`` with ``out + residual`` instead of ``out += residual``.

    The in-place add modifies the output of a norm layer that carries a full backward hook
    (a view autograd must not see modified), which per-sample gradients rely on.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + residual)


class _DPResNetBottleneck(ResNetBottleneck):
    """MONAI's ``ResNetBottleneck`` with ``out + residual`` (see :class:`_DPResNetBlock`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act(out + residual)


# modules whose forward modifies a hooked output in place -> the same module with an out-of-place forward
_OUT_OF_PLACE: dict[type[nn.Module], type[nn.Module]] = {ResNetBlock: _DPResNetBlock, ResNetBottleneck: _DPResNetBottleneck}


def dp_problems(module: nn.Module) -> list[str]:
    """What stops ``module`` from DP training (empty when it is DP-ready)."""
    # structure only: the train/eval mode is the caller's business (training switches it on)
    problems = [
        str(e).split("\n")[0]
        for e in ModuleValidator.validate(module, strict=False)
        if not (isinstance(e, IllegalModuleConfigurationError) and "training mode" in str(e))
    ]
    for name, m in module.named_modules():
        where = name or type(m).__name__
        if getattr(m, "inplace", False) is True:
            problems.append(f"{where}: in-place {type(m).__name__} breaks per-sample gradient hooks")
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            problems.append(f"{where}: {type(m).__name__} mixes the records of a batch")  # Opacus only checks trainable ones
        if type(m) in _OUT_OF_PLACE:
            problems.append(f"{where}: {type(m).__name__}.forward adds in place to a hooked output")
    return problems


def make_dp_ready(module: nn.Module) -> nn.Module:
    """A DP-trainable copy of ``module`` (the input is not modified); see the module docstring.

    Raises
    ------
    NotDPReadyError
        If a problem remains that no fixer handles.
    """
    fixed = copy.deepcopy(module)
    # every module Opacus has a fixer for (ModuleValidator.fix skips those without trainable
    # parameters, e.g. BatchNorm(affine=False), which still mixes the records of a batch)
    names = [name for name, m in fixed.named_modules() if type(m) in ModuleValidator.FIXERS]
    for name in names:
        sub = fixed.get_submodule(name) if name else fixed
        fixer = ModuleValidator.FIXERS.get(type(sub))
        if fixer is None:
            continue
        replacement = fixer(sub)
        if not name:
            fixed = replacement
            continue
        parent_name, _, child = name.rpartition(".")
        parent = fixed.get_submodule(parent_name) if parent_name else fixed
        setattr(parent, child, replacement)
    for m in fixed.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False  # type: ignore[assignment]
        if type(m) in _OUT_OF_PLACE:
            m.__class__ = _OUT_OF_PLACE[type(m)]  # same state, out-of-place forward
    problems = dp_problems(fixed)
    if problems:
        raise NotDPReadyError(f"{type(module).__name__} cannot be made DP-ready: " + "; ".join(problems[:3]))
    return fixed


def check_dp_ready(module: nn.Module, *, what: str = "network") -> None:
    """Raise :class:`NotDPReadyError` naming the problems unless ``module`` is DP-ready."""
    problems = dp_problems(module)
    if problems:
        raise NotDPReadyError(
            f"{what} is not DP-ready ({len(problems)} problem(s), e.g. {problems[0]}); build it with fedfew_med.dp.make_dp_ready"
        )

"""Where a site computes and in what precision (``[training] device`` and ``precision``).

=====================  ================================================================
``resolve_device``     ``"auto" | "cpu" | "cuda" | "cuda:N"`` → a ``torch.device`` (auto:
                       CUDA when torch sees a GPU); a GPU that is not there is an error
``autocast``           the ``torch.amp`` context of a precision (none for ``"32"``)
``grad_scaler``        ``torch.amp.GradScaler`` for ``"16-mixed"`` (float16 gradients
                       underflow without it), else None
``backward_step``      backward and optimiser step of one batch, through the scaler if any
``to_cpu``             detached contiguous CPU copies of a state dict: what leaves a site
``memory_format``      ``channels_last`` / ``channels_last_3d`` for a network with 2-D / 3-D
                       convolutions when ``[training].channels_last`` asks for it, else None
``to_device``          a batch of images on the device, in that memory format
=====================  ================================================================

On the CPU at precision ``"32"`` every helper is the identity (``nullcontext``, ``Tensor.to``
of a CPU tensor), so the CPU code path, and its results to the bit, are those of a build
without these options. Layer 1: torch only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch

AMP_DTYPES = {"bf16": torch.bfloat16, "16-mixed": torch.float16}


def resolve_device(spec: str, *, where: str = "[training].device") -> torch.device:
    """The device ``spec`` names on this machine.

    Raises
    ------
    ValueError
        For a malformed spec, or a CUDA device torch cannot see (naming ``where`` and what torch sees).
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        index = 0 if spec == "cuda" else spec.split(":", 1)[1]
        if not str(index).isdigit():
            raise ValueError(f'{where} must be "auto", "cpu", "cuda" or "cuda:N", got {spec!r}')
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(index) >= count:
            seen = "no CUDA device" if count == 0 else f"{count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            raise ValueError(f"{where} = {spec!r}, but torch {torch.__version__} sees {seen} on this machine; "
                             'use "auto" to fall back to the CPU')
        return torch.device(f"cuda:{index}")
    raise ValueError(f'{where} must be "auto", "cpu", "cuda" or "cuda:N", got {spec!r}')


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to the precision's dtype on ``device``; a no-op context for ``"32"``."""
    if precision == "32":
        return contextlib.nullcontext()
    if precision not in AMP_DTYPES:
        raise ValueError(f'precision must be "32", "bf16" or "16-mixed", got {precision!r}')
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A gradient scaler for float16 training (``"16-mixed"``); None otherwise."""
    return torch.amp.GradScaler(device.type) if precision == "16-mixed" else None


def backward_step(objective: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """``objective.backward(); optimizer.step()``, or with float16 the scaled loss and a step skipped on inf/NaN."""
    if scaler is None:
        objective.backward()
        optimizer.step()
    else:
        scaler.scale(objective).backward()
        scaler.step(optimizer)
        scaler.update()


def to_cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU copies (a copy even on the CPU: the caller may go on training the source;
    contiguous whatever the training layout, so replies and checkpoints never depend on it)."""
    return {n: t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format) for n, t in tensors.items()}


# Rank of a convolution weight (and of an image batch) -> its channels-last format.
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def memory_format(network: torch.nn.Module, channels_last: bool) -> torch.memory_format | None:
    """The channels-last format for ``network``'s convolutions, or None (not asked, or no convolution).

    A network whose weights include 4-D (5-D) tensors, i.e. 2-D (3-D) convolutions, gets
    ``channels_last`` (``channels_last_3d``); 3-D networks take the 5-D format even when they hold
    some 4-D weight too.
    """
    if not channels_last:
        return None
    ranks = {p.dim() for p in network.parameters()} & set(_CHANNELS_LAST)
    return _CHANNELS_LAST[max(ranks)] if ranks else None


def to_device(images: torch.Tensor, device: torch.device, fmt: torch.memory_format | None) -> torch.Tensor:
    """``images`` (B, C, *spatial) on ``device``, in ``fmt`` when it is the batch's rank's channels-last format."""
    images = images.to(device)
    if fmt is not None and _CHANNELS_LAST.get(images.dim()) == fmt:
        images = images.contiguous(memory_format=fmt)
    return images

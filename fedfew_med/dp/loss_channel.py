"""The loss channel: private versions of the losses a site reports.

FedFew (and IFCA, and the logs of every method) send per-model losses of a site's
training data to the server; those numbers come from private records, so under DP
they are released through a Gaussian mechanism and accounted in the site's ledger.

Choice: noise, not "already-private outputs"
--------------------------------------------
The alternative, deriving the losses only from outputs that are already private,
does not exist here: a loss is a function of the records, and the DP-trained model
says nothing about the site's loss without looking at the data again. So every loss
that can leave the site is computed as

    L̃ = clamp( ( Σ_j min(max(ℓ_j, 0), C) + N(0, (σ_L · C)²) ) / n , 0, C )

over the ``n`` records of the split, with per-sample losses ``ℓ_j`` of the model in
eval mode (no gradient), clip ``C = loss_clip`` and ``σ_L = loss_noise_multiplier``:
the noise std on the reported mean is ``σ_L · C / n``. The final clamp is
post-processing (free) and keeps the report in the range of a real loss.

Neighbouring relation
---------------------
Add/remove one record of the site, with the record count ``n`` treated as public —
the same convention as Opacus' DP-SGD (it derives the sample rate from ``len(dataset)``)
and as the federation itself (``SiteReply.num_samples`` is sent in the clear). Adding
or removing a record changes the clipped sum by at most ``C``, so the sum has L2
sensitivity ``C`` and each released loss is a Gaussian mechanism with noise multiplier
``σ_L`` on the full split: it is recorded in the ledger as
``Mechanism(σ_L, sample_rate=1.0, steps=1, kind="loss")``. K losses of K models are K
such mechanisms (equivalently the K-vector, sensitivity ``C√K``, at noise ``σ_L·C`` per
coordinate). Under replace-one the sensitivity is also ``C`` (values lie in ``[0, C]``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedfew_med.data.base import collate
from fedfew_med.dp.ledger import Mechanism


class PerSampleLoss(nn.Module):
    """The task loss of ``fedfew_med.training.task_loss`` per record, shape (B,).

    ``reduction`` (``"none"``, ``"mean"``, ``"sum"``) follows the ``torch.nn`` convention
    so Opacus' ghost-clipping criterion wrapper can switch it. The mean over a batch equals
    the training loss of ``training.py`` (cross-entropy; Dice + CE with ``batch=False``).
    """

    def __init__(self, task: str, reduction: str = "mean") -> None:
        super().__init__()
        if task not in ("classification", "segmentation", "tabular"):
            raise ValueError(f"task must be 'classification', 'segmentation' or 'tabular', got {task!r}")
        self.task = task
        self.reduction = reduction
        self._dice = DiceLoss(to_onehot_y=True, softmax=True, reduction="none") if task == "segmentation" else None

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self._dice is None:  # (B, C) logits, (B,) classes
            per = F.cross_entropy(output, target, reduction="none")
        else:  # (B, C, *spatial) logits, (B, 1, *spatial) mask
            dice = self._dice(output, target).flatten(1).mean(1)
            ce = F.cross_entropy(output, target[:, 0].long(), reduction="none").flatten(1).mean(1)
            per = dice + ce
        if self.reduction == "none":
            return per
        if self.reduction == "sum":
            return per.sum()
        return per.mean()


@torch.no_grad()
def per_sample_losses(network: nn.Module, dataset: Dataset[dict[str, torch.Tensor]], loss_fn: PerSampleLoss, *, batch_size: int = 64) -> torch.Tensor:
    """Per-record losses (n,) of ``network`` (put in eval mode) over ``dataset``, in dataset order."""
    network.eval()
    # A generator of its own: a DataLoader draws a base seed per iteration, from the global RNG otherwise.
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate, generator=torch.Generator().manual_seed(0))
    saved, loss_fn.reduction = loss_fn.reduction, "none"
    try:
        device = next(network.parameters()).device  # batches go where the network is; the losses come back to the CPU
        out = [loss_fn(network(b["image"].to(device)), b["label"].to(device)).detach().to("cpu", torch.float64) for b in loader]
    finally:
        loss_fn.reduction = saved
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def private_losses(
    per_sample_losses: torch.Tensor,
    *,
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator,
    clamp: bool = True,
) -> tuple[float, ...]:
    """Private means of K rows of per-sample losses; see the module docstring.

    Parameters
    ----------
    per_sample_losses
        (K, n): row k holds the n per-record losses of model k (a 1-D tensor is one row).
    clip
        C: each loss is clipped to ``[0, C]``.
    noise_multiplier
        σ_L: the noise std on each clipped *sum* is ``σ_L · C`` (``σ_L · C / n`` on the mean).
    generator
        Source of the noise (explicit: no global RNG).
    clamp
        Clamp the noisy means to ``[0, C]`` (post-processing).

    Returns
    -------
    tuple of K floats. Account it as :func:`loss_mechanism` ``(σ_L, K)``.
    """
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    if noise_multiplier <= 0:
        raise ValueError(f"noise_multiplier must be > 0 (a loss report without noise is not private), got {noise_multiplier}")
    losses = per_sample_losses.detach().to(torch.float64)
    if losses.dim() == 1:
        losses = losses.unsqueeze(0)
    if losses.dim() != 2 or losses.shape[1] == 0:
        raise ValueError(f"per_sample_losses must be (K, n) with n >= 1, got shape {tuple(per_sample_losses.shape)}")
    k, n = losses.shape
    sums = torch.nan_to_num(losses, nan=clip, posinf=clip, neginf=0.0).clamp(0.0, clip).sum(dim=1)  # (K,)
    noise = torch.normal(0.0, noise_multiplier * clip, size=(k,), generator=generator, dtype=torch.float64)
    means = (sums + noise) / n
    if clamp:
        means = means.clamp(0.0, clip)
    return tuple(float(v) for v in means)


def loss_mechanism(noise_multiplier: float, releases: int = 1, *, round_idx: int = -1, label: str = "") -> Mechanism:
    """The ledger entry of ``releases`` loss-channel releases."""
    return Mechanism(noise_multiplier, 1.0, releases, kind="loss", round=round_idx, label=label)

"""A site's ``[privacy]`` table as a frozen, validated dataclass.

Example (TOML)::

    [privacy]
    enabled = true
    epsilon = 8.0            # target ε for the WHOLE run (all rounds, all K copies, loss reports)
    delta = 1e-5
    max_grad_norm = 1.0      # per-sample gradient clip C
    accountant = "rdp"       # "rdp" | "prv"
    noise_multiplier = 0.0   # 0 = calibrated so that the planned run spends exactly ε; > 0 = fixed σ
                             #     (the site then trains until its budget runs out, and stops)
    grad_sample_mode = "auto"
    physical_batch_size = 0  # 0 = no limit; >0 splits Poisson batches (BatchMemoryManager)
    loss_clip = 3.0          # per-sample losses are clipped to [0, loss_clip] before averaging
    loss_noise_multiplier = 0.0  # 0 = derived from loss_budget_share; > 0 = fixed σ_L
    loss_budget_share = 0.1

Defaults and why
----------------
``loss_clip = 3.0``
    Cross-entropy of a near-uniform guess over 2–20 classes is 0.7–3.0 and Dice + CE
    starts around 1.5–2; clipping at 3 keeps the informative range while bounding one
    record's influence on the reported mean to ``3 / n``.
``loss_noise_multiplier = 0.0`` (auto) with ``loss_budget_share = 0.1``
    σ_L is chosen so that the loss channel *on its own* would spend 10% of ε over the
    planned run; DP-SGD's σ is then calibrated so that the composition of both stays
    within ε (see :mod:`fedfew_med.dp.calibrate`). A fixed ``loss_noise_multiplier > 0``
    overrides the share.
``grad_sample_mode = "auto"``
    Resolved per network by :func:`fedfew_med.dp.engine.resolve_grad_sample_mode`:
    ghost clipping when most trainable weights sit in layers Opacus ghost-clips
    (``Linear``), per-sample-gradient hooks otherwise (convolutions get full per-sample
    gradients under ghost mode too, plus a second backward pass, so hooks are faster there).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fedfew_med.config import build_dataclass, require


@dataclass(frozen=True)
class PrivacyOptions:
    """Differential-privacy settings of one site (config table ``[privacy]``)."""

    enabled: bool = True
    epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: Literal["rdp", "prv"] = "rdp"
    noise_multiplier: float = 0.0
    grad_sample_mode: Literal["auto", "hooks", "ghost"] = "auto"
    physical_batch_size: int = 0
    loss_clip: float = 3.0
    loss_noise_multiplier: float = 0.0
    loss_budget_share: float = 0.1

    def __post_init__(self) -> None:
        require(self.epsilon > 0, "epsilon", "be > 0", self.epsilon)
        require(0.0 < self.delta < 1.0, "delta", "be in (0, 1)", self.delta)
        require(self.max_grad_norm > 0, "max_grad_norm", "be > 0", self.max_grad_norm)
        require(self.noise_multiplier >= 0, "noise_multiplier", "be >= 0 (0 = calibrated for the whole run)", self.noise_multiplier)
        require(self.physical_batch_size >= 0, "physical_batch_size", "be an integer >= 0 (0 = no limit)", self.physical_batch_size)
        require(self.loss_clip > 0, "loss_clip", "be > 0", self.loss_clip)
        require(
            self.loss_noise_multiplier >= 0,
            "loss_noise_multiplier",
            "be >= 0 (0 = derived from loss_budget_share)",
            self.loss_noise_multiplier,
        )
        require(0.0 < self.loss_budget_share < 1.0, "loss_budget_share", "be in (0, 1)", self.loss_budget_share)

    @classmethod
    def from_table(cls, table: Mapping[str, Any], *, where: str) -> PrivacyOptions:
        """Validate a raw ``[privacy]`` table; ``where`` names file and site, e.g. ``"sites.toml: [site.a.privacy]"``."""
        return build_dataclass(cls, table, where=where)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for the run's metadata)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

"""Per-round privacy reports: plain JSON-able dicts for ``metrics.jsonl`` and ``summary.json``."""

from __future__ import annotations

from typing import Any

from fedfew_med.dp.calibrate import Calibration
from fedfew_med.dp.ledger import PrivacyLedger
from fedfew_med.dp.options import PrivacyOptions


def mechanisms_summary(ledger: PrivacyLedger) -> list[dict[str, Any]]:
    """The ledger's history grouped by (kind, σ, q): ``[{"kind", "noise_multiplier", "sample_rate", "steps", "entries"}]``."""
    groups: dict[tuple[str, float, float], list[int]] = {}
    for m in ledger.history:
        g = groups.setdefault((m.kind, m.noise_multiplier, m.sample_rate), [0, 0])
        g[0] += m.steps
        g[1] += 1
    return [
        {"kind": kind, "noise_multiplier": sigma, "sample_rate": q, "steps": steps, "entries": entries}
        for (kind, sigma, q), (steps, entries) in sorted(groups.items())
    ]


def site_report(
    ledger: PrivacyLedger,
    *,
    options: PrivacyOptions | None = None,
    calibration: Calibration | None = None,
    grad_sample_mode: str | None = None,
    stopped: bool = False,
    round_idx: int | None = None,
) -> dict[str, Any]:
    """What one site has spent so far, and with which mechanisms (JSON-able).

    Keys: ``epsilon`` (spent, at ``delta``), ``delta``, ``target_epsilon``, ``remaining_epsilon``,
    ``accountant``, ``noise_multiplier``, ``max_grad_norm``, ``sample_rate``, ``steps`` (DP-SGD
    steps so far), ``loss_noise_multiplier``, ``loss_clip``, ``loss_releases``, ``planned``
    (the calibration's whole-run ε, steps and releases per round), ``grad_sample_mode``,
    ``stopped`` (the site has stopped training for lack of budget), ``mechanisms`` (grouped
    history) and ``digest`` (SHA-256 of the full history).
    """
    out: dict[str, Any] = {
        "epsilon": ledger.epsilon(),
        "delta": ledger.delta,
        "target_epsilon": ledger.target_epsilon,
        "remaining_epsilon": ledger.remaining_epsilon,
        "accountant": ledger.accountant,
        "steps": ledger.total_steps("dp-sgd"),
        "loss_releases": ledger.total_steps("loss"),
        "stopped": bool(stopped),
        "mechanisms": mechanisms_summary(ledger),
        "digest": ledger.digest(),
    }
    if round_idx is not None:
        out["round"] = int(round_idx)
    if options is not None:
        out.update(max_grad_norm=options.max_grad_norm, loss_clip=options.loss_clip, physical_batch_size=options.physical_batch_size)
    if calibration is not None:
        out.update(
            noise_multiplier=calibration.noise_multiplier,
            loss_noise_multiplier=calibration.loss_noise_multiplier,
            sample_rate=calibration.sample_rate,
            planned={
                "epsilon": calibration.epsilon,
                "rounds": calibration.rounds,
                "steps_per_round": calibration.steps_per_round,
                "loss_releases_per_round": calibration.loss_releases_per_round,
            },
        )
    if grad_sample_mode is not None:
        out["grad_sample_mode"] = grad_sample_mode
    return out

"""What a finished benchmark run is worth: validation scores from its checkpoint, its result entry, its collapse
diagnostics, and a twin's result made from its training (:func:`redeploy`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quality_data import Dataset

from fedfew_med import checkpoint
from fedfew_med.config import FederationConfig
from fedfew_med.data import SiteData
from fedfew_med.metrics import PRIMARY, classification_metrics, segmentation_metrics
from fedfew_med.rundir import mean_alpha_max
from fedfew_med.simulation import Federation, summarize_run
from fedfew_med.training import SiteState


def validation_scores(config: FederationConfig, sites: Sequence[SiteData], run_dir: Path) -> dict[str, float]:
    """Each site's primary metric on its validation slice, with the model it deploys at the end of the run.

    The simulator records test metrics only; the final state is reloaded from the run's checkpoint and
    scored here through the same deployment rule, so that tuning never looks at a test split.
    """
    ckpt = checkpoint.load(run_dir)
    if ckpt is None:
        raise RuntimeError(f"{run_dir} has no checkpoint")
    fed = Federation(config, sites)
    fed.server.models = ckpt.server_models
    out = {}
    for name, rt in fed.sites.items():
        rt.state = ckpt.sites.get(name, SiteState())  # as the simulator restores it
        work = rt.work(ckpt.round, rt.state.copy(), factory=rt.eval_work_factory)
        dep = fed.server.algorithm.deploy(name, fed.server.models, work)
        probs, targets = work.predict(dep.params, slot=dep.slot, split="val")
        if fed.task == "segmentation":
            metrics = segmentation_metrics(probs.argmax(dim=1, keepdim=True), targets, probs.shape[1])
        else:
            metrics = classification_metrics(probs.numpy(), targets.numpy())
        out[name] = float(metrics[PRIMARY[fed.task]])
    return out


def run_result(dataset: Dataset, config: FederationConfig, run_dir: Path, summary: dict[str, Any],
            records: Sequence[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """A run's entry: its summary's figures, validation scores from its final checkpoint, traffic, diagnostics."""
    val = validation_scores(config, dataset.sites, run_dir)
    total_bytes = sum(b["sent"] + b["received"] for b in summary["bytes_total"].values())
    return {
        "seed": config.run.seed,
        **summary["summary"],
        "per_site": {s: v["metric"] for s, v in summary["per_site"].items()},
        "val_mean": statistics.fmean(val.values()),
        "val_per_site": val,
        "bytes_per_round": total_bytes / max(len(records), 1),
        "seconds": seconds,
        "diagnostics": diagnostics(records, summary),
    }


def redeploy(dataset: Dataset, config: FederationConfig, run_dir: Path, records: Sequence[dict[str, Any]],
              training_seconds: float) -> dict[str, Any]:
    """The result of run ``config`` made from another run's training (``run_dir``, its ``records``).

    Only for a ``config`` that trains exactly as that run did: the final checkpoint's models and site
    states are restored under ``config``'s algorithm, whose deployment then scores every site, as the
    simulator's last evaluation and :func:`validation_scores` would at the end of ``config``'s own run.
    ``seconds`` is the training's plus this deployment's.
    """
    t = time.perf_counter()
    ckpt = checkpoint.load(run_dir)
    if ckpt is None or ckpt.round != config.run.rounds - 1:
        raise RuntimeError(f"{run_dir}: no final checkpoint to deploy from")
    fed = Federation(config, dataset.sites)
    try:
        fed.server.models = ckpt.server_models
        for name, rt in fed.sites.items():
            rt.state = ckpt.sites.get(name, SiteState())
        fed.server.algorithm.load_server_state(ckpt.state.get("algorithm", {}))
        evaluation, failures = fed.evaluate(ckpt.round)
    finally:
        fed.close()
    if failures:
        raise RuntimeError(f"{run_dir}: deploying under {config.algorithm.name} failed at {failures}")
    summary = summarize_run(fed, records, evaluation)
    out = run_result(dataset, config, run_dir, summary, records, 0.0)
    return {**out, "seconds": training_seconds + time.perf_counter() - t}


def diagnostics(records: Sequence[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    """Collapse diagnostics of a run: mean of each round's largest α (None without α), models in use, spread,
    re-seeds, and ``skipped``: site replies the server left out (a site that failed, e.g. an update over
    ``[faults].max_update_norm``; the rounds' ``failures``), so a table says when a method trained on less."""
    use = summary.get("model_use")
    return {"alpha_max": mean_alpha_max(records),
            "in_use": use["in_use"] if use else None, "spread": use["spread"] if use else None,
            "reseeded": use["reseeded"] if use else None,
            "skipped": sum(len(r.get("failures") or {}) for r in records)}


def skipped_replies(runs: Sequence[dict[str, Any]]) -> int | None:
    """Site replies skipped over ``runs`` (None when a run predates the count: cached before it was kept)."""
    known = [r.get("diagnostics", {}).get("skipped") for r in runs]
    return None if any(k is None for k in known) else sum(known)

"""Opening a run directory and summarising a finished run, shared by every runner.

The in-process simulation (:mod:`fedfew_med.simulation`) and the Flower coordinator
(:mod:`fedfew_med.flower.coordinator`) write the same run directory: ``config.json``
(resolved config), ``metrics.jsonl`` (one record per completed round), ``checkpoints/``
(:mod:`fedfew_med.checkpoint`), and at the end ``models.safetensors`` and ``summary.json``.
They may not import each other, so what both need lives here, one layer below them.

:func:`locked` keeps two processes off one run directory with an ``flock`` on
``.<name>.lock`` beside it (the file the Flower coordinator locks too). The kernel drops the
lock when its process dies, so a run killed with SIGKILL leaves only a harmless file behind:
``--resume`` takes the lock again at once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedfew_med import checkpoint
from fedfew_med.algorithms.base import Params
from fedfew_med.algorithms.fedfew_collapse import COLLAPSE_SPREAD, collapse_note, model_spread
from fedfew_med.config import FederationConfig
from fedfew_med.metrics import headline_metric, result_flags, summarize

log = logging.getLogger(__name__)

__all__ = ["RunDirError", "locked", "open_run_dir", "summarize_run"]


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (exists, is in use, or holds another config)."""


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` (``.<name>.lock`` in its parent) while the block runs.

    Raises
    ------
    RunDirError
        Another process (a simulation or a Flower coordinator) holds the lock.
    """
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir.parent / f".{run_dir.name}.lock"
    with lock_path.open("a") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirError(f"{run_dir} is in use by another process (lock {lock_path}); wait for it to end") from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def open_run_dir(
    run_dir: Path,
    config: FederationConfig,
    *,
    resume: bool,
    overwrite: bool,
    occupied_hint: str = "pass --resume to continue it or --overwrite to replace it",
) -> checkpoint.Checkpoint | None:
    """Open ``run_dir`` for a new run (returns None) or a resumed one (returns its last checkpoint).

    Parameters
    ----------
    run_dir
        The run directory.
    config
        The run's config; a resumed checkpoint must carry its digest.
    resume
        Continue from the last checkpoint (a directory without one starts at round 0, with a warning).
    overwrite
        Replace a directory that already holds a run (ignored with ``resume``).
    occupied_hint
        How the caller's user resumes or overwrites, for the error on an occupied directory.

    Raises
    ------
    RunDirError
        The directory holds a run and neither ``resume`` nor ``overwrite`` was asked for, or its
        checkpoint was made with a different config.
    """
    has_ckpt = checkpoint.latest_round(run_dir) is not None if run_dir.exists() else False
    if resume:
        ckpt = checkpoint.load(run_dir) if has_ckpt else None
        if ckpt is not None:
            if ckpt.state.get("config_digest") != config.digest():
                raise RunDirError(f"{run_dir}: the checkpoint was made with a different config; resume with the run's own config.json")
            checkpoint.remove_stale(run_dir)  # what a killed process half wrote; the caller holds the directory
            return ckpt
        log.warning("%s has no checkpoint to resume from; starting at round 0", run_dir)
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunDirError(f"{run_dir} already holds a run; {occupied_hint}")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_text(run_dir / "config.json", json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    (run_dir / "metrics.jsonl").write_text("", encoding="utf-8")
    return None


def summarize_run(
    *,
    config: FederationConfig,
    task: str,
    num_models: int,
    sites: Mapping[str, Mapping[str, Any]],
    records: Sequence[Mapping[str, Any]],
    evaluation: Mapping[str, Mapping[str, Any]],
    models: Sequence[Params] | None = None,
    dp_ready: bool = False,
    features: Sequence[str] = (),
) -> dict[str, Any]:
    """The final summary: per-site deployed metrics, mean / worst / Jain, model use, traffic, compute.

    ``dp_ready`` says the run's networks are the DP-ready rewrite (a site trained with DP), which
    parameter names alone cannot tell (GroupNorm and BatchNorm hold the same weights): recorded
    so that ``choose-model``, ``predict`` and ``export`` rebuild the network the run trained.

    ``compute`` records ``[training].precision`` and the device each site computed on, as the
    site resolved ``[training].device`` (its evaluation entry's ``device``): one name when all
    agree, else ``site: device`` pairs.

    ``features``: a tabular federation's feature columns in the order its models read them,
    recorded so that ``predict`` and ``choose-model`` read a site's columns in that order.

    ``sites`` maps every site to ``{"n_train": int, "protocol": str | None}``. With the final
    server ``models`` (K ≥ 2), ``model_use`` says how many distinct models the sites deploy,
    how far apart the K models are, how many were re-seeded, and whether they collapsed.
    """
    primary = headline_metric(task, config.run.metric)
    per_site = {s: e["metrics"][primary] for s, e in evaluation.items()}
    traffic: dict[str, dict[str, int]] = {s: {"sent": 0, "received": 0} for s in sites}
    for rec in records:
        for s, b in rec["bytes"].items():
            traffic.setdefault(s, {"sent": 0, "received": 0})
            traffic[s]["sent"] += b["sent"]
            traffic[s]["received"] += b["received"]
    out: dict[str, Any] = {
        "algorithm": config.algorithm.name,
        "num_models": num_models,
        "rounds": len(records),
        "metric": primary,
        "per_site": {
            s: {
                "metric": per_site[s],
                "model": evaluation[s]["model"],
                "metrics": evaluation[s]["metrics"],
                "protocol": sites.get(s, {}).get("protocol"),
                "n_train": sites.get(s, {}).get("n_train"),
                "flags": result_flags(evaluation[s]["metrics"]),
                **({"metric_finetuned": evaluation[s]["metrics_finetuned"][primary]} if "metrics_finetuned" in evaluation[s] else {}),
            }
            for s in sorted(evaluation)
        },
        "summary": {**summarize(per_site), "sites": len(per_site), "of_sites": len(set(sites) | set(evaluation))},
        "site_status": _site_status(sites, evaluation, records),
        "bytes_total": traffic,
        "failures": {str(r["round"]): r["failures"] for r in records if r["failures"]},
        "config_digest": config.digest(),
        "compute": {"device": _devices(evaluation), "precision": config.training.precision},
        "dp_ready": dp_ready,
        **({"features": list(features)} if features else {}),
    }
    if models is not None and num_models >= 2:
        out["model_use"] = model_use(models, evaluation, records)
    if any("metrics_finetuned" in e for e in evaluation.values()):
        out["summary_finetuned"] = summarize({s: e["metrics_finetuned"][primary] for s, e in evaluation.items()})
    return out


def _site_status(sites: Mapping[str, Any], evaluation: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Every expected site: ``"evaluated"``, or why it is missing from mean and worst (its last recorded failure)."""
    out: dict[str, str] = {}
    for site in sorted(set(sites) | set(evaluation)):
        if site in evaluation:
            out[site] = "evaluated"
            continue
        why = None
        for r in reversed(records):  # the most recent round that recorded a failure of this site
            why = r.get("evaluation_failures", {}).get(site) or r.get("failures", {}).get(site)
            if why:
                break
        out[site] = f"not evaluated: {why}" if why else "not evaluated"
    return out


def _devices(evaluation: Mapping[str, Mapping[str, Any]]) -> str:
    """``"cpu"`` when every site computed there; ``"site0: cuda:0, site1: cpu"`` when they differ."""
    found = {s: str(e.get("device", "unknown")) for s, e in sorted(evaluation.items())}
    kinds = set(found.values())
    if len(kinds) <= 1:
        return next(iter(kinds), "unknown")
    return ", ".join(f"{s}: {d}" for s, d in found.items())


def _fmt(x: float | None) -> str:
    return "   -  " if x is None or x != x else f"{x:6.3f}"


_SIDE_METRICS = {"accuracy": "acc", "balanced_accuracy": "bal.acc", "auc": "auc", "sensitivity": "sens",
                 "specificity": "spec"}


def summary_table(s: Mapping[str, Any]) -> str:
    """The per-site table of a run's summary: what ``simulate`` prints and the Flower coordinator logs at the end."""
    metric = s["metric"]
    has_ft = "summary_finetuned" in s
    # classification: the other four beside the headline, so that a useless model shows in its row
    extra = [m for m in _SIDE_METRICS if m != metric and all(m in r.get("metrics", {}) for r in s["per_site"].values())]
    head = (f"{'site':<18} {'protocol':<9} {'n_train':>7} {'model':>5} {metric:>8}" + (f" {'+ft':>8}" if has_ft else "")
            + "".join(f" {_SIDE_METRICS[m]:>7}" for m in extra))
    lines = [head, "-" * len(head)]
    for site, row in s["per_site"].items():
        model = "local" if row["model"] is None else str(row["model"])
        line = f"{site:<18} {str(row['protocol'] or '-'):<9} {row['n_train']:>7} {model:>5} {_fmt(row['metric']):>8}"
        if has_ft:
            line += f" {_fmt(row.get('metric_finetuned')):>8}"
        line += "".join(f" {_fmt(row['metrics'][m]):>7}" for m in extra)
        lines.append(line)
    lines.append("-" * len(head))
    sm = s["summary"]
    over = f" (over {sm['sites']} of {sm['of_sites']} sites)" if sm.get("sites", 0) < sm.get("of_sites", 0) else ""
    lines.append(f"{s['algorithm']} (K={s['num_models']}), {s['rounds']} rounds: mean {metric} {sm['mean']:.3f}, "
                 f"worst site {sm['worst']:.3f}, Jain's index {sm['jain']:.3f}{over}")
    for site, status in s.get("site_status", {}).items():
        if status != "evaluated":
            lines.append(f"{site}: {status}")
    for site, row in s["per_site"].items():  # a high accuracy can hide a model that learned nothing
        lines.extend(f"warning: {site} {flag}" for flag in row.get("flags", []))
    native = [r["metrics"] for r in s["per_site"].values() if "dice_native" in r.get("metrics", {})]
    if native:  # segmentation scored on each scan's own grid, HD95 in mm
        hd = [m["hd95_native_mm"] for m in native if m["hd95_native_mm"] == m["hd95_native_mm"]]
        lines.append(f"as acquired (each test scan's own grid, {len(native)} site(s)): mean Dice "
                     f"{sum(m['dice_native'] for m in native) / len(native):.3f}"
                     + (f", mean HD95 {sum(hd) / len(hd):.2f} mm" if hd else ""))
    if "model_use" in s:
        lines.append(f"models: {s['model_use']['note']}")
    if has_ft:
        ft = s["summary_finetuned"]
        lines.append(f"+{metric} after local fine-tuning: mean {ft['mean']:.3f}, worst {ft['worst']:.3f}, Jain {ft['jain']:.3f}")
    if s.get("failures"):
        lines.append(f"skipped site-rounds: {s['failures']}")
    return "\n".join(lines)


def model_use(models: Sequence[Params], evaluation: Mapping[str, Mapping[str, Any]],
              records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Distinct deployed models, relative spread of the K models, re-seeds, and a one-line note."""
    in_use = len({e["model"] for e in evaluation.values() if e.get("model") is not None})
    spread = model_spread(models)
    reseeded = sum(len(r.get("server", {}).get("reseeded", [])) for r in records)
    alpha_max = mean_alpha_max(records)
    note = collapse_note(in_use, len(models), spread, alpha_max) + (f"; {reseeded} model(s) re-seeded" if reseeded else "")
    return {"in_use": in_use, "of": len(models), "spread": spread, "collapsed": spread < COLLAPSE_SPREAD,
            "alpha_max": alpha_max, "reseeded": reseeded, "note": note}


def mean_alpha_max(records: Sequence[Mapping[str, Any]]) -> float | None:
    """Mean over rounds of the largest site importance α_i (FedFew's records; None without α)."""
    alphas = [max(r["server"]["alpha"]) for r in records if r.get("server", {}).get("alpha")]
    return sum(alphas) / len(alphas) if alphas else None

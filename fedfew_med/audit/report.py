"""The privacy report's numbers, gathered from a run directory (JSON-able, no rendering).

Everything comes from the run's own files: ``summary.json`` and ``metrics.jsonl`` (the per-round
``privacy`` records), the latest checkpoint's ``state.json`` (every site's ledger, re-read with
:class:`~fedfew_med.dp.PrivacyLedger` so that the recorded ε is checked against a fresh accountant),
the SHA-256 digests of the checkpoints and ``models.safetensors``, and for a Flower run the transport
its coordinator recorded (``summary.json``'s ``transport``: TLS, SuperNode authentication, the sites
that connected; ``nodes.json`` for older runs). The membership-inference
audit loads the run with :func:`fedfew_med.evaluation.load_run` and attacks every site's deployed
model (members = the site's training records, non-members = its held-out test records).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfew_med import checkpoint
from fedfew_med.audit import mia
from fedfew_med.audit.summary import plain_summary, rounds_left
from fedfew_med.config import federation_from_dict
from fedfew_med.dp import PrivacyLedger
from fedfew_med.evaluation import Run, load_run
from fedfew_med.evaluation.run import read_records
from fedfew_med.flower.transport import transport_record
from fedfew_med.privacy import PrivacyPolicy, check_recorded_transport, check_spent

log = logging.getLogger(__name__)

PRIVACY_KEYS = ("epsilon", "delta", "target_epsilon", "accountant", "noise_multiplier", "loss_noise_multiplier", "max_grad_norm",
                "loss_clip", "sample_rate", "steps", "loss_releases", "grad_sample_mode", "stopped", "digest")
"""The per-site ledger numbers the report shows, as named in the run's ``privacy`` records."""

NEVER_LEFT = ("images", "labels", "per-record losses or gradients", "the deployed-model scores on training records")


def per_record_losses(probs: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """Cross-entropy of every record: (N, C) probs and (N,) targets, or the mean over voxels for segmentation."""
    p = probs.double().clamp_min(1e-12)
    if p.ndim == 2:
        picked = p.gather(1, targets.long().view(-1, 1))[:, 0]
        return (-picked.log()).numpy()
    picked = p.gather(1, targets.long())  # (N, 1, *spatial)
    return (-picked.log()).flatten(1).mean(dim=1).numpy()


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def digests(run_dir: Path) -> dict[str, Any]:
    """Config digest (recomputed from ``config.json``), ``models.safetensors`` and every checkpoint's file digests.

    ``verified`` is True when the recomputed digests equal those the run recorded.
    """
    summary = _read_json(run_dir / "summary.json")
    config = federation_from_dict(_read_json(run_dir / "config.json"), source=str(run_dir / "config.json"))
    models = run_dir / "models.safetensors"
    out: dict[str, Any] = {
        "config_digest": config.digest(),
        "config_digest_recorded": summary.get("config_digest"),
        "models_sha256": checkpoint.sha256_file(models) if models.is_file() else None,
        "models_sha256_recorded": summary.get("models_sha256"),
        "checkpoints": [],
    }
    ok = out["config_digest"] == out["config_digest_recorded"] and out["models_sha256"] == out["models_sha256_recorded"]
    for state_path in sorted((run_dir / "checkpoints").glob("round-*/state.json")):
        meta = _read_json(state_path)
        actual = {name: checkpoint.sha256_file(state_path.parent / name) for name in meta.get("digests", {})}
        ok = ok and actual == meta.get("digests") and meta.get("state", {}).get("config_digest") == out["config_digest"]
        out["checkpoints"].append({"round": meta.get("round"), "digests": meta.get("digests", {}), "verified": actual == meta.get("digests")})
    out["verified"] = bool(ok)
    return out


def _ledgers(run_dir: Path) -> dict[str, Any]:
    """The latest checkpoint's privacy state (``{"sites": {name: {...}}, "server": ...}``)."""
    latest = checkpoint.latest_round(run_dir)
    if latest is None:
        return {}
    path = run_dir / "checkpoints" / f"round-{latest:05d}" / "state.json"
    return dict(_read_json(path).get("state", {}).get("privacy") or {})


def privacy_section(run_dir: Path) -> dict[str, Any]:
    """Per site: the final ledger numbers, ε over the rounds, and the ledger re-read from the checkpoint."""
    summary = _read_json(run_dir / "summary.json")
    records = read_records(run_dir / "metrics.jsonl")
    final = summary.get("privacy") or (records[-1].get("privacy") if records else None) or {}
    ledgers = _ledgers(run_dir).get("sites", {})
    sites: dict[str, Any] = {}
    for name, entry in sorted(final.items()):
        row: dict[str, Any] = {k: entry.get(k) for k in PRIVACY_KEYS}
        row["mechanisms"] = entry.get("mechanisms", [])
        row["planned"] = entry.get("planned")
        row["epsilon_by_round"] = [{"round": rec["round"], "epsilon": rec["privacy"][name]["epsilon"]}
                                   for rec in records if name in rec.get("privacy", {})]
        saved = ledgers.get(name, {}).get("ledger")
        if saved is not None:
            ledger = PrivacyLedger.from_state_dict(saved)
            eps = ledger.epsilon()
            row["ledger_check"] = {"epsilon": eps, "digest": ledger.digest(), "entries": len(ledger),
                                   "matches": math.isclose(eps, float(entry["epsilon"]), rel_tol=1e-9) and ledger.digest() == entry.get("digest")}
            row["rounds_left"] = rounds_left(saved)  # rounds like the last one that still fit the target
        sites[name] = row
    return {"sites": sites, "server": summary.get("server_privacy")}


def left_sites(run_dir: Path) -> dict[str, Any]:
    """What each site sent over the run (bytes of parameters, how many losses, counts), from the records."""
    summary = _read_json(run_dir / "summary.json")
    records = read_records(run_dir / "metrics.jsonl")
    out: dict[str, Any] = {}
    for name, row in sorted(summary.get("per_site", {}).items()):
        trained = [r for r in records if name in r.get("site_losses", {})]
        out[name] = {
            "rounds_trained": len(trained),
            "parameter_bytes": sum(int(r.get("bytes", {}).get(name, {}).get("received", 0)) for r in records),
            "model_updates": sum(len(r.get("site_info", {}).get(name, {}).get("trained", [])) for r in trained),
            "losses_reported": sum(len(r["site_losses"][name]) for r in trained),
            "record_count": row.get("n_train"),
            "test_metrics_reported": sum(1 for r in records if name in r.get("metrics", {})),
        }
    return out


def transport_section(run_dir: Path) -> dict[str, Any]:
    """How the run's sites were connected: ``{"runner": "simulation"}``, or a Flower run's recorded ``transport``.

    A Flower run (it has ``nodes.json``) whose ``summary.json`` carries no ``transport`` (written before the
    coordinator recorded it) gets its sites from ``nodes.json`` and ``None`` for TLS and authentication.
    """
    recorded = _read_json(run_dir / "summary.json").get("transport")
    if recorded is not None:
        return dict(recorded)
    nodes = _read_json(run_dir / "nodes.json")
    if not nodes:
        return {"runner": "simulation"}
    return transport_record([], nodes)  # no launch recorded: TLS and authentication None


def attack_run(run: Run, *, n_resamples: int, seed: int) -> dict[str, Any]:
    """The loss-threshold attack on every site's deployed model of ``run``."""
    summary = run.summary.get("privacy") or {}
    out: dict[str, Any] = {}
    for site in run.sites:
        p_in, y_in, k = run.deployed_predictions(site, "train")
        p_out, y_out, _ = run.deployed_predictions(site, "test")
        members, nonmembers = per_record_losses(p_in, y_in), per_record_losses(p_out, y_out)
        delta = float(summary[site]["delta"]) if site in summary else 1.0 / max(members.size, 1)
        result = mia.attack(members, nonmembers, delta=delta, n_resamples=n_resamples, seed=seed)
        fpr, tpr = mia.roc_points(members, nonmembers)
        out[site] = {**result.to_dict(), "deployed_model": k, "delta": delta,
                     "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()}}
        log.info("%s %s: attack AUC %.3f", run.run_dir, site, result.auc)
    return out


def build_report(run_dir: str | Path, *, baseline: str | Path | None = None, policy: PrivacyPolicy | None = None,
                 audit: bool = True, n_resamples: int = mia.DEFAULT_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """All the numbers of the privacy report of ``run_dir`` (JSON-able).

    Parameters
    ----------
    run_dir
        The (DP) run directory.
    baseline
        A non-DP run of the same data, attacked side by side.
    policy
        The policy to check the spent budgets against (None: no compliance table).
    audit
        Run the membership-inference attack (loads the models and scores every record).
    n_resamples, seed
        Bootstrap settings of the attack.
    """
    path = Path(run_dir)
    summary = _read_json(path / "summary.json")
    if not summary:
        raise FileNotFoundError(f"{path}: no summary.json; is this a finished run directory?")
    privacy = privacy_section(path)
    left = left_sites(path)
    report: dict[str, Any] = {
        "run": {"dir": str(path), "algorithm": summary.get("algorithm"), "num_models": summary.get("num_models"),
                "rounds": summary.get("rounds"), "finished": summary.get("finished"),
                "sites": sorted(summary.get("per_site", {})), "n_train": {s: r.get("n_train") for s, r in summary.get("per_site", {}).items()}},
        "digests": digests(path),
        "privacy": privacy,
        "left_sites": left,
        "never_left_sites": list(NEVER_LEFT),
        "transport": transport_section(path),
    }
    if policy is not None:
        verdicts = check_spent(policy, sites={s: int(n or 0) for s, n in report["run"]["n_train"].items()},
                               privacy=privacy["sites"], reported_losses={s: v["losses_reported"] for s, v in left.items()})
        verdicts += check_recorded_transport(policy, report["transport"])
        report["policy"] = {**policy.to_dict(), "verdicts": [v.to_dict() for v in verdicts],
                            "compliant": all(v.ok is not False for v in verdicts)}
    if audit:
        attacks: dict[str, Any] = {"run": attack_run(load_run(path), n_resamples=n_resamples, seed=seed)}
        if baseline is not None:
            attacks["baseline"] = attack_run(load_run(baseline), n_resamples=n_resamples, seed=seed)
            attacks["baseline_dir"] = str(baseline)
            attacks["baseline_digests"] = digests(Path(baseline))
        checks = {}
        for site, result in attacks["run"].items():
            accounted = privacy["sites"].get(site, {}).get("epsilon")
            lb = result["epsilon_lower_bound"]["epsilon"]
            checks[site] = {"epsilon_lower_bound": lb, "accounted_epsilon": accounted,
                            "consistent": accounted is None or lb <= float(accounted)}
        attacks["checks"] = checks
        report["attack"] = attacks
    report["summary"] = plain_summary(report)  # the opening sentences, from everything above
    return report


def verdict_rows(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The report's policy verdicts (empty without a policy)."""
    return list(report.get("policy", {}).get("verdicts", []))

"""The coordinator's run directory: the same files, with the same meaning, as a simulation's.

``config.json`` (resolved config), ``metrics.jsonl`` (one record per completed
round, written before that round's checkpoint), ``checkpoints/`` (via
:mod:`fedfew_med.checkpoint`; the server models and a JSON state), and at the
end ``models.safetensors`` and ``summary.json``.

Records and the final files are written by the helpers both runners share
(:func:`fedfew_med.checkpoint.append_record`, ``truncate_records``, ``write_final``);
opening the directory and the summary follow ``fedfew_med.simulation`` (the two
runners may not import each other) with the coordinator's wording and roster.
"""

from __future__ import annotations

import fcntl
import json
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedfew_med import checkpoint
from fedfew_med.config import FederationConfig
from fedfew_med.metrics import PRIMARY, summarize


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (exists, is in use, or holds another config)."""


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock beside ``run_dir``: two coordinators never write one run."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir.parent / f".{run_dir.name}.lock"
    with lock_path.open("a") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirError(f"{run_dir} is in use by another coordinator process (lock {lock_path})") from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def prepare(run_dir: Path, config: FederationConfig, *, resume: bool, overwrite: bool) -> checkpoint.Checkpoint | None:
    """Open ``run_dir`` for a new run (returns None) or a resumed one (returns its last checkpoint)."""
    has_ckpt = checkpoint.latest_round(run_dir) is not None if run_dir.exists() else False
    if resume:
        ckpt = checkpoint.load(run_dir) if has_ckpt else None
        if ckpt is None:
            pass  # nothing to resume: start at round 0 (the caller logs it)
        elif ckpt.state.get("config_digest") != config.digest():
            raise RunDirError(f"{run_dir}: the checkpoint was made with a different config; resume with the run's own config")
        if ckpt is not None:
            return ckpt
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunDirError(f"{run_dir} already holds a run; set resume=true to continue it or overwrite=true to replace it")
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
) -> dict[str, Any]:
    """The summary of ``fedfew_med.simulation``: per-site deployed metrics, mean / worst / Jain, traffic.

    ``sites`` maps every site to ``{"n_train": int, "protocol": str | None}``.
    """
    primary = PRIMARY[task]
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
                **({"metric_finetuned": evaluation[s]["metrics_finetuned"][primary]} if "metrics_finetuned" in evaluation[s] else {}),
            }
            for s in sorted(evaluation)
        },
        "summary": summarize(per_site),
        "bytes_total": traffic,
        "failures": {str(r["round"]): r["failures"] for r in records if r["failures"]},
        "config_digest": config.digest(),
    }
    if any("metrics_finetuned" in e for e in evaluation.values()):
        out["summary_finetuned"] = summarize({s: e["metrics_finetuned"][primary] for s, e in evaluation.items()})
    return out

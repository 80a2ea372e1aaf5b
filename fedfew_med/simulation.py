"""The in-process federation: sites run one after another in one process.

``run(config, run_dir=...)`` drives any registered algorithm through its rounds
and returns a :class:`SimulationResult`. Every round it

1. samples the participants (fraction ``run.participation``, seeded by round),
2. sends each participant its models, runs the algorithm's site step on that
   site's own data, seeds and state, validates the reply (a site that raises or
   returns a malformed update is skipped for the round and recorded),
3. aggregates, evaluates every site's *deployed* model on its held-out test split
   (one protocol for every method), appends a record to ``metrics.jsonl`` and
   checkpoints the whole state atomically.

``resume=True`` continues from the last completed round; the result is identical
to the bit to an uninterrupted run because every random stream is derived from
(seed, round, site, slot) rather than carried along.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from fedfew_med import checkpoint
from fedfew_med.algorithms import Algorithm, Params, RoundInfo, SiteReply, build_algorithm
from fedfew_med.config import FederationConfig
from fedfew_med.data import SiteData, build_sites
from fedfew_med.metrics import PRIMARY, classification_metrics, segmentation_metrics, summarize
from fedfew_med.models import buffers_of, build_model, parameters_of
from fedfew_med.training import SiteState, SiteWork, derive_seed

log = logging.getLogger(__name__)


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (exists, or does not match the config)."""


@dataclass
class Callbacks:
    """Hooks for progress display; all optional. The library itself never prints."""

    on_round_start: Callable[[int, Sequence[str]], None] | None = None
    on_site_done: Callable[[int, str], None] | None = None
    on_round_end: Callable[[dict[str, Any]], None] | None = None


@dataclass
class SimulationResult:
    """What a finished (or resumed-and-finished) run produced."""

    run_dir: Path
    rounds_completed: int
    models: list[Params]
    summary: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)  # rounds run by this call


def params_nbytes(params: Params) -> int:
    """Bytes of a model's parameters on the wire (raw tensor bytes)."""
    return sum(t.numel() * t.element_size() for t in params.values())


def validate_reply(reply: SiteReply, sent: Mapping[int, Params], num_models: int) -> None:
    """Raise ValueError unless ``reply`` holds finite losses and well-formed updates of models it was sent."""
    if num_models and len(reply.losses) != num_models:
        raise ValueError(f"expected {num_models} losses, got {len(reply.losses)}")
    if not all(math.isfinite(x) for x in reply.losses):
        raise ValueError(f"non-finite loss reported: {list(reply.losses)}")
    if reply.num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {reply.num_samples}")
    for k, params in reply.models.items():
        if k not in sent:
            raise ValueError(f"returned model {k}, which was not sent")
        ref = sent[k]
        if set(params) != set(ref):
            raise ValueError(f"model {k}: parameter names differ from the model sent")
        for name, t in params.items():
            if t.shape != ref[name].shape or t.dtype != ref[name].dtype:
                raise ValueError(f"model {k}: {name!r} is {t.dtype}{tuple(t.shape)}, expected {ref[name].dtype}{tuple(ref[name].shape)}")
            if not torch.isfinite(t).all():
                raise ValueError(f"model {k}: {name!r} has NaN or Inf values")


class Federation:
    """Sites, network and algorithm of one run, with the per-round steps (no file I/O)."""

    def __init__(self, config: FederationConfig, sites: Sequence[SiteData]) -> None:
        self.config = config
        self.sites = {s.name: s for s in sites}
        if len(self.sites) != len(sites):
            raise ValueError("site names must be unique")
        first = sites[0]
        for s in sites:
            if (s.task, s.in_channels, s.num_classes, s.spatial_dims) != (first.task, first.in_channels, first.num_classes, first.spatial_dims):
                raise ValueError(f"site {s.name!r} differs from {first.name!r} in task, channels, classes or dimensions")
        self.task = first.task
        image_size = int(first.splits["train"][0]["image"].shape[-1]) if first.size("train") else 32
        seed = config.run.seed

        def network(i: int) -> nn.Module:
            return build_model(
                config.model.name,
                config.model.params,
                task=first.task,
                in_channels=first.in_channels,
                num_classes=first.num_classes,
                spatial_dims=first.spatial_dims,
                image_size=image_size,
                seed=derive_seed(seed, "init", i),
            )

        self.network = network(0)  # scratch network shared by the (sequential) sites
        self.initial_buffers = buffers_of(self.network)
        self.algorithm: Algorithm = build_algorithm(
            config.algorithm.name, config.algorithm.params, seed=seed, where=f"{config.source}: [algorithm]"
        )
        self.models = self.algorithm.init_models(lambda i: parameters_of(network(i)) if i else parameters_of(self.network))
        self.state = {name: SiteState() for name in self.sites}

    def work(self, site: str, round_idx: int, state: SiteState | None = None) -> SiteWork:
        """The compute of ``site`` in ``round_idx`` (on its real state unless one is given)."""
        return SiteWork(
            data=self.sites[site],
            network=self.network,
            initial_buffers=self.initial_buffers,
            state=self.state[site] if state is None else state,
            training=self.config.training,
            seed=self.config.run.seed,
            round_idx=round_idx,
        )

    def participants(self, round_idx: int) -> list[str]:
        """Sites sampled for ``round_idx`` (all when participation is 1)."""
        names = sorted(self.sites)
        m = max(1, round(self.config.run.participation * len(names)))
        if m >= len(names):
            return names
        rng = np.random.default_rng(derive_seed(self.config.run.seed, "participation", round_idx))
        return sorted(names[i] for i in rng.choice(len(names), size=m, replace=False))

    def round_info(self, round_idx: int, participants: Sequence[str]) -> RoundInfo:
        """The broadcast of ``round_idx``: λ_i (sample share among participants) and extras."""
        n = {s: self.sites[s].size("train") for s in participants}
        total = sum(n.values())
        return RoundInfo(
            round=round_idx,
            num_rounds=self.config.run.rounds,
            participants=tuple(participants),
            site_weight={s: n[s] / total for s in participants},
            extras=self.algorithm.round_extras(round_idx, self.config.run.rounds),
        )

    def site_step(self, site: str, info: RoundInfo) -> tuple[SiteReply, dict[str, int]]:
        """Run one site's round; its state changes only if the step succeeds and validates."""
        sent = {k: {n: t.clone() for n, t in self.models[k].items()} for k in self.algorithm.models_to_send(site, info)}
        scratch = self.state[site].copy()
        reply = self.algorithm.local_round(site, info, sent, self.work(site, info.round, scratch))
        validate_reply(reply, sent, self.algorithm.num_models)
        self.state[site] = scratch
        traffic = {
            "sent": sum(params_nbytes(p) for p in sent.values()),
            "received": sum(params_nbytes(p) for p in reply.models.values()) + 8 * (len(reply.losses) + 1),
        }
        return reply, traffic

    def evaluate(self, round_idx: int) -> dict[str, dict[str, Any]]:
        """Every site's deployed model on its test split (and after fine-tuning, if configured)."""
        out: dict[str, dict[str, Any]] = {}
        ft_epochs = self.config.run.finetune_eval_epochs
        for site in sorted(self.sites):
            work = self.work(site, round_idx, self.state[site].copy())  # evaluation never changes state
            dep = self.algorithm.deploy(site, self.models, work)
            entry: dict[str, Any] = {"model": dep.model_index, "scores": list(dep.scores)}
            entry["metrics"] = self._score(work, dep.params, dep.slot)
            if ft_epochs:
                tuned = work.train(dep.params, slot="eval_finetune", from_slot=dep.slot, epochs=ft_epochs)
                entry["metrics_finetuned"] = self._score(work, tuned.params, "eval_finetune")
            out[site] = entry
        return out

    def _score(self, work: SiteWork, params: Params, slot: str) -> dict[str, float]:
        probs, targets = work.predict(params, slot=slot, split="test")
        if self.task in ("classification", "tabular"):
            return classification_metrics(probs.numpy(), targets.numpy())
        return segmentation_metrics(probs.argmax(dim=1, keepdim=True), targets, probs.shape[1])


def _prepare_run_dir(run_dir: Path, config: FederationConfig, *, resume: bool, overwrite: bool) -> checkpoint.Checkpoint | None:
    has_ckpt = checkpoint.latest_round(run_dir) is not None if run_dir.exists() else False
    if resume:
        ckpt = checkpoint.load(run_dir) if has_ckpt else None
        if ckpt is None:
            log.warning("%s has no checkpoint to resume from; starting at round 0", run_dir)
        elif ckpt.state.get("config_digest") != config.digest():
            raise RunDirError(f"{run_dir}: the checkpoint was made with a different config; resume with the run's own config.json")
        if ckpt is not None:
            return ckpt
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunDirError(f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to replace it")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_text(run_dir / "config.json", json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    (run_dir / "metrics.jsonl").write_text("", encoding="utf-8")
    return None


def _truncate_metrics(path: Path, last_round: int) -> list[dict[str, Any]]:
    """Keep only complete records of rounds <= last_round (a crash may leave later or torn lines)."""
    kept: list[dict[str, Any]] = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            if rec.get("round", math.inf) <= last_round:
                kept.append(rec)
    checkpoint.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def summarize_run(fed: Federation, records: Sequence[dict[str, Any]], evaluation: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The final summary: per-site deployed metrics, mean / worst / Jain, model use, traffic."""
    primary = PRIMARY[fed.task]
    per_site = {s: e["metrics"][primary] for s, e in evaluation.items()}
    traffic: dict[str, dict[str, int]] = {s: {"sent": 0, "received": 0} for s in fed.sites}
    for rec in records:
        for s, b in rec["bytes"].items():
            traffic[s]["sent"] += b["sent"]
            traffic[s]["received"] += b["received"]
    out: dict[str, Any] = {
        "algorithm": fed.config.algorithm.name,
        "num_models": fed.algorithm.num_models,
        "rounds": len(records),
        "metric": primary,
        "per_site": {
            s: {
                "metric": per_site[s],
                "model": evaluation[s]["model"],
                "metrics": evaluation[s]["metrics"],
                "protocol": fed.sites[s].metadata.get("protocol"),
                "n_train": fed.sites[s].size("train"),
                **({"metric_finetuned": evaluation[s]["metrics_finetuned"][primary]} if "metrics_finetuned" in evaluation[s] else {}),
            }
            for s in sorted(evaluation)
        },
        "summary": summarize(per_site),
        "bytes_total": traffic,
        "failures": {str(r["round"]): r["failures"] for r in records if r["failures"]},
        "config_digest": fed.config.digest(),
    }
    if any("metrics_finetuned" in e for e in evaluation.values()):
        out["summary_finetuned"] = summarize({s: e["metrics_finetuned"][primary] for s, e in evaluation.items()})
    return out


def run(
    config: FederationConfig,
    *,
    run_dir: str | Path,
    sites: Sequence[SiteData] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    callbacks: Callbacks | None = None,
) -> SimulationResult:
    """Run (or resume) a federation and return its result.

    Parameters
    ----------
    config
        The federation config.
    run_dir
        Where the resolved config, ``metrics.jsonl``, checkpoints and ``summary.json`` go.
    sites
        The sites' data; built from ``config.data`` when omitted.
    resume
        Continue from the last completed round in ``run_dir``.
    overwrite
        Replace an existing run in ``run_dir`` (ignored with ``resume``).
    stop_after
        Stop after this many rounds in this call (for tests and scheduled runs); the run can be resumed.
    callbacks
        Progress hooks.
    """
    run_dir = Path(run_dir)
    cb = callbacks or Callbacks()
    fed = Federation(config, sites if sites is not None else build_sites(config.data, source=config.source))
    ckpt = _prepare_run_dir(run_dir, config, resume=resume, overwrite=overwrite)
    start = 0
    history: list[dict[str, Any]] = []
    if ckpt is not None:
        fed.models = ckpt.server_models
        fed.state.update({s: ckpt.sites.get(s, SiteState()) for s in fed.sites})
        start = ckpt.round + 1
        history = _truncate_metrics(run_dir / "metrics.jsonl", ckpt.round)
        log.info("resuming %s after round %d", run_dir, ckpt.round)
    end = config.run.rounds if stop_after is None else min(config.run.rounds, start + stop_after)
    records: list[dict[str, Any]] = []
    evaluation: dict[str, dict[str, Any]] = {}
    for r in range(start, end):
        t0 = time.perf_counter()
        participants = fed.participants(r)
        info = fed.round_info(r, participants)
        if cb.on_round_start:
            cb.on_round_start(r, participants)
        replies: dict[str, SiteReply] = {}
        traffic: dict[str, dict[str, int]] = {}
        failures: dict[str, str] = {}
        for site in participants:
            try:
                replies[site], traffic[site] = fed.site_step(site, info)
            except Exception as exc:  # a crashed site must not crash the federation
                failures[site] = f"{type(exc).__name__}: {exc}"
                log.warning("round %d: site %s skipped: %s", r, site, failures[site])
            if cb.on_site_done:
                cb.on_site_done(r, site)
        step = fed.algorithm.aggregate(info, fed.models, replies)
        fed.models = step.models
        last = r == config.run.rounds - 1
        if last or r % config.run.eval_every == 0 or r == end - 1:
            evaluation = fed.evaluate(r)
        record = {
            "round": r,
            "participants": participants,
            "failures": failures,
            "server": step.log,
            "site_losses": {s: list(rep.losses) for s, rep in replies.items()},
            "site_info": {s: dict(rep.info) for s, rep in replies.items()},
            "assignments": {s: e["model"] for s, e in evaluation.items()},
            "metrics": {s: e["metrics"] for s, e in evaluation.items()},
            "summary": summarize({s: e["metrics"][PRIMARY[fed.task]] for s, e in evaluation.items()}),
            "bytes": traffic,
            "seconds": round(time.perf_counter() - t0, 4),
        }
        _append_jsonl(run_dir / "metrics.jsonl", record)  # before the checkpoint: a completed round always has its record
        checkpoint.save(run_dir, r, server_models=fed.models, sites=fed.state, state={"config_digest": config.digest()})
        records.append(record)
        if cb.on_round_end:
            cb.on_round_end(record)
    completed = (checkpoint.latest_round(run_dir) or 0) + 1 if (run_dir / "checkpoints").exists() else 0
    if not evaluation:
        evaluation = fed.evaluate(max(completed - 1, 0))
    summary = summarize_run(fed, history + records, evaluation)
    summary["finished"] = completed >= config.run.rounds
    if fed.models:
        save_file({f"{k}/{n}": t.contiguous() for k, m in enumerate(fed.models) for n, t in m.items()}, str(run_dir / ".models.tmp"))
        os.replace(run_dir / ".models.tmp", run_dir / "models.safetensors")
        summary["models_sha256"] = checkpoint.sha256_file(run_dir / "models.safetensors")
    checkpoint.atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return SimulationResult(run_dir=run_dir, rounds_completed=completed, models=fed.models, summary=summary, records=records)

"""A finished (or interrupted) run loaded back from its run directory, and site reports on it.

Nothing about the data is stored in a run directory: :func:`load_run` rebuilds the
sites from the resolved ``config.json`` (``fedfew_med.data.build_sites``), takes the
server models and site states of the latest checkpoint, and deploys and scores
exactly as the simulation's evaluation does (``SiteRuntime.work`` at the
checkpoint's round, ``Algorithm.deploy``, the test split, ``fedfew_med.metrics``).
The point estimates of a :class:`SiteReport` therefore equal the run's
``summary.json`` (and so do its warnings); the bootstrap intervals, PPV / NPV and, for
segmentation on images with a physical voxel size, HD95 in mm are added on top.

Every model file read here is checked against the SHA-256 recorded when it was written
(checkpoints by :func:`fedfew_med.checkpoint.load`, the served ``models.safetensors`` by
:meth:`Run.final_models`); a changed or corrupt file raises ``CheckpointError`` naming it.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfew_med import checkpoint
from fedfew_med.algorithms import Algorithm, Deployment, Params
from fedfew_med.config import FederationConfig
from fedfew_med.data import SiteData, build_sites
from fedfew_med.data.patches import GridPatches
from fedfew_med.deployment import chooser, load_released
from fedfew_med.dp.federation import network_preparer, private_sites
from fedfew_med.evaluation.choose import read_summary, run_config
from fedfew_med.evaluation.geometry import grid_spacing
from fedfew_med.evaluation.report import Deployed, SiteReport, explain
from fedfew_med.evaluation.stats import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    bootstrap,
    classification_statistic,
    mean_statistic,
    per_case_segmentation,
    predictive_values,
)
from fedfew_med.evaluation.table import Table
from fedfew_med.metrics import (
    classification_metrics,
    headline_metric,
    prediction_checks,
    result_flags,
    segmentation_metrics,
)
from fedfew_med.runtime import ModelFacts, SiteRuntime, local_runtimes, make_algorithm
from fedfew_med.training import SiteState, SiteWork


class UnknownSiteError(ValueError):
    """A site name that is not one of the run's sites; the message lists the sites there are."""


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of ``metrics.jsonl``, stopping at a torn last line (a run killed mid-write)."""
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


class Run:
    """A run directory loaded for evaluation; build it with :func:`load_run`.

    Attributes
    ----------
    run_dir
        The directory.
    config
        The resolved federation config of the run.
    records
        Per-round records from ``metrics.jsonl`` (up to the checkpoint's round).
    summary
        ``summary.json`` (empty if the run never wrote one).
    round
        The last completed round (of the latest checkpoint).
    server_models
        The K server models of that checkpoint.
    site_states
        Every site's persistent state (personal/local models, norm buffers) of that checkpoint.
    site_data
        The sites' data, rebuilt from the config.
    algorithm
        The run's algorithm object (its ``deploy`` picks each site's model).
    """

    def __init__(self, run_dir: Path, config: FederationConfig, records: list[dict[str, Any]], summary: dict[str, Any],
                 ckpt: checkpoint.Checkpoint, sites: list[SiteData]) -> None:
        self.run_dir = run_dir
        self.config = config
        self.records = records
        self.summary = summary
        self.round = ckpt.round
        self.server_models: list[Params] = ckpt.server_models
        self.site_states: dict[str, SiteState] = ckpt.sites
        self.site_data: dict[str, SiteData] = {s.name: s for s in sites}
        self.algorithm: Algorithm
        prepare = network_preparer(config, sites)  # a DP run's models belong to the DP-ready network (no BatchNorm)
        self.algorithm, _ = make_algorithm(config, ModelFacts.common(sites), prepare)
        self._runtimes: dict[str, SiteRuntime] = local_runtimes(config, sites, self.algorithm, prepare=prepare)
        for name, rt in self._runtimes.items():
            rt.state = self.site_states.get(name, SiteState())
        # a DP site deploys by the losses it released, as in the run (fedfew_med.deployment)
        self._private = set(private_sites(config, sites))
        self._released = load_released(ckpt.state.get("released_losses"))
        self._reports: dict[tuple[str, int, float, int], SiteReport] = {}

    def __repr__(self) -> str:
        return f"Run({str(self.run_dir)!r}, {self.label}, {len(self.sites)} sites, round {self.round})"

    @property
    def sites(self) -> list[str]:
        """Site names, sorted."""
        return sorted(self.site_data)

    def resolve_site(self, site: str | None = None) -> str:
        """``site`` if it is one of the run's sites; the run's first site (:attr:`sites`) when it is empty.

        Raises
        ------
        UnknownSiteError
            When ``site`` names no site of this run (the message lists the run's sites).
        """
        return self._known(site) if site else self.sites[0]

    def _known(self, site: str) -> str:
        if site not in self.site_data:
            raise UnknownSiteError(f"{self.run_dir} has no site {site!r}; its sites are {', '.join(self.sites)} "
                                   "(an empty site name picks the first one)")
        return site

    def class_names(self, site: str | None = None) -> tuple[str, ...]:
        """The label names of ``site`` (default: the first site), from its site file; empty when it has none."""
        meta = self.site_data[self.resolve_site(site)].metadata
        names = meta.get("classes") or meta.get("class_names") or ()
        return tuple(str(n) for n in names)

    @property
    def method(self) -> str:
        """The algorithm's config name (``fedfew``, ``fedavg``, ``local``...)."""
        return self.config.algorithm.name

    @property
    def num_models(self) -> int:
        """K, the number of server models (0 for Local)."""
        return self.algorithm.num_models

    @property
    def label(self) -> str:
        """``method (K=k)``, or the method alone when it has at most one server model."""
        return f"{self.method} (K={self.num_models})" if self.num_models > 1 else self.method

    @property
    def task(self) -> str:
        return next(iter(self.site_data.values())).task

    @property
    def metric(self) -> str:
        """The run's headline metric: ``[run].metric``, else the task's (``accuracy``, ``dice``)."""
        return headline_metric(self.task, self.config.run.metric)

    def final_models(self) -> list[Params]:
        """The K server models the run wrote at its end (``models.safetensors``), after checking their SHA-256.

        Raises
        ------
        fedfew_med.checkpoint.CheckpointError
            The file or ``summary.json`` is missing, or the file differs from the digest the summary recorded.
        """
        return checkpoint.load_final(self.run_dir)

    def final_metrics(self) -> dict[str, dict[str, float]]:
        """Every site's deployed-model test metrics as the run recorded them (no recomputation)."""
        if self.summary.get("per_site"):
            return {s: dict(v["metrics"]) for s, v in self.summary["per_site"].items()}
        for rec in reversed(self.records):
            if rec.get("metrics"):
                return {s: dict(m) for s, m in rec["metrics"].items()}
        return {}

    def site_report(self, site: str, *, n_resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                    seed: int = DEFAULT_SEED) -> SiteReport:
        """Deploy ``site``'s model as the run does and score it on the site's test split.

        Parameters
        ----------
        site
            Site name (see :attr:`sites`).
        n_resamples, level, seed
            Percentile bootstrap over test cases (see :mod:`fedfew_med.evaluation.stats`).

        Returns
        -------
        SiteReport
            Reports are kept on the run object, so asking twice costs nothing.

        Raises
        ------
        UnknownSiteError
            When ``site`` is not a site of the run.
        """
        self._known(site)
        key = (site, n_resamples, level, seed)
        if key not in self._reports:
            self._reports[key] = self._report(site, n_resamples=n_resamples, level=level, seed=seed)
        return self._reports[key]

    def deployed_predictions(self, site: str, split: str = "test") -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """``site``'s deployed model (chosen as the run does) applied to one of its splits.

        Returns
        -------
        probs, targets, model_index
            As :meth:`fedfew_med.training.SiteWork.predict` (records in the split's stored order),
            and the deployed server model's index (None for a site-local model).
        """
        rt = self._runtimes[self._known(site)]
        work = rt.work(self.round, rt.state.copy())  # as SiteRuntime.evaluate: the real state stays untouched
        dep = self._deploy(site, work)
        probs, targets = work.predict(dep.params, slot=dep.slot, split=split)
        return probs, targets, dep.model_index

    def _deploy(self, site: str, work: SiteWork) -> Deployment:
        """``Algorithm.deploy`` as the run's evaluation called it (a DP site: by its released losses)."""
        return self.algorithm.deploy(site, self.server_models, chooser(work, site=site, private=site in self._private,
                                                                       released=self._released.get(site)))

    def _report(self, site: str, *, n_resamples: int, level: float, seed: int) -> SiteReport:
        rt = self._runtimes[site]
        work = rt.work(self.round, rt.state.copy())  # as SiteRuntime.evaluate: the real state stays untouched
        dep = self._deploy(site, work)
        split = getattr(getattr(self.algorithm, "options", None), "selection_split", "train") if dep.scores else None
        deployed = Deployed(
            model_index=dep.model_index, slot=dep.slot, scores=tuple(float(s) for s in dep.scores), selection_split=split,
            reason=explain(method=self.label, num_models=self.num_models, model_index=dep.model_index, slot=dep.slot,
                           scores=tuple(dep.scores), selection_split=split),
        )
        probs_t, targets_t = work.predict(dep.params, slot=dep.slot, split="test")
        probs = probs_t.numpy()
        data = self.site_data[site]
        checks: dict[str, float] = {}
        hd95_note = ""
        if data.task in ("classification", "tabular"):
            targets = targets_t.numpy()
            library = classification_metrics(probs, targets)
            checks = prediction_checks(probs, targets)
            flags = result_flags({**library, **checks})  # the run's own warnings (summary.json per_site.<site>.flags)
            point = {**library, **predictive_values(probs, targets)}
            statistic = classification_statistic(probs, targets)
            per_case = {"correct": (probs.argmax(axis=1) == targets).astype(np.float64), "confidence": probs.max(axis=1)}
        else:
            pred: torch.Tensor | list[torch.Tensor] = probs_t.argmax(dim=1, keepdim=True)
            cases: torch.Tensor | list[torch.Tensor] = targets_t
            test = data.splits["test"]
            if isinstance(test, GridPatches):  # whole volumes, as the run scores them (runtime.score)
                pred, cases, probs_t, targets_t = whole_volumes(test, probs_t, targets_t)
                probs = probs_t.numpy()
            geometry = grid_spacing(data)
            hd95_note = geometry.note
            with warnings.catch_warnings():  # MONAI's own call of a deprecated argument, not ours
                warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
                point = segmentation_metrics(pred, cases, probs.shape[1])
                per_case = per_case_segmentation(pred, cases, probs.shape[1], spacing=geometry.spacing)
            flags = result_flags(point)
            if "hd95_mm" in per_case:  # the mean over cases with both masks, as the run's pixel value
                point["hd95_mm"] = float(np.nanmean(per_case["hd95_mm"])) if np.isfinite(per_case["hd95_mm"]).any() else float("nan")
            statistic = mean_statistic(per_case)
            targets = targets_t[:, 0].numpy()
        metrics = bootstrap(statistic, point, len(probs), n_resamples=n_resamples, level=level, seed=seed)
        images = None
        if data.spatial_dims == 2:  # the unshuffled loader gives the order predict used
            tiles = torch.cat([b["image"] for b in data.loader("test", batch_size=256)])
            test = data.splits["test"]
            images = (pad_stack(test.stitch(tiles)) if isinstance(test, GridPatches) and data.task == "segmentation" else tiles).numpy()
        return SiteReport(site=site, method=self.label, task=data.task, deployed=deployed, probs=probs, targets=targets,
                          images=images, metrics=metrics, per_case=per_case, primary=self.metric,
                          metadata=dict(data.metadata), class_names=self.class_names(site), checks=checks,
                          flags=tuple(flags), seed=seed, hd95_note=hd95_note)


def whole_volumes(test: GridPatches, probs: torch.Tensor, targets: torch.Tensor
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """A patch site's test predictions put back into whole volumes.

    Returns the predicted and reference masks per volume ((1, *spatial_i) each, for the metrics),
    and the class probabilities (V, C, *S) and reference masks (V, 1, *S) stacked for the report's
    arrays (:func:`pad_stack`: certain background where a volume is smaller than the largest).
    """
    preds, refs, volumes = test.volume_masks(probs, targets)
    return preds, refs, pad_stack(volumes, background=1.0), pad_stack(refs).to(targets.dtype)


def pad_stack(tensors: Sequence[torch.Tensor], background: float = 0.0) -> torch.Tensor:
    """(C, *spatial_i) tensors stacked as (V, C, *S), each padded at the end of every axis to the largest.

    Padding is 0, except channel 0 which is ``background`` (1.0 for class probabilities: certain
    background). The metrics are computed on the unpadded masks; padding only aligns the arrays.
    """
    size = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].ndim)] if tensors else []
    out = torch.zeros((len(tensors), tensors[0].shape[0] if tensors else 1, *size), dtype=tensors[0].dtype if tensors else torch.float32)
    out[:, 0] = background
    for i, t in enumerate(tensors):
        box: tuple[int | slice, ...] = (i, slice(None), *(slice(0, n) for n in t.shape[1:]))
        out[box] = t
    return out


def load_run(run_dir: str | Path) -> Run:
    """Load a run directory written by ``fedfew-med simulate`` (or ``fedfew_med.simulation.run``).

    Raises
    ------
    FileNotFoundError
        When the directory, its ``config.json`` or a completed checkpoint is missing.
    ValueError
        When the checkpoint was made with a different config than ``config.json``.
    """
    path = Path(run_dir)
    config = run_config(path)
    ckpt = checkpoint.load(path)
    if ckpt is None:
        raise FileNotFoundError(f"{path}: no completed round to evaluate (checkpoints/LATEST is missing)")
    if ckpt.state.get("config_digest") != config.digest():
        raise ValueError(f"{path}: the latest checkpoint was made with a different config than config.json")
    records = [r for r in read_records(path / "metrics.jsonl") if r.get("round", -1) <= ckpt.round]
    return Run(path, config, records, read_summary(path), ckpt, build_sites(config.data, source=config.source))


def load_runs(run_dirs: Mapping[str, str | Path], *, skip_missing: bool = True) -> dict[str, Run]:
    """Load several runs by label; directories without ``config.json`` are skipped when ``skip_missing``."""
    return {label: load_run(d) for label, d in run_dirs.items()
            if not skip_missing or (Path(d) / "config.json").is_file()}


def baseline_runs(run: Run, run_dirs: Mapping[str, str | Path]) -> tuple[dict[str, Run], dict[str, str]]:
    """The runs of ``run_dirs`` that can be set beside ``run``, and why each other one cannot.

    A baseline is comparable when it trained on the same data config (:func:`compare` scores
    every run on the same test cases); one that does not exist or used other data is left out
    with the reason, so that a notebook pointed at another federation's baselines says so
    instead of failing.

    Returns
    -------
    kept, skipped
        Comparable runs by label; a sentence per label left out.
    """
    kept: dict[str, Run] = {}
    skipped: dict[str, str] = {}
    for label, found in load_runs(run_dirs).items():
        if found.config.data == run.config.data:
            kept[label] = found
        else:
            skipped[label] = (f"{found.run_dir} trained on other data ({', '.join(found.sites)}) than this run "
                              f"({', '.join(run.sites)}): its test cases are not this run's")
    for label, d in run_dirs.items():
        if label not in kept and label not in skipped:
            skipped[label] = f"no run at {d} (no config.json)"
    return kept, skipped


def site_reports(runs: Mapping[str, Run], site: str, *, n_resamples: int = DEFAULT_RESAMPLES,
                 level: float = DEFAULT_LEVEL, seed: int = DEFAULT_SEED) -> dict[str, SiteReport]:
    """``site``'s report in every run, by label, with the same bootstrap settings (same resampled cases)."""
    return {label: r.site_report(site, n_resamples=n_resamples, level=level, seed=seed) for label, r in runs.items()}


def compare(runs: Mapping[str, Run], site: str, *, metrics: list[str] | None = None,
            n_resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL, seed: int = DEFAULT_SEED) -> Table:
    """One row per run: the model ``site`` deploys and its test metrics with CIs.

    Parameters
    ----------
    runs
        Runs by label (e.g. ``{"FedFew": run, "FedAvg": fedavg, "Local only": local}``); all must use the
        same data config, so that every row scores the same test cases.
    site
        Site name, present in every run.
    metrics
        Metrics to show (default: all the task has).
    n_resamples, level, seed
        Bootstrap settings, identical for every row (the same resampled cases for every method).
    """
    if not runs:
        raise ValueError("compare needs at least one run")
    first = next(iter(runs.values()))
    for label, r in runs.items():
        if r.config.data != first.config.data:
            raise ValueError(f"run {label!r} ({r.run_dir}) uses different data than {first.run_dir}; its test cases differ")
    reports = site_reports(runs, site, n_resamples=n_resamples, level=level, seed=seed)
    names = metrics or list(next(iter(reports.values())).metrics)
    rows = []
    for label, rep in reports.items():
        model = "own" if rep.deployed.model_index is None else str(rep.deployed.model_index)
        rows.append([label, rep.method, model, *[rep.metrics[m] for m in names]])
    notes = [f"{round(level * 100)}% percentile-bootstrap intervals, {n_resamples} resamples of the test cases (seed {seed})."]
    notes += [f"WARNING: {label}: {flag}" for label, rep in reports.items() for flag in rep.flags]
    return Table(["run", "method", "deployed model", *names], rows, title=f"{site}: deployed model on its test split",
                 notes=tuple(notes))

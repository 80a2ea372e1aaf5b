"""A site that never trained picks one of a finished federation's K models (``fedfew-med choose-model``).

A hospital that joins after training has its own labelled data and the run directory (the
resolved ``config.json``, the K final models in ``models.safetensors`` and ``summary.json``
that holds their SHA-256); it has none of the other sites' files. It scores each of the K
models on its own records, exactly as a trained site deploys (the lowest loss on the split the
algorithm selects on, FedFew's ``selection_split``, else ``train``), with no training and
nothing leaving the site. The choice is written to ``RUN_DIR/choices/<site>.json`` where
``predict`` finds it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from fedfew_med import checkpoint
from fedfew_med.algorithms import Params, build_algorithm
from fedfew_med.algorithms.base import argmin_loss
from fedfew_med.config import ConfigError, FederationConfig, federation_from_dict
from fedfew_med.data import SiteData
from fedfew_med.data.sites import load_site
from fedfew_med.dp.federation import dp_ready_preparer
from fedfew_med.models import parameters_of
from fedfew_med.runtime import ModelFacts, local_runtimes, make_algorithm, network_factory, score
from fedfew_med.training import SiteState

CHOICES_DIR = "choices"


@dataclass(frozen=True)
class Choice:
    """What a new site chose and why.

    Attributes
    ----------
    site, site_config
        The site's name and the site file it was read from.
    model
        Index of the chosen server model (lowest loss).
    losses
        Mean loss of each of the K models on ``split`` of the site's records.
    margin
        Second-lowest minus lowest loss (NaN when K = 1): how clear the choice is.
    split, n_records
        The split scored and its number of records.
    test_metrics
        Each model's test-split metrics (``score_test``), for checking how close the choice
        came to the best of the K; empty when not asked for.
    """

    site: str
    site_config: str
    model: int
    losses: tuple[float, ...]
    margin: float
    split: str
    n_records: int
    test_metrics: tuple[dict[str, float], ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN margin as null)."""
        out = asdict(self)
        out["losses"] = list(self.losses)
        out["test_metrics"] = [dict(m) for m in self.test_metrics]
        out["margin"] = None if math.isnan(self.margin) else self.margin
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Choice:
        margin = data.get("margin")
        return cls(site=str(data["site"]), site_config=str(data["site_config"]), model=int(data["model"]),
                   losses=tuple(float(v) for v in data["losses"]), margin=float("nan") if margin is None else float(margin),
                   split=str(data["split"]), n_records=int(data["n_records"]),
                   test_metrics=tuple(dict(m) for m in data.get("test_metrics", [])))


def run_config(run_dir: Path) -> FederationConfig:
    """The resolved config a run directory was written with.

    Raises
    ------
    FileNotFoundError
        The directory has no ``config.json`` (the message says how to make a run directory).
    """
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no config.json); make one with "
                                f"`fedfew-med simulate CONFIG -o {run_dir}`")
    return federation_from_dict(json.loads(path.read_text(encoding="utf-8")), source=str(path))


def read_summary(run_dir: Path) -> dict[str, Any]:
    """The run's ``summary.json``, or an empty dict when the run never wrote one."""
    path = run_dir / "summary.json"
    return dict(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else {}


def _shapes(params: Params) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in params.items()}


def run_dp_ready(summary: Mapping[str, Any]) -> bool | None:
    """Whether the run's networks are the DP-ready rewrite, as its ``summary.json`` (:func:`read_summary`) records it.

    None for a summary written before ``dp_ready`` was recorded that shows no privacy entry.
    """
    if "dp_ready" in summary:
        return bool(summary["dp_ready"])
    return True if summary.get("privacy") else None


def site_preparer(config: FederationConfig, facts: ModelFacts, reference: Params, dp_ready: bool | None) -> Any:
    """None, or the DP-ready rewrite: the network the run trained, checked against its parameters.

    A DP run's models belong to the DP-ready network (GroupNorm for BatchNorm); a site alone
    cannot see which of the run's sites trained privately, so the run's record decides
    (``dp_ready``, :func:`run_dp_ready`). Parameter shapes alone cannot (GroupNorm's weights
    have BatchNorm's shapes): only when the record is silent (None) do they pick, the plain
    network first. ``reference`` is one of the run's models.

    Raises
    ------
    ConfigError
        When neither network takes the run's parameters: the site's data does not fit the models.
    """
    want = _shapes(reference)
    candidates: list[Any] = [None, dp_ready_preparer(config)] if dp_ready is None else [
        dp_ready_preparer(config) if dp_ready else None]
    for prepare in candidates:
        try:
            net: nn.Module = network_factory(config, facts, prepare)(0)
        except ConfigError:
            continue
        if _shapes(parameters_of(net)) == want:
            return prepare
    net = network_factory(config, facts, None)(0)
    got = _shapes(parameters_of(net))
    first = next((n for n in want if got.get(n) != want[n]), next(iter(want)))
    raise ConfigError(
        f"the site's data does not fit the run's models ({config.model.name}): parameter {first!r} is "
        f"{want[first]} in the run but {got.get(first)} for this site's images (in_channels {facts.in_channels}, "
        f"{facts.num_classes} classes, {facts.spatial_dims}-D, size {facts.image_size}); check [preprocessing] "
        "against the federation's site files"
    )


def choose_model(run_dir: str | Path, site_config: str | Path, *, split: str | None = None,
                 score_test: bool = False) -> Choice:
    """Score the run's K final models on a new site's own labelled records and pick the lowest loss.

    Parameters
    ----------
    run_dir
        A finished run (``models.safetensors`` verified against ``summary.json``).
    site_config
        The new site's TOML file (validated as ``validate-site`` does).
    split
        The split to score (``train``, ``val`` or ``test``); default: the split the run's
        algorithm selects on (FedFew's ``selection_split``), else ``train``.
    score_test
        Also score each model on the site's test split (for studies such as leave-one-site-out).

    Raises
    ------
    ConfigError
        The site's data cannot feed the run's models, or the run has no shared models to choose from.
    fedfew_med.checkpoint.CheckpointError
        ``models.safetensors`` is missing or differs from the digest ``summary.json`` recorded.
    """
    site = load_site(site_config, feature_order=read_summary(Path(run_dir)).get("features"))  # tabular: the run's column order
    return choose_for_site(run_dir, site, split=split, score_test=score_test,
                           shown=str(site_config))


def choose_for_site(run_dir: str | Path, site: SiteData, *, split: str | None = None, score_test: bool = False,
                    shown: str = "<memory>") -> Choice:
    """:func:`choose_model` on a site's data already loaded (``shown``: the site file, for messages and the record)."""
    run_dir = Path(run_dir)
    config = run_config(run_dir)
    kept = build_algorithm(config.algorithm.name, config.algorithm.params, seed=0, where=f"{config.source}: [algorithm]")
    models = checkpoint.load_final(run_dir) if kept.num_models else []
    if not models:
        raise ConfigError(f"{run_dir}: {config.algorithm.name} keeps no shared models (only site-local ones): "
                          "a site that did not train has nothing to choose from")
    facts = ModelFacts.common([site])
    prepare = site_preparer(config, facts, models[0], run_dp_ready(read_summary(run_dir)))
    algorithm, _ = make_algorithm(config, facts, prepare)
    chosen_split = str(split or getattr(getattr(algorithm, "options", None), "selection_split", "train"))
    if site.size(chosen_split) == 0:  # type: ignore[arg-type]
        raise ConfigError(f"{shown}: site {site.name} has no {chosen_split!r} records to score the models on")
    runtime = local_runtimes(config, [site], algorithm, prepare=prepare)[site.name]
    work = runtime.work(0, SiteState())  # the round only seeds training, and nothing trains here
    best, losses = argmin_loss(work, models, split=chosen_split)
    ranked = sorted(losses)
    margin = ranked[1] - ranked[0] if len(ranked) > 1 else float("nan")
    tested: tuple[dict[str, float], ...] = ()
    if score_test and site.size("test"):
        tested = tuple(score(work, m, f"server/{k}") for k, m in enumerate(models))
    return Choice(site=site.name, site_config=shown, model=best, losses=tuple(losses), margin=margin,
                  split=chosen_split, n_records=site.size(chosen_split), test_metrics=tested)  # type: ignore[arg-type]


def choice_path(run_dir: str | Path, site: str) -> Path:
    """Where a new site's choice is kept: ``RUN_DIR/choices/<site>.json``."""
    return Path(run_dir) / CHOICES_DIR / f"{site}.json"


def write_choice(run_dir: str | Path, choice: Choice) -> Path:
    """Write ``choice`` atomically where :func:`read_choice` (and ``predict``) find it."""
    path = choice_path(run_dir, choice.site)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_text(path, json.dumps(choice.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def read_choice(run_dir: str | Path, site: str) -> Choice | None:
    """The choice a new site wrote into the run directory, or None."""
    path = choice_path(run_dir, site)
    if not path.is_file():
        return None
    return Choice.from_dict(json.loads(path.read_text(encoding="utf-8")))

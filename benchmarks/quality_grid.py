"""Protocol 2's grids: every method's configurations, the same budget for each (see :mod:`quality`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from quality_data import Dataset

from fedfew_med.algorithms.fedfew import PRESETS as FEDFEW_PRESETS

PROTOCOL = 2  # 1: FedFew (reference) tuned on μ only, baselines on a knob or lr; 2: every method, the same budget
BUDGET = 4  # configurations per method
KNOB_LR_SCALES = (1.0, 2.0)  # client lr × these, for a method with a knob of its own (2 knob values)
LR_SCALES = (0.5, 1.0, 1.5, 2.0)  # client lr × these, for a method without one
OLD_LR_SCALES = (0.5, 1.0, 2.0)
FEDFEW_MUS = (0.1, 0.3)  # default preset: temperature over models, on the log loss (a relative gap)
REFERENCE_MUS = (0.01, 0.1)  # reference preset: 0.01 is the authors' default
PROX = (0.01, 0.1)
DITTO = (0.1, 1.0)
FT_EPOCHS = (1, 5)
KS = (3,)
REFERENCE_MU = 0.01  # the reference code's default, used by the lr ablation
LR_ABLATION = f"ablation: fedfew K=3, mu={REFERENCE_MU}, lr grid"



@dataclass(frozen=True)
class Config:
    """One point of a method's grid."""

    method: str  # the row label, e.g. "fedfew K=3"
    setting: str  # the tuned value, e.g. "mu=0.01"
    overrides: tuple[str, ...]


def algorithm_overrides(name: str, **params: Any) -> tuple[str, ...]:
    """The ``--set``-style overrides that make a run use algorithm ``name`` with exactly ``params``."""
    body = ", ".join(f"{k} = {json.dumps(v)}" for k, v in params.items())
    return (f"algorithm.name='{name}'", f"algorithm.params={{{body}}}")


def method_grid(dataset: Dataset, *, ks: Sequence[int] = (3,), quick: bool, lr_ablation: bool = False) -> list[Config]:
    """Every method's configurations under protocol 2 (see the module docstring).

    Each method gets :data:`BUDGET` configurations: its own knob (two values) × the client lr (× 1, × 2),
    or, for a method without a knob of its own, four learning rates. ``ks`` adds FedFew (default preset)
    and IFCA rows for other K (same budget each). With ``lr_ablation``, the earlier protocol's labelled row
    (:data:`LR_ABLATION`) is added too; it never takes part in the headline.
    """
    lr = dataset.config.training.lr
    m = len(dataset.sites)
    pick: Callable[[Sequence[Any]], Sequence[Any]] = (lambda g: g[:1]) if quick else (lambda g: g)

    def knob(method: str, name: str, key: str, values: Sequence[Any], **params: Any) -> list[Config]:
        return [Config(method, f"{key}={v}, lr={lr * s:g}", (*algorithm_overrides(name, **params, **{key: v}), f"training.lr={lr * s}"))
                for v in pick(values) for s in pick(KNOB_LR_SCALES)]

    def lr_only(method: str, name: str, **params: Any) -> list[Config]:
        return [Config(method, f"lr={lr * s:g}", (*algorithm_overrides(name, **params), f"training.lr={lr * s}")) for s in pick(LR_SCALES)]

    out: list[Config] = []
    for k in [k for k in ks if k <= m]:
        out += knob(f"fedfew K={k}", "fedfew", "mu", FEDFEW_MUS, k=k)
    if 3 <= m:
        # FedFew's own knob, then one fine-tune epoch. μ equal to the preset's is left implicit: the same
        # overrides as the earlier grid's (epochs knob at the preset's μ), so those runs keep their cache keys.
        default_mu = FEDFEW_PRESETS["default"]["mu"]
        out += [Config("fedfew_ft K=3", f"mu={v}, lr={lr * s:g}",
                       (*algorithm_overrides("fedfew_ft", k=3, finetune_epochs=1, **({} if v == default_mu else {"mu": v})),
                        f"training.lr={lr * s}"))
                for v in pick(FEDFEW_MUS) for s in pick(KNOB_LR_SCALES)]
        out += knob("fedfew reference K=3", "fedfew", "mu", REFERENCE_MUS, preset="reference", k=3)
    out += lr_only("local", "local")
    out += lr_only("fedavg", "fedavg")
    out += knob("fedprox", "fedprox", "mu_prox", PROX)
    for k in [k for k in ks if 2 <= k <= m]:
        out += lr_only(f"ifca K={k}", "ifca", k=k)
    out += knob("ditto", "ditto", "lam", DITTO)
    out += knob("fedavg_ft", "fedavg_ft", "finetune_epochs", FT_EPOCHS)
    if lr_ablation and 3 <= m:
        out += [Config(LR_ABLATION, f"lr={lr * s:g}", (*algorithm_overrides("fedfew", preset="reference", k=3, mu=REFERENCE_MU), f"training.lr={lr * s}"))
                for s in pick(OLD_LR_SCALES)]
    return out


# ------------------------------------------------------------------------------------------------ one run


def finetune_twins(grid: Sequence[Config]) -> dict[Config, Config]:
    """FedFew's configurations (default preset, K = 3) mapped to their ``fedfew_ft`` twins in ``grid``.

    A twin has the same setting (μ and lr), so it trains exactly as its FedFew configuration does (the
    same K models) and differs only at deployment, where the chosen model is fine-tuned.
    """
    fedfew = {c.setting: c for c in grid if c.method == "fedfew K=3"}
    return {fedfew[c.setting]: c for c in grid if c.method == "fedfew_ft K=3" and c.setting in fedfew}


def deployment_twins(grid: Sequence[Config]) -> dict[Config, list[Config]]:
    """Configurations of ``grid`` that train exactly as another of its configurations, by the one that trains them.

    They differ from it only at deployment: ``fedfew_ft`` fine-tunes the chosen model after training as
    FedFew does at the same μ and lr (:func:`finetune_twins`); FedAvg + FT, for either number of fine-tune
    epochs, fine-tunes the global model after training as FedAvg does at the same lr.
    """
    out = {base: [twin] for base, twin in finetune_twins(grid).items()}
    fedavg = {_lr(c): c for c in grid if c.method == "fedavg"}
    for c in grid:
        if c.method == "fedavg_ft" and _lr(c) in fedavg:
            out.setdefault(fedavg[_lr(c)], []).append(c)
    return out


def _lr(cfg: Config) -> str:
    """The ``training.lr=...`` override of ``cfg`` (every grid configuration has one)."""
    return next(o for o in cfg.overrides if o.startswith("training.lr="))


def grid_record(ks: Sequence[int]) -> dict[str, Any]:
    """The grids' values, as written into a results file (``fedfew_ft``: its knob and fine-tune epochs)."""
    return {"budget": BUDGET, "knob_lr_scale": KNOB_LR_SCALES, "lr_scale": LR_SCALES, "fedfew_mu": FEDFEW_MUS,
            "reference_mu": REFERENCE_MUS, "mu_prox": PROX, "ditto_lam": DITTO, "finetune_epochs": FT_EPOCHS,
            "fedfew_ft": {"mu": FEDFEW_MUS, "finetune_epochs": 1}, "k": list(ks)}

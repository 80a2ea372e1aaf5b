"""Personalization quality: FedFew against every baseline, each tuned on validation with the same budget, 3 seeds.

Run one data set per call (``--list`` shows them)::

    .venv/bin/python benchmarks/quality.py --dataset heart            # full: 3 seeds, every grid
    .venv/bin/python benchmarks/quality.py --dataset heart --quick    # smoke run: 1 seed, 2 rounds, 1 configuration per method

Data sets (``--dataset``), all prepared on first use under ``--data-dir`` (default ``data/``):

* ``heart``: Fed-Heart-Disease, FLamby's 4 real hospitals (logistic regression, 30 rounds, lr 0.01,
  batch 4); FLamby's published figures are printed next to ours, labelled as published.
* ``br35h-4-a0.5``, ``br35h-4-a0.1``, ``br35h-10-a0.5``, ``br35h-10-a0.1``: Br35H brain MRI split over
  4 or 10 simulated sites with Dirichlet label skew α (partition seed 0), the demo's network and
  training (``site_configs/br35h_federation.toml``: 20 rounds, lr 0.01, batch 32).
* ``segmentation``: the synthetic segmentation federation (``site_configs/synthetic_segmentation.toml``:
  6 sites, UNet, Dice, 10 rounds).
* ``demo``: the synthetic classification demo (``site_configs/demo_federation.toml``, 6 sites, 15 rounds).
* ``fmnist-dir0.1``, ``fmnist-path2``: Fashion-MNIST (Debian package ``dataset-fashion-mnist``) merged and
  split over 20 sites, Dirichlet α = 0.1 or 2 classes per site, 75/25 per site, the two-convolution CNN of
  the pFL literature (``pflcnn``, 582,026 parameters), 20 rounds, 1 local epoch, Protocol 2 (one for every method; ``"protocol": 2`` in the results): the data, network, optimiser,
rounds, local epochs and run seeds are the same; only ``[algorithm]`` and the client learning rate change.
Each site is scored with the model it would deploy (FedFew / IFCA: lowest training loss of the K models;
``fedfew_ft`` and FedAvg + FT: that model after local fine-tuning; Ditto / Local: the personal model), on
its held-out **test** split for the table and on its **validation** slice (carved from its training split,
never trained on) for tuning. **Every method gets the same budget of 4 configurations**, chosen on the
mean validation metric over sites averaged over seeds:

======================  ============================================  ==================================
method                  grid (lr = the data set's client lr)           knob
======================  ============================================  ==================================
FedFew K=3 (default)    μ ∈ {0.1, 0.3} × lr × {1, 2}                  temperature over models (log loss)
fedfew_ft K=3           μ ∈ {0.1, 0.3} × lr × {1, 2}                  as FedFew, then 1 fine-tune epoch
FedFew reference K=3    μ ∈ {0.01, 0.1} × lr × {1, 2}                 the authors' preset
Local, FedAvg, IFCA K=3 lr × {0.5, 1, 1.5, 2}                         no knob of their own
FedProx                 μ_prox ∈ {0.01, 0.1} × lr × {1, 2}
Ditto                   λ ∈ {0.1, 1} × lr × {1, 2}
FedAvg + FT             fine-tune epochs ∈ {1, 5} × lr × {1, 2}
======================  ============================================  ==================================

``fedfew_ft``'s grid was fine-tune epochs ∈ {1, 5} × lr at the preset's μ = 0.1 until the six finished
grids showed what that cost: ``fedfew_ft`` trains exactly as FedFew at the same μ, lr and seed (the same K
models; only the deployment differs), so ``benchmarks/finetune_effect.py`` reads fine-tuning's own effect
off in pairs, and it was small (one epoch: −0.008 to +0.008 of test mean on Br35H 10 sites α 0.5 at 80
rounds, −0.001 to +0.011 on 4 sites α 0.1), while μ = 0.3 instead of 0.1 was worth +0.014 to +0.022 of
validation in the FedFew row on the three Br35H federations run (+0.016 on the demo). A fixed μ, not
fine-tuning, had put ``fedfew_ft`` 2–2.6 points under FedAvg. It now searches FedFew's own knob with one epoch (the same budget of 4); its rows in the
finished grids were rerun with ``--methods fedfew_ft --merge`` (recorded under ``updates``).

Rounds rule (full runs): FedAvg at the data set's rounds R and at 2R (same seeds, validation only); R
is enough when 2R gains less than 1 point of validation mean. The result is written as
``rounds_check`` and stated in the Markdown; a data set that fails it needs more rounds (``--rounds``).
``--rounds-check`` runs only the check, before a grid, so that R is settled before the grid spends its
hours (its runs go to the run cache, and the grid's own check reuses them).

Comparison: for ``fedfew K=3`` and ``fedfew_ft K=3`` against the best baseline (by test mean) and
against FedAvg, the difference as a **paired bootstrap interval** over seeds and sites (mean) and over
seeds (worst site), 95 %, 10,000 draws (:func:`paired_bootstrap`); ``matches`` = the interval reaches 0
or above on both. ``--ks`` adds FedFew and IFCA rows for other K; ``--lr-ablation`` adds the earlier
protocol's labelled row (reference preset at μ = 0.01 over lr × {0.5, 1, 2}); neither is in the headline.
The partition is fixed (seed 0); the run seed (initialisation, data order) varies over ``--seeds``.

Reported per method: mean over sites (± std over seeds), worst site, Jain's index (means over seeds),
bytes moved per round (both directions, all sites), wall time per run, the selected configuration and
every configuration's test / validation / worst; per run, collapse diagnostics (largest α per round,
models in use, spread of the K models, re-seeds) and the site replies the server skipped (a failed site,
e.g. a diverging update over ``[faults].max_update_norm``; shown per configuration in the Markdown when
any). Output: ``benchmarks/results/quality_<dataset>[_quick].json``, ``.md`` and ``.png``.

md`` and ``.png``.

Run times (protocol 1, 35–45 configurations; protocol 2 has 36 plus the rounds check), measured on 2
shared, heavily loaded CPU cores with ``--threads 1``: ``heart`` full (35 configurations × 3 seeds × 30 rounds) 12 min; ``--quick`` runs take 2–10 min per data set (the
``wall_seconds`` of each ``*_quick.json``). A full run costs about (configurations × seeds × the
``s/run`` of its rows), with s/run growing linearly in rounds. Measured full runs on the 2 cores:
``br35h-4-*`` about 125 min, ``br35h-10-*`` about 100 min each (two side by side), ``segmentation``
27 min; the Fashion-MNIST grids need days on 2 cores and have not been run in full. ``--jobs 2`` runs
two runs side by side (forked processes of ``--threads`` each, :mod:`run_pool`) with the same figures,
so a one-thread grid does not leave the second core idle.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Generator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"

from run_pool import map_runs  # noqa: E402  (benchmarks/, this script's folder)

from fedfew_med import checkpoint  # noqa: E402
from fedfew_med.algorithms.fedfew import PRESETS as FEDFEW_PRESETS  # noqa: E402
from fedfew_med.config import MAX_ROUNDS, FederationConfig, federation_from_dict, load_federation  # noqa: E402
from fedfew_med.data import SiteData, build_sites  # noqa: E402
from fedfew_med.metrics import PRIMARY, classification_metrics, segmentation_metrics  # noqa: E402
from fedfew_med.rundir import mean_alpha_max  # noqa: E402
from fedfew_med.simulation import Federation, run  # noqa: E402
from fedfew_med.training import SiteState  # noqa: E402

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
CACHE_VERSION = 3  # 2: FedFew's defaults became preset "default"; 3: the key holds the resolved algorithm options
REFERENCE_MU = 0.01  # the reference code's default, used by the lr ablation
LR_ABLATION = f"ablation: fedfew K=3, mu={REFERENCE_MU}, lr grid"

# FLamby (du Terrail et al., NeurIPS 2022 Datasets & Benchmarks), Fed-Heart-Disease, mean accuracy over the 4 centres.
FLAMBY_PUBLISHED = {
    "pooled": 0.735, "best local": 0.722, "FedAvg": 0.685, "FedProx": 0.685, "FedAdagrad": 0.731, "FedAvg + fine-tuning": 0.735,
}


@dataclass
class Dataset:
    """A federation to benchmark: its base config and its sites (built once, shared by every run)."""

    name: str
    config: FederationConfig
    sites: list[SiteData]
    description: str
    base_overrides: list[str] = field(default_factory=list)
    source: Path | None = None  # the TOML file the config came from (None: built from a dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def with_overrides(self, overrides: Sequence[str]) -> FederationConfig:
        if self.source is not None:
            return load_federation(self.source, [*self.base_overrides, *overrides])
        return _dict_config(self.config.to_dict(), [*self.base_overrides, *overrides])  # idempotent overrides


def _dict_config(base: dict[str, Any], overrides: Sequence[str]) -> FederationConfig:
    """Apply ``key.path=value`` overrides (values as TOML literals) to a config dict."""
    import tomllib

    doc = json.loads(json.dumps(base))
    for item in overrides:
        key, value = item.split("=", 1)
        parsed = tomllib.loads(f"v = {value}")["v"]
        *parents, last = key.strip().split(".")
        node = doc
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = parsed
    return federation_from_dict(doc)


# ------------------------------------------------------------------------------------------------ data sets


def _heart(data_dir: Path, quick: bool, args: argparse.Namespace) -> Dataset:
    from fedfew_med.datasets import prepare_heart_disease

    folder = data_dir / "heart-disease"
    if not (folder / "federation.toml").exists():
        prepare_heart_disease(folder)
    base = ["run.rounds=2"] if quick else []
    config = load_federation(folder / "federation.toml", base)
    return Dataset("heart", config, build_sites(config.data), "Fed-Heart-Disease (FLamby), 4 real hospitals, logistic regression",
                   base, folder / "federation.toml")


def _br35h(num_sites: int, alpha: float) -> Callable[[Path, bool, argparse.Namespace], Dataset]:
    def build(data_dir: Path, quick: bool, args: argparse.Namespace) -> Dataset:
        from fedfew_med.datasets import prepare_br35h

        folder = data_dir / f"br35h-{num_sites}-a{alpha}"
        if not (folder / "federation.toml").exists():
            prepare_br35h(folder, num_sites=num_sites, alpha=alpha, seed=0)
        files = ", ".join(f"'{folder / f'site{i}.toml'}'" for i in range(num_sites))
        base = [f"data.params.files=[{files}]"] + (["run.rounds=2"] if quick else [])
        source = ROOT / "site_configs" / "br35h_federation.toml"
        config = load_federation(source, base)
        return Dataset(f"br35h-{num_sites}-a{alpha}", config, build_sites(config.data),
                       f"Br35H, {num_sites} simulated sites, Dirichlet alpha {alpha} (partition seed 0)", base, source)

    return build


def _segmentation(data_dir: Path, quick: bool, args: argparse.Namespace) -> Dataset:
    source = ROOT / "site_configs" / "synthetic_segmentation.toml"
    base = ["run.rounds=2", "data.params.train_min=16", "data.params.train_max=24", "data.params.test_per_site=8"] if quick else []
    config = load_federation(source, base)
    return Dataset("segmentation", config, build_sites(config.data), "synthetic segmentation, 6 sites, UNet, Dice", base, source)


def _demo(data_dir: Path, quick: bool, args: argparse.Namespace) -> Dataset:
    source = ROOT / "site_configs" / "demo_federation.toml"
    base = ["run.rounds=2", "data.params.train_min=24", "data.params.train_max=40", "data.params.test_per_site=16"] if quick else []
    config = load_federation(source, base)
    return Dataset("demo", config, build_sites(config.data), "synthetic classification demo, 6 sites (3 protocols)", base, source)


def _fmnist(scheme: str) -> Callable[[Path, bool, argparse.Namespace], Dataset]:
    def build(data_dir: Path, quick: bool, args: argparse.Namespace) -> Dataset:
        from fedfew_med.datasets.fashion_mnist import fashion_mnist_sites, partition_summary

        sites = fashion_mnist_sites(
            num_sites=20, scheme="dirichlet" if scheme == "dir0.1" else "pathological", alpha=0.1, classes_per_site=2,
            seed=0, max_records=args.fmnist_records or (3000 if quick else None), root=args.fmnist_root,
        )
        doc = {
            "run": {"name": f"fmnist-{scheme}", "seed": 0, "rounds": 2 if quick else 20},
            "algorithm": {"name": "fedfew", "params": {"k": 3, "mu": 0.01}},
            "training": {"local_epochs": 1, "lr": 0.01, "batch_size": 32},
            "model": {"name": "pflcnn", "params": {"hidden": 512}},
            "data": {"name": "synthetic", "params": {}},  # placeholder: the sites are passed in memory
        }
        label = "Dirichlet alpha 0.1" if scheme == "dir0.1" else "pathological, 2 classes per site"
        return Dataset(f"fmnist-{scheme}", federation_from_dict(doc), sites, f"Fashion-MNIST, 20 sites, {label}, 75/25 per site",
                       meta={"partition": partition_summary(sites)})

    return build


DATASETS: dict[str, Callable[[Path, bool, argparse.Namespace], Dataset]] = {
    "heart": _heart,
    "br35h-4-a0.5": _br35h(4, 0.5),
    "br35h-4-a0.1": _br35h(4, 0.1),
    "br35h-10-a0.5": _br35h(10, 0.5),
    "br35h-10-a0.1": _br35h(10, 0.1),
    "segmentation": _segmentation,
    "demo": _demo,
    "fmnist-dir0.1": _fmnist("dir0.1"),
    "fmnist-path2": _fmnist("path2"),
}


# ------------------------------------------------------------------------------------------------ grid


@dataclass(frozen=True)
class Config:
    """One point of a method's grid."""

    method: str  # the row label, e.g. "fedfew K=3"
    setting: str  # the tuned value, e.g. "mu=0.01"
    overrides: tuple[str, ...]


PATH_OPTIONS = ("--data-dir", "--cache-dir", "--out", "--fmnist-root", "--work-dir")  # where, not what: left out of a recorded command


def recorded_command(script: str, argv: Sequence[str]) -> str:
    """The command that reproduces a result, without the options that only say where files are on this machine."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in PATH_OPTIONS:
            skip = True
            continue
        if any(arg.startswith(o + "=") for o in PATH_OPTIONS):
            continue
        kept.append(f"'{arg}'" if " " in arg else arg)
    return f"`python benchmarks/{script} " + " ".join(kept) + "`"


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


def algorithm_options(config: FederationConfig) -> dict[str, Any]:
    """The algorithm's options as resolved (a preset's values filled in): what a run actually used."""
    import dataclasses

    from fedfew_med.algorithms import build_algorithm

    options = build_algorithm(config.algorithm.name, config.algorithm.params).options  # type: ignore[attr-defined]
    return dataclasses.asdict(options)


def cache_key(dataset: Dataset, config: FederationConfig) -> str:
    """What a run's result depends on: the data set (its sites), the whole run config and the algorithm's
    resolved options (so a preset whose values change does not reuse runs made with the old values).

    A run that evaluates only at its end is keyed with ``eval_every = 10**6``, however it is
    written, as the first cached runs were (before [run].eval_every was bounded).
    """
    resolved = config.identity()  # the resolved config without where it ran (device) and the defaults added since v3
    if resolved["run"]["eval_every"] >= resolved["run"]["rounds"]:
        resolved["run"]["eval_every"] = 10**6
    digest = hashlib.sha256(json.dumps(resolved, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    blob = json.dumps({"version": CACHE_VERSION, "dataset": dataset.name,
                       "sites": [(s.name, s.size("train"), s.size("val"), s.size("test")) for s in dataset.sites],
                       "meta": dataset.meta, "config": digest, "options": algorithm_options(config), "torch": torch.__version__},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def run_config(dataset: Dataset, cfg: Config, seed: int) -> FederationConfig:
    """The whole config of one run (``cfg`` on ``seed``), evaluated only at its end; :func:`cache_key` keys it."""
    return dataset.with_overrides([*cfg.overrides, f"run.seed={seed}", f"run.eval_every={MAX_ROUNDS}"])


def run_one(dataset: Dataset, cfg: Config, seed: int, tmp: Path, cache: Path | None = None) -> dict[str, Any]:
    """One run: test summary, per-site test and validation metrics, bytes per round, wall time.

    With ``cache``, a finished run's result is kept as ``<cache>/<key>.json`` (key: :func:`cache_key`)
    and reused, so a benchmark stopped after some configurations continues where it stopped, and
    several invocations with disjoint ``--methods`` can share the work.
    """
    config = run_config(dataset, cfg, seed)
    cached = cache / f"{cache_key(dataset, config)}.json" if cache is not None else None
    if cached is not None and cached.is_file():
        return {**json.loads(cached.read_text()), "cached": True}
    out = _run_uncached(dataset, cfg, config, seed, tmp)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        part = cached.with_suffix(".part")
        part.write_text(json.dumps(out) + "\n")  # without a "cached" flag: only reuse sets it
        os.replace(part, cached)  # atomic: a killed benchmark never leaves half a result
    return out


def _run_uncached(dataset: Dataset, cfg: Config, config: FederationConfig, seed: int, tmp: Path) -> dict[str, Any]:
    run_dir = tmp / f"{cfg.method}-{cfg.setting}-{seed}".replace(" ", "_").replace("=", "")
    t = time.perf_counter()
    result = run(config, run_dir=run_dir, sites=dataset.sites, overwrite=True)
    seconds = time.perf_counter() - t
    val = validation_scores(config, dataset.sites, run_dir)
    traffic = result.summary["bytes_total"]
    total_bytes = sum(b["sent"] + b["received"] for b in traffic.values())
    return {
        "seed": seed,
        **result.summary["summary"],
        "per_site": {s: v["metric"] for s, v in result.summary["per_site"].items()},
        "val_mean": statistics.fmean(val.values()),
        "val_per_site": val,
        "bytes_per_round": total_bytes / max(result.rounds_completed, 1),
        "seconds": seconds,
        "diagnostics": diagnostics(result.records, result.summary),
    }


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


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    means = [r["mean"] for r in runs]
    return {
        "mean": statistics.fmean(means),
        "mean_std_over_seeds": statistics.pstdev(means) if len(means) > 1 else 0.0,
        "worst": statistics.fmean(r["worst"] for r in runs),
        "jain": statistics.fmean(r["jain"] for r in runs),
        "val_mean": statistics.fmean(r["val_mean"] for r in runs),
        "bytes_per_round": statistics.fmean(r["bytes_per_round"] for r in runs),
        "seconds_per_run": statistics.fmean(r["seconds"] for r in runs),
    }


def run_many(dataset: Dataset, tasks: Sequence[tuple[Config, int]], cache: Path | None, *, jobs: int = 1,
             threads: int = 1) -> Generator[dict[str, Any], None, None]:
    """:func:`run_one` for each (configuration, seed), in ``jobs`` forked processes (:mod:`run_pool`), in task order.

    The runs' folders live in one temporary folder, removed when the generator is exhausted or closed.
    """
    with tempfile.TemporaryDirectory() as tmp:
        yield from map_runs(lambda task: run_one(dataset, task[0], task[1], Path(tmp), cache), tasks, jobs=jobs, threads=threads)


def run_grid(dataset: Dataset, grid: Sequence[Config], seeds: Sequence[int], log: Callable[[str], None],
             cache: Path | None = None, *, jobs: int = 1, threads: int = 1) -> dict[str, Any]:
    """Every configuration on every seed; per method the configuration with the best validation mean.

    With ``jobs`` > 1 the runs go to that many forked processes (:mod:`run_pool`), ``threads`` torch
    threads each; the results, and so the tables, are the same as in one process.
    """
    by_config: dict[Config, dict[str, Any]] = {}
    with closing(run_many(dataset, [(cfg, seed) for cfg in grid for seed in seeds], cache, jobs=jobs, threads=threads)) as results:
        for i, cfg in enumerate(grid):
            runs = [next(results) for _ in seeds]
            by_config[cfg] = {**aggregate(runs), "per_seed": runs}
            row = by_config[cfg]
            log(f"[{i + 1}/{len(grid)}] {cfg.method:<12} {cfg.setting:<20} test {row['mean']:.3f} ± {row['mean_std_over_seeds']:.3f} "
                f"worst {row['worst']:.3f} val {row['val_mean']:.3f} ({row['seconds_per_run']:.1f} s/run)")
    methods: dict[str, Any] = {}
    for cfg, row in by_config.items():
        best = methods.get(cfg.method)
        if best is None or row["val_mean"] > best["val_mean"]:
            methods[cfg.method] = {**row, "selected": cfg.setting}
    for name, row in methods.items():
        row["grid"] = {c.setting: {"test_mean": r["mean"], "val_mean": r["val_mean"], "worst": r["worst"],
                                   "skipped": skipped_replies(r["per_seed"])}
                       for c, r in by_config.items() if c.method == name}
        runs = [x for c, r in by_config.items() if c.method == name for x in r["per_seed"]]
        row["run_seconds"] = sum(x["seconds"] for x in runs)
        row["cached_runs"] = sum(bool(x.get("cached")) for x in runs)
    return methods


# ------------------------------------------------------------------------------------------------ output


def result_name(dataset: Dataset, quick: bool) -> str:
    """``quality_<dataset>[_quick]``: the results' file stem and the run cache's folder (shared with sparse.py)."""
    return f"quality_{dataset.name}{'_quick' if quick else ''}"


def best_baseline(methods: dict[str, Any]) -> str:
    """The baseline with the highest test mean (a reader's 'best baseline', not a tuned choice)."""
    return max((m for m in methods if not m.startswith("fedfew") and m != LR_ABLATION and not m.startswith("ablation")),
               key=lambda m: methods[m]["mean"])


ROUNDS_GAIN = 0.01  # rounds are enough when doubling them gains FedAvg less than this on the validation mean
# Protocol rounds where a data set's own config runs too few for the rounds rule (measured, 3 seeds, FedAvg R -> 2R):
# segmentation 10 -> 20 gained +0.019 and 20 -> 40 +0.064, the demo 15 -> 30 +0.061, Br35H 4 sites a0.1 20 -> 40 +0.085. Each data set
# runs at these rounds under protocol 2 and its rounds check then looks at twice as many; the ablation keeps the
# data sets' own rounds. Checked ahead of their grids (--rounds-check): Br35H 4 sites a0.5 40 -> 80 +0.003 (flat);
# Br35H 10 sites a0.5 40 -> 80 +0.009 (flat, just; its 40-round grid's own check, on AVX-512 kernels, then gave +0.012),
# 80 -> 160 +0.029 (its 80-round grid's check), 160 -> 320 +0.017, 320 -> 640 -0.000 (flat), so it runs at 320;
# Br35H 4 sites a0.1 (its 40-round grid failed: +0.029 at 80) 80 -> 160
# -0.005 (flat), so it runs at 80; Br35H 10 sites a0.1 40 -> 80 +0.036, 80 -> 160 +0.036, 160 -> 320 +0.026, so it
# runs at 320 (its own check then looks at 640).
PROTOCOL_ROUNDS = {"segmentation": 40, "demo": 30, "br35h-4-a0.5": 40, "br35h-4-a0.1": 80, "br35h-10-a0.5": 320, "br35h-10-a0.1": 320}


def rounds_check(dataset: Dataset, seeds: Sequence[int], cache: Path | None, log: Callable[[str], None], *,
                 jobs: int = 1, threads: int = 1) -> dict[str, Any]:
    """The rounds rule: FedAvg (the data set's lr) at R and 2R rounds; R is enough when 2R gains < 1 point of validation.

    Only validation is looked at. Runs are cached like every other run (``jobs``: as in :func:`run_grid`).
    """
    rounds = dataset.config.run.rounds
    base = ("algorithm.name='fedavg'", "algorithm.params={}")
    # 2R first: the longest runs start first when they run side by side
    tasks = [(Config("rounds check", f"rounds={r}", (*base, f"run.rounds={r}")), s) for r in (2 * rounds, rounds) for s in seeds]
    vals = [r["val_mean"] for r in run_many(dataset, tasks, cache, jobs=jobs, threads=threads)]
    at = {2 * rounds: vals[:len(seeds)], rounds: vals[len(seeds):]}
    v1, v2 = statistics.fmean(at[rounds]), statistics.fmean(at[2 * rounds])
    out = {"rounds": rounds, "fedavg_val_mean": v1, "fedavg_val_mean_2x": v2, "gain": v2 - v1, "threshold": ROUNDS_GAIN,
           "flat": v2 - v1 < ROUNDS_GAIN, "seeds": list(seeds)}
    log(f"rounds check: FedAvg validation mean {v1:.3f} at {rounds} rounds, {v2:.3f} at {2 * rounds}: "
        f"{'flat' if out['flat'] else 'NOT flat'} (gain {v2 - v1:+.3f}, rule < {ROUNDS_GAIN})")
    return out


FEDFEW_ROWS = ("fedfew K=3", "fedfew_ft K=3")  # the rows the goal is about (default preset, with and without fine-tuning)


def paired_bootstrap(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], *, draws: int = 10000,
                     seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap of ``a − b`` over seeds and sites, from two methods' ``per_seed`` runs.

    Mean: the runs are paired by seed and, within a seed, by site; each draw resamples seeds with
    replacement and, inside every drawn seed, sites with replacement, and takes the mean difference.
    Worst site: per seed ``worst(a) − worst(b)``, resampled over seeds (with 3 seeds the interval is coarse;
    resampling sites would bias a minimum). 95 % percentile intervals.
    """
    import numpy as np

    by_seed_b = {r["seed"]: r for r in b}
    pairs = [(r, by_seed_b[r["seed"]]) for r in a if r["seed"] in by_seed_b]
    if not pairs:
        raise ValueError("no seed in common")
    sites = sorted(pairs[0][0]["per_site"])
    diff = np.array([[x["per_site"][s] - y["per_site"][s] for s in sites] for x, y in pairs])  # (seeds, sites)
    worst = np.array([x["worst"] - y["worst"] for x, y in pairs])  # (seeds,)
    rng = np.random.default_rng(seed)
    n_seeds, n_sites = diff.shape
    rows = rng.integers(0, n_seeds, size=(draws, n_seeds))
    cols = rng.integers(0, n_sites, size=(draws, n_seeds, n_sites))
    means = diff[rows[:, :, None], cols].mean(axis=(1, 2))
    worsts = worst[rng.integers(0, n_seeds, size=(draws, n_seeds))].mean(axis=1)
    return {
        "mean": float(diff.mean()), "mean_ci": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))],
        "worst": float(worst.mean()), "worst_ci": [float(np.quantile(worsts, 0.025)), float(np.quantile(worsts, 0.975))],
        "seeds": n_seeds, "sites": n_sites, "draws": draws,
    }


def comparisons(methods: dict[str, Any]) -> dict[str, Any]:
    """Each FedFew row (default, fedfew_ft) against the best baseline and FedAvg, as paired bootstrap intervals.

    ``matches``: the interval of the difference reaches 0 or above on mean **and** worst site (not worse
    beyond noise); ``within_1pt_of_fedavg``: the mean is at most 1 point below FedAvg's.
    """
    if not any(r in methods for r in FEDFEW_ROWS):
        return {}
    best = best_baseline(methods)
    out: dict[str, Any] = {"best_baseline": best}
    for row in FEDFEW_ROWS:
        if row not in methods:
            continue
        vs_best = paired_bootstrap(methods[row]["per_seed"], methods[best]["per_seed"])
        entry: dict[str, Any] = {"vs_best": vs_best,
                                 "matches": vs_best["mean_ci"][1] >= 0 and vs_best["worst_ci"][1] >= 0}
        if "fedavg" in methods:
            entry["vs_fedavg"] = paired_bootstrap(methods[row]["per_seed"], methods["fedavg"]["per_seed"])
            entry["within_1pt_of_fedavg"] = methods[row]["mean"] >= methods["fedavg"]["mean"] - 0.01
        out[row] = entry
    return out


def to_markdown(res: dict[str, Any]) -> str:
    methods = res["methods"]
    metric = res["metric"]
    lines = [
        f"# Quality: {res['description']}",
        "",
        f"{res['command']} — {len(res['seeds'])} seed(s) {res['seeds']}, {res['rounds']} rounds, metric: {metric} on each "
        f"site's test split; configurations chosen on the validation slice. Machine: {res['machine']}. "
        f"torch threads: {res.get('threads')}. Run time: {res.get('run_seconds_total', res['wall_seconds']) / 60:.1f} min "
        f"(sum over every run{', some reused from the run cache' if res.get('cached_runs') else ''}).",
        "",
        f"| method | selected | mean {metric} ± std over seeds | worst site | Jain | bytes/round | s/run |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in methods.items():
        lines.append(f"| {name} | {row['selected']} | {row['mean']:.3f} ± {row['mean_std_over_seeds']:.3f} | {row['worst']:.3f} | "
                     f"{row['jain']:.3f} | {row['bytes_per_round'] / 1e3:,.0f} kB | {row['seconds_per_run']:.1f} |")
    if res.get("published"):
        lines += ["", "Published (FLamby, du Terrail et al. 2022, Table 3 — not measured here):", "",
                  "| strategy | mean accuracy (published) |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in res["published"].items()]
    rc = res.get("rounds_check")
    if rc:
        lines += ["", f"Rounds rule: FedAvg's validation mean gains {rc['gain']:+.3f} from {rc['rounds']} to {2 * rc['rounds']} rounds "
                  f"({'below' if rc['flat'] else 'NOT below'} the {rc['threshold']:.2f} threshold: the curve has "
                  f"{'flattened' if rc['flat'] else 'not flattened'})."]
    for u in res.get("updates", []):
        lines += ["", f"Rerun later and merged into this grid: {', '.join(u['methods'])} ({u['command']}; {u['machine']})."]
    lines += ["", "Every configuration (test mean / validation mean / worst site):", ""]
    for name, row in methods.items():
        lines.append(f"- {name}: " + "; ".join(f"{k} {v['test_mean']:.3f} / {v['val_mean']:.3f} / {v['worst']:.3f}"
                                             + (f" ({v['skipped']} site replies skipped)" if v.get("skipped") else "")
                                             for k, v in row["grid"].items()))
    for row_name, c in res.get("comparison", {}).items():
        if row_name == "best_baseline":
            continue
        v = c["vs_best"]
        lines += ["", f"{row_name} − {res['comparison']['best_baseline']} (paired bootstrap, {v['seeds']} seeds × {v['sites']} sites): "
                  f"mean {v['mean']:+.3f} [{v['mean_ci'][0]:+.3f}, {v['mean_ci'][1]:+.3f}], worst site {v['worst']:+.3f} "
                  f"[{v['worst_ci'][0]:+.3f}, {v['worst_ci'][1]:+.3f}] — {'matches' if c['matches'] else 'below'}."]
    if LR_ABLATION in methods:
        a = methods[LR_ABLATION]
        lines += ["", f"Ablation (not part of the headline, which keeps FedFew at the data set's lr): FedFew K=3 at μ = "
                  f"{REFERENCE_MU} with the baselines' lr grid selects {a['selected']}: mean {a['mean']:.3f} ± "
                  f"{a['mean_std_over_seeds']:.3f}, worst {a['worst']:.3f} (grid: "
                  + ", ".join(f"{k} {v['test_mean']:.3f} / {v['val_mean']:.3f}" for k, v in a["grid"].items()) + ", test / val)."]
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = res["methods"]
    names = list(methods)
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names)), 3.5))
    ax.bar([i - 0.2 for i in x], [methods[n]["mean"] for n in names], 0.4,
           yerr=[methods[n]["mean_std_over_seeds"] for n in names], label="mean over sites (± std over seeds)")
    ax.bar([i + 0.2 for i in x], [methods[n]["worst"] for n in names], 0.4, label="worst site")
    ax.set_xticks(list(x), names, rotation=45, ha="right")
    ax.set_ylabel(res["metric"])
    ax.set_title(res["description"], fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merge_rows(res: dict[str, Any], rows: dict[str, Any], *, rounds: int, seeds: Sequence[int], where: str,
               update: dict[str, Any]) -> dict[str, Any]:
    """``res`` (a finished grid's results) with the method ``rows`` rerun and put in place of its own.

    A replaced row keeps its place in the table; the other rows, the rounds check and the machine stay;
    the comparison and the run-time totals are recomputed and ``update`` (what ran, where) is appended to
    ``res["updates"]``. Rows made at other rounds or seeds than the file's are refused (``where``: the file).
    """
    if res["rounds"] != rounds or list(res["seeds"]) != list(seeds):
        raise SystemExit(f"{where}: its grid ran at {res['rounds']} rounds on seeds {res['seeds']}; these rows ran at "
                         f"{rounds} rounds on seeds {list(seeds)}: pass --rounds and --seeds to match it")
    methods = {**res["methods"], **rows}
    return {**res, "methods": methods, "comparison": comparisons(methods),
            "run_seconds_total": sum(m["run_seconds"] for m in methods.values()),
            "cached_runs": sum(m["cached_runs"] for m in methods.values()),
            "updates": [*res.get("updates", []), {**update, "methods": list(rows)}]}


def write_results(
    res: dict[str, Any],
    stem: Path,
    markdown: Callable[[dict[str, Any]], str],
    draw: Callable[[dict[str, Any], Path], None],
) -> None:
    """Write ``<stem>.json``, ``.md`` and ``.png`` for ``res`` and print the Markdown table."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    table = markdown(res)
    Path(f"{stem}.md").write_text(table)
    draw(res, Path(f"{stem}.png"))  # names hold dots (alpha 0.5): no with_suffix
    print(table)
    print(f"wrote {stem}.json/.md/.png")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``) or the platform's machine type."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """Where a result was measured. The CPU model and torch's kernel level (AVX2, AVX512...) are part of it:
    the same run at 1 thread is bit-for-bit repeatable on one machine, but another kernel level or thread count
    rounds differently, and FedFew's reference step amplifies that (README, "Reproducing a figure")."""
    import os
    import platform

    return (f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
            f"{platform.platform()}")


def protocol_dataset(name: str, data_dir: Path, quick: bool, args: argparse.Namespace, *, rounds: int | None) -> Dataset:
    """Data set ``name`` at the rounds a run of it uses: ``rounds`` if given, else (full runs) its
    :data:`PROTOCOL_ROUNDS`, else its own config's."""
    dataset = DATASETS[name](data_dir.resolve(), quick, args)
    rounds = rounds if rounds is not None else (None if quick else PROTOCOL_ROUNDS.get(dataset.name))
    if rounds is not None:
        dataset.base_overrides.append(f"run.rounds={rounds}")
        dataset.config = dataset.with_overrides([])
    return dataset


def grid_record(ks: Sequence[int]) -> dict[str, Any]:
    """The grids' values, as written into a results file (``fedfew_ft``: its knob and fine-tune epochs)."""
    return {"budget": BUDGET, "knob_lr_scale": KNOB_LR_SCALES, "lr_scale": LR_SCALES, "fedfew_mu": FEDFEW_MUS,
            "reference_mu": REFERENCE_MUS, "mu_prox": PROX, "ditto_lam": DITTO, "finetune_epochs": FT_EPOCHS,
            "fedfew_ft": {"mu": FEDFEW_MUS, "finetune_epochs": 1}, "k": list(ks)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=list(DATASETS), help="the federation to benchmark")
    parser.add_argument("--list", action="store_true", help="list the data sets and grid sizes, then exit")
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 rounds, first and last grid values, small data (smoke run)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ks", type=int, nargs="+", default=list(KS), help="K of the FedFew (default preset) and IFCA rows")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--fmnist-root", type=Path, default=None, help="folder of the Fashion-MNIST IDX files")
    parser.add_argument("--rounds", type=int, default=None, help="override the data set's rounds (e.g. 1 for a smoke test)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="run only these methods (a label, or its name before ' K=': fedfew, 'fedfew reference', fedfew_ft, ifca)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on shared cores, 2 threads made a logistic-regression run 20x slower)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs side by side, in forked processes of --threads each (2: both of 2 cores busy at 1 thread; "
                             "the same figures)")
    parser.add_argument("--fmnist-records", type=int, default=None, help="use a random subset of this many records")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "runs" / "bench-cache",
                        help="finished runs are kept here and reused (a stopped benchmark continues; never committed)")
    parser.add_argument("--no-cache", action="store_true", help="run everything again")
    parser.add_argument("--rounds-check", action="store_true",
                        help="run only the rounds rule (FedAvg at R and 2R rounds, validation) and print it: settle R before a grid")
    parser.add_argument("--lr-ablation", action="store_true",
                        help="add FedFew K=3 at the reference mu with the baselines' lr grid (a labelled ablation row)")
    parser.add_argument("--merge", action="store_true",
                        help="with --methods: put the rerun rows into the existing results file in place of its own "
                             "(the other rows, the rounds check and the machine are kept)")
    args = parser.parse_args(argv)
    if args.merge and not args.methods:
        parser.error("--merge needs --methods (the rows to rerun)")
    if args.list:
        for name in DATASETS:
            print(name)
        return
    if args.dataset is None:
        parser.error("--dataset is required (or --list)")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Only one class is present")
    warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")  # label-skewed sites  # AUC on one-class val slices; accuracy is used
    seeds = args.seeds[:1] if args.quick else args.seeds
    ks = args.ks
    t0 = time.perf_counter()
    dataset = protocol_dataset(args.dataset, args.data_dir, args.quick, args, rounds=args.rounds)
    if args.rounds_check:
        cache = None if args.no_cache else args.cache_dir / result_name(dataset, args.quick)
        rounds_check(dataset, seeds, cache, lambda m: print(m, flush=True), jobs=args.jobs, threads=args.threads)
        return
    grid = method_grid(dataset, ks=ks, quick=args.quick, lr_ablation=args.lr_ablation)
    if args.methods:
        grid = [c for c in grid if any(c.method == m or c.method.split(" K=")[0] == m for m in args.methods)]
    print(f"{dataset.description}: {len(dataset.sites)} sites, {len(grid)} configurations x {len(seeds)} seeds", flush=True)
    cache = None if args.no_cache else args.cache_dir / result_name(dataset, args.quick)
    methods = run_grid(dataset, grid, seeds, lambda s: print(s, flush=True), cache, jobs=args.jobs, threads=args.threads)
    stem = args.out / result_name(dataset, args.quick)
    command = recorded_command("quality.py", sys.argv[1:] if argv is None else argv)
    if args.merge:
        where = Path(f"{stem}.json")
        if not where.is_file():
            raise SystemExit(f"{where}: no results to merge into (run the whole grid first)")
        update = {"command": command, "machine": machine(), "wall_seconds": time.perf_counter() - t0}
        merged = merge_rows(json.loads(where.read_text()), methods, rounds=dataset.config.run.rounds, seeds=seeds,
                            where=str(where), update=update)
        write_results({**merged, "grids": grid_record(ks)}, stem, to_markdown, plot)
        return
    res: dict[str, Any] = {
        "dataset": dataset.name,
        "description": dataset.description,
        "command": command,
        "quick": args.quick,
        "seeds": seeds,
        "rounds": dataset.config.run.rounds,
        "metric": PRIMARY[dataset.sites[0].task],
        "machine": machine(),
        "threads": args.threads,
        "protocol": PROTOCOL,
        "grids": grid_record(ks),
        "methods": methods,
        "published": FLAMBY_PUBLISHED if dataset.name == "heart" else None,
        "wall_seconds": time.perf_counter() - t0,
        "run_seconds_total": sum(m["run_seconds"] for m in methods.values()),
        "cached_runs": sum(m["cached_runs"] for m in methods.values()),
        **dataset.meta,
    }
    res["comparison"] = comparisons(methods)
    if not args.quick and not args.methods:
        res["rounds_check"] = rounds_check(dataset, seeds, cache, lambda m: print(m, flush=True), jobs=args.jobs, threads=args.threads)
    write_results(res, stem, to_markdown, plot)


if __name__ == "__main__":
    main()

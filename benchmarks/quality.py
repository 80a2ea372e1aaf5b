"""Personalization quality: FedFew (K × μ grid) against every baseline, tuned on validation, several seeds.

Run one data set per call (``--list`` shows them)::

    .venv/bin/python benchmarks/quality.py --dataset heart            # full: 3 seeds, every grid
    .venv/bin/python benchmarks/quality.py --dataset heart --quick    # smoke run: 1 seed, 2 rounds, 2-point grids

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
  the pFL literature (``smallcnn``), 20 rounds, 1 local epoch, lr 0.01, batch 32.

Protocol (one for every method): the data, network, optimiser, rounds, local epochs and run seeds are
the same; only ``[algorithm]`` (and, for methods without a hyperparameter of their own, the client
learning rate) changes. Each site is scored with the model it would deploy (FedFew: lowest training
loss of the K models; IFCA: the same rule; Ditto / Local: the personal model; FedAvg + FT: the global
model after fine-tuning), on its held-out **test** split for the table and on its **validation** slice
(carved from its training split, never trained on) for tuning. Every method gets at most 4
configurations, chosen on the mean validation metric over sites averaged over seeds:

=============  ===========================================  ==========================
method         grid                                         why
=============  ===========================================  ==========================
FedFew K=k     μ ∈ {0.001, 0.01, 0.1, 1}                    the reference ablation grid
IFCA K=k       lr × {0.5, 1, 2}                             no own hyperparameter
Local, FedAvg  lr × {0.5, 1, 2}                             no own hyperparameter
FedProx        μ_prox ∈ {0.001, 0.01, 0.1, 1}
Ditto          λ ∈ {0.01, 0.1, 0.5, 1}
FedAvg + FT    fine-tune epochs ∈ {1, 2, 5}
=============  ===========================================  ==========================

FedFew's client learning rate is never tuned (it keeps the data set's), so FedFew is tuned no more than
the baselines. ``--lr-ablation`` adds a separate, labelled row that shows what the learning rate is worth: FedFew
K = 3 at the reference μ = 0.01 with the baselines' lr grid (3 configurations); it is never used for the
headline. K values larger than the number of sites are skipped. The partition is fixed (seed 0);
the run seed (initialisation, data order) varies over ``--seeds``.

Reported per method: mean over sites (± std over seeds), worst site, Jain's index (means over seeds),
bytes moved per round (both directions, all sites), wall time per run, and the selected configuration;
plus the full FedFew K × μ grid (test and validation). Output: ``benchmarks/results/quality_<dataset>
[_quick].json``, ``.md`` and ``.png``.

Run times, measured on 2 shared, heavily loaded CPU cores with ``--threads 1``: ``heart`` full (35
configurations × 3 seeds × 30 rounds) 12 min; ``--quick`` runs take 2–10 min per data set (the
``wall_seconds`` of each ``*_quick.json``). A full run costs about (configurations × seeds × the
``s/run`` of its rows), with s/run growing linearly in rounds. Measured full runs on the 2 cores:
``br35h-4-*`` about 125 min, ``br35h-10-*`` about 100 min each (two side by side), ``segmentation``
27 min; the Fashion-MNIST grids need days on 2 cores and have not been run in full.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"

from fedfew_med import checkpoint  # noqa: E402
from fedfew_med.config import MAX_ROUNDS, FederationConfig, federation_from_dict, load_federation  # noqa: E402
from fedfew_med.data import SiteData, build_sites  # noqa: E402
from fedfew_med.metrics import PRIMARY, classification_metrics, segmentation_metrics  # noqa: E402
from fedfew_med.simulation import Federation, run  # noqa: E402
from fedfew_med.training import SiteState  # noqa: E402

MUS = (0.001, 0.01, 0.1, 1.0)
LR_SCALES = (0.5, 1.0, 2.0)
PROX = (0.001, 0.01, 0.1, 1.0)
DITTO = (0.01, 0.1, 0.5, 1.0)
FT_EPOCHS = (1, 2, 5)
KS = (1, 2, 3, 5)
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
            "model": {"name": "smallcnn", "params": {"hidden": 512}},
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


def method_grid(dataset: Dataset, *, ks: Sequence[int], quick: bool, lr_ablation: bool = False) -> list[Config]:
    """Every method's configurations (see the module docstring for the grids).

    With ``lr_ablation``, one more row (:data:`LR_ABLATION`): FedFew K = 3 at the reference μ with
    the baselines' learning-rate grid instead of the μ grid, to show how much of a gap to a
    baseline is the learning rate. It never takes part in the headline.
    """
    lr = dataset.config.training.lr
    m = len(dataset.sites)
    pick: Callable[[Sequence[Any]], Sequence[Any]] = (lambda g: (g[0], g[-1]) if len(g) > 1 else g) if quick else (lambda g: g)
    ks = [k for k in ks if k <= m]

    def alg(name: str, **params: Any) -> list[str]:
        body = ", ".join(f"{k} = {json.dumps(v)}" for k, v in params.items())
        return [f"algorithm.name='{name}'", f"algorithm.params={{{body}}}"]

    out: list[Config] = []
    for k in ks:
        for mu in pick(MUS):
            out.append(Config(f"fedfew K={k}", f"mu={mu}", tuple(alg("fedfew", k=k, mu=mu))))
    for name in ("local", "fedavg"):
        for s in pick(LR_SCALES):
            out.append(Config(name, f"lr={lr * s:g}", (*alg(name), f"training.lr={lr * s}")))
    for mu in pick(PROX):
        out.append(Config("fedprox", f"mu_prox={mu}", tuple(alg("fedprox", mu_prox=mu))))
    for k in ks:
        if k >= 2:
            for s in pick(LR_SCALES):
                out.append(Config(f"ifca K={k}", f"lr={lr * s:g}", (*alg("ifca", k=k), f"training.lr={lr * s}")))
    for lam in pick(DITTO):
        out.append(Config("ditto", f"lam={lam}", tuple(alg("ditto", lam=lam))))
    for e in pick(FT_EPOCHS):
        out.append(Config("fedavg_ft", f"finetune_epochs={e}", tuple(alg("fedavg_ft", finetune_epochs=e))))
    if lr_ablation and 3 in ks:
        for s in pick(LR_SCALES):
            out.append(Config(LR_ABLATION, f"lr={lr * s:g}", (*alg("fedfew", k=3, mu=REFERENCE_MU), f"training.lr={lr * s}")))
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


def cache_key(dataset: Dataset, config: FederationConfig) -> str:
    """What a run's result depends on: the data set (its sites) and the whole run config.

    A run that evaluates only at its end is keyed with ``eval_every = 10**6``, however it is
    written, as the first cached runs were (before [run].eval_every was bounded).
    """
    resolved = config.to_dict()
    if resolved["run"]["eval_every"] >= resolved["run"]["rounds"]:
        resolved["run"]["eval_every"] = 10**6
    digest = hashlib.sha256(json.dumps(resolved, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    blob = json.dumps({"dataset": dataset.name, "sites": [(s.name, s.size("train"), s.size("val"), s.size("test")) for s in dataset.sites],
                       "meta": dataset.meta, "config": digest, "torch": torch.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def run_one(dataset: Dataset, cfg: Config, seed: int, tmp: Path, cache: Path | None = None) -> dict[str, Any]:
    """One run: test summary, per-site test and validation metrics, bytes per round, wall time.

    With ``cache``, a finished run's result is kept as ``<cache>/<key>.json`` (key: :func:`cache_key`)
    and reused, so a benchmark stopped after some configurations continues where it stopped, and
    several invocations with disjoint ``--methods`` can share the work.
    """
    config = dataset.with_overrides([*cfg.overrides, f"run.seed={seed}", f"run.eval_every={MAX_ROUNDS}"])  # only at the end
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
    }


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


def run_grid(dataset: Dataset, grid: Sequence[Config], seeds: Sequence[int], log: Callable[[str], None],
             cache: Path | None = None) -> dict[str, Any]:
    """Every configuration on every seed; per method the configuration with the best validation mean."""
    by_config: dict[Config, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, cfg in enumerate(grid):
            runs = [run_one(dataset, cfg, seed, Path(tmp), cache) for seed in seeds]
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
        row["grid"] = {c.setting: {"test_mean": r["mean"], "val_mean": r["val_mean"], "worst": r["worst"]}
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
    return max((m for m in methods if not m.startswith("fedfew") and m != LR_ABLATION), key=lambda m: methods[m]["mean"])


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
    fedfew = [m for m in methods if m.startswith("fedfew K=")]
    if fedfew:
        settings = list(methods[fedfew[0]]["grid"])
        lines += ["", "FedFew grid (test mean / validation mean):", "", "| K | " + " | ".join(settings) + " |",
                  "|---|" + "---|" * len(settings)]
        for m in fedfew:
            g = methods[m]["grid"]
            lines.append(f"| {m.split('=')[1]} | " + " | ".join(f"{g[s]['test_mean']:.3f} / {g[s]['val_mean']:.3f}" for s in settings) + " |")
    if "fedfew K=3" in methods:
        b = best_baseline(methods)
        f = methods["fedfew K=3"]
        lines += ["", f"Headline: FedFew K=3 mean {f['mean']:.3f}, worst {f['worst']:.3f}; best baseline by test mean: {b} "
                  f"mean {methods[b]['mean']:.3f}, worst {methods[b]['worst']:.3f}."]
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


def machine() -> str:
    import os
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.platform()}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=list(DATASETS), help="the federation to benchmark")
    parser.add_argument("--list", action="store_true", help="list the data sets and grid sizes, then exit")
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 rounds, first and last grid values, small data (smoke run)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ks", type=int, nargs="+", default=list(KS), help="FedFew / IFCA K values")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--fmnist-root", type=Path, default=None, help="folder of the Fashion-MNIST IDX files")
    parser.add_argument("--rounds", type=int, default=None, help="override the data set's rounds (e.g. 1 for a smoke test)")
    parser.add_argument("--methods", nargs="+", default=None, help="run only these methods (a label, or its name before ' K=': fedfew, ifca)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on shared cores, 2 threads made a logistic-regression run 20x slower)")
    parser.add_argument("--fmnist-records", type=int, default=None, help="use a random subset of this many records")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "runs" / "bench-cache",
                        help="finished runs are kept here and reused (a stopped benchmark continues; never committed)")
    parser.add_argument("--no-cache", action="store_true", help="run everything again")
    parser.add_argument("--lr-ablation", action="store_true",
                        help="add FedFew K=3 at the reference mu with the baselines' lr grid (a labelled ablation row)")
    args = parser.parse_args(argv)
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
    ks = ([k for k in args.ks if k in (1, 3)] or args.ks[:1]) if args.quick else args.ks
    t0 = time.perf_counter()
    dataset = DATASETS[args.dataset](args.data_dir.resolve(), args.quick, args)
    if args.rounds is not None:
        dataset.base_overrides.append(f"run.rounds={args.rounds}")
        dataset.config = dataset.with_overrides([])
    grid = method_grid(dataset, ks=ks, quick=args.quick, lr_ablation=args.lr_ablation)
    if args.methods:
        grid = [c for c in grid if any(c.method == m or c.method.startswith(m + " ") for m in args.methods)]
    print(f"{dataset.description}: {len(dataset.sites)} sites, {len(grid)} configurations x {len(seeds)} seeds", flush=True)
    cache = None if args.no_cache else args.cache_dir / result_name(dataset, args.quick)
    methods = run_grid(dataset, grid, seeds, lambda s: print(s, flush=True), cache)
    res: dict[str, Any] = {
        "dataset": dataset.name,
        "description": dataset.description,
        "command": "`python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv) + "`",
        "quick": args.quick,
        "seeds": seeds,
        "rounds": dataset.config.run.rounds,
        "metric": PRIMARY[dataset.sites[0].task],
        "machine": machine(),
        "threads": args.threads,
        "grids": {"mu": MUS, "lr_scale": LR_SCALES, "mu_prox": PROX, "ditto_lam": DITTO, "finetune_epochs": FT_EPOCHS, "k": ks},
        "methods": methods,
        "published": FLAMBY_PUBLISHED if dataset.name == "heart" else None,
        "wall_seconds": time.perf_counter() - t0,
        "run_seconds_total": sum(m["run_seconds"] for m in methods.values()),
        "cached_runs": sum(m["cached_runs"] for m in methods.values()),
        **dataset.meta,
    }
    write_results(res, args.out / result_name(dataset, args.quick), to_markdown, plot)


if __name__ == "__main__":
    main()

"""What a benchmark grid reports: the best baseline, paired bootstrap comparisons, the Markdown and plot, merging rerun rows."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from quality_data import Dataset
from quality_grid import LR_ABLATION, REFERENCE_MU

FEDFEW_ROWS = ("fedfew K=3", "fedfew_ft K=3")  # the rows the goal is about (default preset, with and without fine-tuning)

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


def result_name(dataset: Dataset, quick: bool) -> str:
    """``quality_<dataset>[_quick]``: the results' file stem and the run cache's folder (shared with sparse.py)."""
    return f"quality_{dataset.name}{'_quick' if quick else ''}"


def baselines(methods: dict[str, Any]) -> list[str]:
    """The rows of ``methods`` that are baselines (not a FedFew row, not an ablation row)."""
    return [m for m in methods if not m.startswith("fedfew") and m != LR_ABLATION and not m.startswith("ablation")]


def best_baseline(methods: dict[str, Any]) -> str:
    """The baseline with the highest test mean (a reader's 'best baseline', not a tuned choice)."""
    return max(baselines(methods), key=lambda m: methods[m]["mean"])


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
    if not any(r in methods for r in FEDFEW_ROWS) or not baselines(methods):  # e.g. --methods fedfew fedfew_ft
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
    shared = {n: r["shared_training_runs"] for n, r in methods.items() if r.get("shared_training_runs")}
    if shared:
        made = "; ".join(f"{n} ({k} run{'s' if k != 1 else ''})" for n, k in shared.items())
        lines += ["", f"Made from another row's training: {made}. Each such run is the run of the same seed that trains as it "
                  "does (fedfew_ft: FedFew at its μ and lr; FedAvg + FT: FedAvg at its lr) with its own deployment applied; "
                  "its s/run includes that training, the run time above counts it once."]
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

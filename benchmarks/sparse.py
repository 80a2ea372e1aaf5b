"""Sparse FedFew: accuracy against bytes moved, with FedAvg and IFCA on the same plot.

    .venv/bin/python benchmarks/sparse.py --dataset demo            # full: 3 seeds
    .venv/bin/python benchmarks/sparse.py --dataset heart --quick   # smoke run: 1 seed, 2 rounds

In full FedFew every site trains and returns all K models every round (K× FedAvg's traffic). The
sparse modes let a site train and return only some of them: ``top_r`` (the r models with the largest
soft assignment w_ik) or ``threshold`` (those with w_ik above a threshold; at least the best one).
Rows (K = 3, μ = 0.01, the reference setting, for every FedFew row; nothing is tuned here, this is a
trade-off curve): full; top-r with r = 1, 2; threshold 0.1 and 0.3; FedAvg; IFCA K = 3.
Bytes are what the simulator counts on the wire (server → sites and sites → server, all sites),
averaged per round. The data sets are those of ``benchmarks/quality.py`` (``--dataset``).
Output: ``benchmarks/results/sparse_<dataset>[_quick].json``, ``.md`` and ``.png``. Finished runs are
cached with ``benchmarks/quality.py``'s (``--cache-dir``), so the full, FedAvg and IFCA rows reuse
its runs of the same configuration.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_data import DATASETS, RESULTS, ROOT  # noqa: E402
from quality_grid import Config, algorithm_overrides  # noqa: E402
from quality_report import machine, recorded_command, result_name, write_results  # noqa: E402
from quality_runs import aggregate, run_one  # noqa: E402

from fedfew_med.metrics import PRIMARY  # noqa: E402

K, MU = 3, 0.01


def configs() -> list[Config]:
    def fedfew(label: str, **extra: Any) -> Config:
        # the committed curves are the reference step's
        return Config(label, "", algorithm_overrides("fedfew", preset="reference", k=K, mu=MU, **extra))

    return [
        fedfew("fedfew full"),
        fedfew("fedfew top-1", sparse="top_r", sparse_r=1),
        fedfew("fedfew top-2", sparse="top_r", sparse_r=2),
        fedfew("fedfew w>0.1", sparse="threshold", sparse_threshold=0.1),
        fedfew("fedfew w>0.3", sparse="threshold", sparse_threshold=0.3),
        Config("fedavg", "", ("algorithm.name='fedavg'", "algorithm.params={}")),
        Config("ifca K=3", "", ("algorithm.name='ifca'", f"algorithm.params={{k = {K}}}")),
    ]


def to_markdown(res: dict[str, Any]) -> str:
    metric = res["metric"]
    lines = [
        f"# Sparse FedFew: {res['description']}",
        "",
        f"{res['command']} — seeds {res['seeds']}, {res['rounds']} rounds, K = {K}, μ = {MU}; metric: {metric} on each site's "
        f"test split. Machine: {res['machine']}, torch threads {res['threads']}. Wall time: {res['wall_seconds'] / 60:.1f} min.",
        "",
        f"| method | bytes/round | vs full FedFew | mean {metric} ± std over seeds | worst site | Jain |",
        "|---|---|---|---|---|---|",
    ]
    full = res["methods"]["fedfew full"]["bytes_per_round"]
    for name, row in res["methods"].items():
        lines.append(f"| {name} | {row['bytes_per_round'] / 1e3:,.1f} kB | {row['bytes_per_round'] / full:.2f} | "
                     f"{row['mean']:.3f} ± {row['mean_std_over_seeds']:.3f} | {row['worst']:.3f} | {row['jain']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in res["methods"].items():
        marker = "o" if name.startswith("fedfew") else "s"
        ax.errorbar(row["bytes_per_round"] / 1e3, row["mean"], yerr=row["mean_std_over_seeds"], fmt=marker, capsize=3, label=name)
        ax.scatter(row["bytes_per_round"] / 1e3, row["worst"], marker="v", color=ax.lines[-1].get_color() if ax.lines else None,
                   alpha=0.5)
    ax.set_xlabel("kB moved per round (all sites, both directions)")
    ax.set_ylabel(f"{res['metric']} (dot: mean over sites; triangle: worst site)")
    ax.set_title(res["description"], fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=list(DATASETS), default="demo")
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 rounds, small data (smoke run)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=None, help="override the data set's rounds (e.g. 1 for a smoke test)")
    parser.add_argument("--fmnist-root", type=Path, default=None)
    parser.add_argument("--fmnist-records", type=int, default=None)
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "runs" / "bench-cache",
                        help="finished runs are kept here and reused, shared with quality.py (the same run is keyed the same)")
    parser.add_argument("--no-cache", action="store_true", help="run everything again")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Only one class is present")
    warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")  # label-skewed sites
    seeds = args.seeds[:1] if args.quick else args.seeds
    t0 = time.perf_counter()
    dataset = DATASETS[args.dataset](args.data_dir.resolve(), args.quick, args)
    if args.rounds is not None:
        dataset.base_overrides.append(f"run.rounds={args.rounds}")
        dataset.config = dataset.with_overrides([])
    methods: dict[str, Any] = {}
    cache = None if args.no_cache else args.cache_dir / result_name(dataset, args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in configs():
            runs = [run_one(dataset, cfg, seed, Path(tmp), cache) for seed in seeds]
            methods[cfg.method] = {**aggregate(runs), "per_seed": runs}
            row = methods[cfg.method]
            print(f"{cfg.method:<14} {row['bytes_per_round'] / 1e3:10.1f} kB/round  mean {row['mean']:.3f}  worst {row['worst']:.3f}",
                  flush=True)
    res = {
        "dataset": dataset.name, "description": dataset.description, "quick": args.quick, "seeds": seeds,
        "command": recorded_command("sparse.py", sys.argv[1:]),
        "rounds": dataset.config.run.rounds, "metric": PRIMARY[dataset.sites[0].task], "machine": machine(),
        "threads": args.threads, "methods": methods, "wall_seconds": time.perf_counter() - t0,
    }
    write_results(res, args.out / f"sparse_{dataset.name}{'_quick' if args.quick else ''}", to_markdown, plot)


if __name__ == "__main__":
    main()

"""FedFew (K = 3) against FedAvg and Local on the Br35H demo federation, same seeds.

Run (about 12 minutes on 2 quiet CPU cores; ``--quick``: one seed, 4 rounds, about a minute)::

    .venv/bin/python benchmarks/br35h_quality.py [--data-dir data/br35h] [--seeds 0 1 2] [--quick]

The federation is the demo's (``site_configs/br35h_federation.toml``): Br35H's 3000 real brain-MRI
slices split over 4 simulated sites (Dirichlet label skew α = 0.5, per-site acquisition shift,
partition seed 0), written by ``fedfew-med datasets prepare br35h`` into ``--data-dir`` when it is
missing. Every method runs with the demo's model, optimiser, rounds and local work; only the
``[algorithm]`` table changes, and the run seed (model initialisation, data order) is the same for
every method in a row. Rows:

* ``fedfew`` — the demo configuration: the reference code's defaults (K = 3, μ = 0.01, identical
  initialisation, running training loss, sample-weighted sites, server learning rate 1);
* ``fedfew-slrK`` — the same with server learning rate K: in the reference step model k moves by
  c_k = Σ_i α_i w_ik times the sites' weighted delta and Σ_k c_k = 1, so each of the K models moves
  about 1/K as far per round as FedAvg's one model; this row undoes that;
* ``fedavg`` and ``local``.

Each site is scored with the model it deploys on its own held-out test split; the table gives the mean
over sites (± std over seeds), the worst site, Jain's index and wall time. Figures also go to
``benchmarks/results/br35h_quality[_quick].json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fedfew_med.config import load_federation
from fedfew_med.data import build_sites
from fedfew_med.datasets import prepare_br35h
from fedfew_med.simulation import run

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "site_configs" / "br35h_federation.toml"
RESULTS = Path(__file__).resolve().parent / "results"
METHODS: dict[str, list[str]] = {
    "fedfew": ["algorithm.params.preset='reference'"],  # the demo config's FedFew when this file was measured
    "fedfew-slrK": ["algorithm.params.preset='reference'", "algorithm.params.server_lr=3.0"],
    "fedavg": ["algorithm.name='fedavg'", "algorithm.params={}"],
    "local": ["algorithm.name='local'", "algorithm.params={}"],
}


def ensure_data(data_dir: Path) -> None:
    """Write the demo's Br35H federation into ``data_dir`` unless it is already there."""
    if (data_dir / "federation.toml").exists():
        return
    print(f"preparing Br35H (4 sites, alpha 0.5, seed 0) in {data_dir} ...", flush=True)
    prepare_br35h(data_dir, num_sites=4, alpha=0.5, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data" / "br35h")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=None, help="default: the config's rounds")
    parser.add_argument("--quick", action="store_true", help="one seed, 4 rounds (smoke run)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    args = parser.parse_args()
    seeds = args.seeds[:1] if args.quick else args.seeds
    rounds = 4 if args.quick else args.rounds
    ensure_data(args.data_dir.resolve())

    files = [f"'{args.data_dir.resolve() / f'site{i}.toml'}'" for i in range(4)]
    base = [f"data.params.files=[{', '.join(files)}]"] + ([f"run.rounds={rounds}"] if rounds else [])
    t0 = time.perf_counter()
    sites = build_sites(load_federation(CONFIG, base).data)  # read and cache the images once
    print(f"loaded 4 sites in {time.perf_counter() - t0:.0f} s", flush=True)

    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("br35h_quality_quick.json" if args.quick else "br35h_quality.json")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for method in args.methods:
                overrides = METHODS[method]
                config = load_federation(CONFIG, [*base, f"run.seed={seed}", *overrides])
                t = time.perf_counter()
                result = run(config, run_dir=Path(tmp) / f"{method}-{seed}", sites=sites)
                summary = result.summary["summary"]
                runs[method].append({"seed": seed, **summary, "seconds": time.perf_counter() - t})
                print(f"seed {seed} {method:<11} mean {summary['mean']:.3f} worst {summary['worst']:.3f}", flush=True)
                write(out, seeds, rounds, runs)  # after every run, so a long benchmark keeps what it measured


def write(out: Path, seeds: list[int], rounds: int | None, runs: dict[str, list[dict[str, Any]]]) -> None:
    """Print the table of ``runs`` so far and write it to ``out``."""
    rows = {}
    for method, per_seed in runs.items():
        if not per_seed:
            continue
        means = [r["mean"] for r in per_seed]
        rows[method] = {
            "mean": statistics.fmean(means),
            "mean_std_over_seeds": statistics.pstdev(means) if len(means) > 1 else 0.0,
            "worst": statistics.fmean(r["worst"] for r in per_seed),
            "jain": statistics.fmean(r["jain"] for r in per_seed),
            "seconds_per_run": statistics.fmean(r["seconds"] for r in per_seed),
            "seeds_at_least_fedavg": sum(a["mean"] >= b["mean"] for a, b in zip(per_seed, runs.get("fedavg", []), strict=False)),
            "per_seed": per_seed,
        }
    print(f"\nBr35H, 4 sites, seeds {seeds}, {rounds or 'config'} rounds")
    print(f"{'method':<12} {'mean acc':>15} {'worst':>7} {'Jain':>6} {'s/run':>6} {'seeds >= fedavg':>16}")
    for method, row in rows.items():
        print(
            f"{method:<12} {row['mean']:.3f} ± {row['mean_std_over_seeds']:.3f}   {row['worst']:.3f} "
            f"{row['jain']:.3f} {row['seconds_per_run']:6.0f} {row['seeds_at_least_fedavg']:>8}/{len(row['per_seed'])}"
        )
    out.write_text(json.dumps({"seeds": seeds, "rounds": rounds, "config": str(CONFIG.relative_to(ROOT)), "methods": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""FedFew ablation: which change to the reference step does what, one at a time, on several seeds.

    .venv/bin/python benchmarks/ablation.py --dataset heart              # 3 seeds
    .venv/bin/python benchmarks/ablation.py --dataset segmentation --seeds 0 1 2
    .venv/bin/python benchmarks/ablation.py --dataset heart --quick      # smoke run

Rows (FedFew K = 3, the data set's client lr, nothing tuned):

* ``reference``: the authors' behaviour (``preset = "reference"``, μ = 0.01).
* ``default``: ``preset = "default"`` (normalised per-model step, scale-free temperatures on the log
  loss with μ = 0.1 over models and μ_α = 1 over sites, independent inits, re-seeding after 3 idle
  rounds; sample-weighted sites as the reference).
* ``default - X``: the default with switch X back at the reference's value; ``default + X``: the
  default with a switch it leaves off turned on (uniform site weights).
* ``reference + X``: the reference with only switch X on.

Each change is thus seen on and off from both ends (interactions show as rows that do not add up).
Reported per row: mean and worst site on the test split, validation mean (what a choice may look at),
the mean of each round's largest α (1: one site holds all importance), distinct models deployed, and
the relative spread of the final K models. Runs are cached with ``benchmarks/quality.py``'s.
Output: ``benchmarks/results/ablation_<dataset>[_quick].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
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
from quality_report import machine, recorded_command, result_name  # noqa: E402
from quality_runs import aggregate, run_one  # noqa: E402

from fedfew_med.algorithms.fedfew import PRESETS  # noqa: E402

K = 3
# switch -> (its values when on, the reference's values). The default preset has a switch on when its values match.
CHANGES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "normalised step": ({"step": "normalized"}, {"step": "reference"}),
    "scale-free temperatures": ({"loss_scale": "log", "mu": 0.1, "mu_site": 1.0}, {"loss_scale": "linear", "mu": 0.01, "mu_site": 0.01}),
    "uniform site weights": ({"site_weights": "uniform"}, {"site_weights": "samples"}),
    "independent init": ({"init": "independent"}, {"init": "identical"}),
    "re-seeding": ({"reseed_after": 3}, {"reseed_after": 0}),
}


def in_default(on: dict[str, Any]) -> bool:
    """Whether the default preset has this switch on."""
    return all(PRESETS["default"].get(k) == v for k, v in on.items())


def _alg(params: dict[str, Any]) -> tuple[str, ...]:
    return algorithm_overrides("fedfew", **params)


def ablation_rows() -> list[Config]:
    """reference, default, the default with each switch flipped (``default - X`` or ``default + X``), reference + each."""
    rows = [Config("ablation", "reference", _alg({"preset": "reference", "k": K})),
            Config("ablation", "default", _alg({"preset": "default", "k": K}))]
    for name, (on, off) in CHANGES.items():
        if in_default(on):
            rows.append(Config("ablation", f"default - {name}", _alg({"preset": "default", "k": K, **off})))
        else:
            rows.append(Config("ablation", f"default + {name}", _alg({"preset": "default", "k": K, **on})))
    for name, (on, _off) in CHANGES.items():
        rows.append(Config("ablation", f"reference + {name}", _alg({"preset": "reference", "k": K, **on})))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=list(DATASETS), required=True)
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 rounds, small data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=None, help="only these rows (by setting name)")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "runs" / "bench-cache")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fmnist-root", type=Path, default=None)
    parser.add_argument("--fmnist-records", type=int, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Only one class is present")
    warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
    seeds = args.seeds[:1] if args.quick else args.seeds
    t0 = time.perf_counter()
    dataset = DATASETS[args.dataset](args.data_dir.resolve(), args.quick, args)
    rows = [r for r in ablation_rows() if args.rows is None or r.setting in args.rows]
    cache = args.cache_dir / result_name(dataset, args.quick)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, cfg in enumerate(rows):
            runs = [run_one(dataset, cfg, seed, Path(tmp), cache) for seed in seeds]
            out[cfg.setting] = {**aggregate(runs), "per_seed": runs, "overrides": list(cfg.overrides),
                                **{k: statistics.fmean(r["diagnostics"][k] for r in runs) for k in ("alpha_max", "in_use", "spread")}}
            row = out[cfg.setting]
            print(f"[{i + 1}/{len(rows)}] {cfg.setting:<36} test {row['mean']:.3f} worst {row['worst']:.3f} val {row['val_mean']:.3f} "
                  f"alpha_max {row['alpha_max']:.2f} in use {row['in_use']:.1f} spread {row['spread']:.2f}", flush=True)
    res = {"dataset": dataset.name, "description": dataset.description, "seeds": seeds, "rounds": dataset.config.run.rounds,
           "command": recorded_command("ablation.py", sys.argv[1:] if argv is None else argv),
           "machine": machine(), "threads": args.threads, "rows": out, "wall_seconds": time.perf_counter() - t0}
    stem = args.out / f"ablation_{dataset.name}{'_quick' if args.quick else ''}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    Path(f"{stem}.md").write_text(to_markdown(res))
    print(to_markdown(res))


def to_markdown(res: dict[str, Any]) -> str:
    lines = [f"# FedFew ablation: {res['description']}", "",
             f"{res['command']}, seeds {res['seeds']}, {res['rounds']} rounds, K = {K}, the data set's lr. Test mean over sites "
             "(± std over seeds), worst site (mean over seeds), validation mean; α max: mean of each round's largest α; "
             "in use: distinct models the sites deploy; spread: max distance between the K final models / their mean norm.", "",
             "| row | test mean | worst | val mean | α max | in use | spread |", "|---|---|---|---|---|---|---|"]
    for name, r in res["rows"].items():
        lines.append(f"| {name} | {r['mean']:.3f} ± {r['mean_std_over_seeds']:.3f} | {r['worst']:.3f} | {r['val_mean']:.3f} | "
                     f"{r['alpha_max']:.2f} | {r['in_use']:.1f} | {r['spread']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

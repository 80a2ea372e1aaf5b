"""What fine-tuning at deployment adds to FedFew: ``fedfew_ft`` against FedFew at the same configuration, paired.

    .venv/bin/python benchmarks/finetune_effect.py --dataset br35h-10-a0.5 --rounds 80 --cached-only

``fedfew_ft`` trains exactly as FedFew does at the same μ, lr and seed (the same K models; only the
deployment differs: one fine-tune epoch of the chosen model at the site), so each site's difference is the
fine-tuning's effect alone. For every configuration of FedFew's protocol-2 grid (``quality_grid.method_grid``)
both rows' runs are taken from ``quality.py``'s run cache (a missing run is made and cached, or with
``--cached-only`` reported as an error) and the script prints, per configuration, the paired bootstrap
interval of ``fedfew_ft − FedFew`` over seeds × sites (test and validation means) and whether the two runs
trained the same models (their collapse diagnostics are compared: α, models in use, spread, re-seeds; a
``fedfew_ft`` result made from FedFew's own run, as grids now make them, trained once and is said to).
Nothing is written; the figures are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_data import DATASETS, ROOT, protocol_dataset  # noqa: E402
from quality_grid import finetune_twins, method_grid  # noqa: E402
from quality_report import paired_bootstrap, result_name  # noqa: E402
from quality_runs import cache_file, run_config, run_many  # noqa: E402


def effect(base: Sequence[dict[str, Any]], tuned: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Paired ``tuned − base`` (test, and validation as a plain mean) and whether each seed trained the same models."""
    test = paired_bootstrap(tuned, base)
    val = statistics.fmean(t["val_mean"] - b["val_mean"] for t, b in zip(tuned, base, strict=True))
    diffs = [t["per_site"][s] - b["per_site"][s] for t, b in zip(tuned, base, strict=True) for s in b["per_site"]]
    return {"test": test, "val": val, "up": sum(d > 0 for d in diffs), "down": sum(d < 0 for d in diffs), "sites": len(diffs),
            "same_models": all(same_training(t["diagnostics"], b["diagnostics"]) for t, b in zip(tuned, base, strict=True)),
            "one_training": sum("training_of" in t for t in tuned)}  # seeds whose fedfew_ft came from FedFew's own run


def same_training(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two runs' diagnostics agree on every key both have (a run cached before a key was added lacks it)."""
    return all(a[k] == b[k] for k in a.keys() & b.keys())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=list(DATASETS))
    parser.add_argument("--rounds", type=int, default=None, help="as quality.py's (default: its PROTOCOL_ROUNDS or the data set's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "runs" / "bench-cache")
    parser.add_argument("--cached-only", action="store_true", help="make no run: a run missing from the cache is an error")
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Only one class is present")
    warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
    torch.set_num_threads(1)
    dataset = protocol_dataset(args.dataset, args.data_dir, False, argparse.Namespace(fmnist_root=None, fmnist_records=None),
                                 rounds=args.rounds)
    cache = args.cache_dir / result_name(dataset, False)
    pairs = list(finetune_twins(method_grid(dataset, quick=False)).items())
    tasks = [(cfg, seed) for pair in pairs for cfg in pair for seed in args.seeds]
    if args.cached_only:
        missing = [f"{c.method} {c.setting} seed {s}" for c, s in tasks
                   if not cache_file(cache, dataset, run_config(dataset, c, s)).is_file()]
        if missing:
            raise SystemExit(f"{cache}: {len(missing)} run(s) not cached, e.g. {missing[0]} (unpack the records or drop --cached-only)")
    runs = list(run_many(dataset, tasks, cache, jobs=args.jobs, twins={b: [t] for b, t in pairs}))  # a missing pair trains once
    n = len(args.seeds)
    print(f"{dataset.description}, {dataset.config.run.rounds} rounds, seeds {args.seeds}: fedfew_ft (1 fine-tune epoch) − FedFew, "
          "same configuration, paired over seeds × sites")
    for i, (base_cfg, _) in enumerate(pairs):
        base, tuned = runs[2 * i * n:(2 * i + 1) * n], runs[(2 * i + 1) * n:(2 * i + 2) * n]
        e = effect(base, tuned)
        t = e["test"]
        print(f"  {base_cfg.setting:<18} test {statistics.fmean(b['mean'] for b in base):.3f} -> "
              f"{statistics.fmean(x['mean'] for x in tuned):.3f}: {t['mean']:+.4f} [{t['mean_ci'][0]:+.4f}, {t['mean_ci'][1]:+.4f}], "
              f"worst {t['worst']:+.3f}; val {e['val']:+.4f}; sites up {e['up']}, down {e['down']} of {e['sites']}; "
              f"same models: {'yes' if e['same_models'] else 'NO'}"
              + (f" ({e['one_training']} of {n} seeds trained once for both)" if e["one_training"] else ""))


if __name__ == "__main__":
    main()

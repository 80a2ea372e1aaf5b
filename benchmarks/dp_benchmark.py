"""What differential privacy costs on the demo federation: time per local epoch and accuracy.

    python benchmarks/dp_benchmark.py            # full: 15 rounds per run, 5 timed epochs per mode
    python benchmarks/dp_benchmark.py --quick    # 5 rounds per run, 2 timed epochs per mode

1. Time per local epoch (all six sites, one model) with DP-SGD, hooks and ghost clipping, divided
   by the time without DP, measured in this one run with the modes interleaved
   (``fedfew_med.dp.benchmark_epoch_times``): on a shared machine only these ratios are meaningful.
2. Deployed test accuracy (mean over sites, worst site) of FedFew (K = 3) on the demo federation
   without DP and with per-site DP at ε ∈ {1, 3, 8} (δ = 1e-5, the whole run, loss reports included),
   with the ε each site actually spent.

Prints the figures and writes ``benchmarks/results/dp_benchmark.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedfew_med.config import load_federation  # noqa: E402
from fedfew_med.dp import benchmark_epoch_times  # noqa: E402
from fedfew_med.simulation import run  # noqa: E402

DEMO = ROOT / "site_configs" / "demo_federation.toml"
RESULTS = ROOT / "benchmarks" / "results" / "dp_benchmark.json"
EPSILONS = (1.0, 3.0, 8.0)


def accuracy_runs(rounds: int, grad_sample_mode: str) -> list[dict[str, Any]]:
    """The demo federation without DP and at each ε; one row per run."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for eps in (None, *EPSILONS):
            sets = [f"run.rounds={rounds}"]
            if eps is not None:
                sets += [f"privacy.epsilon={eps}", "privacy.delta=1e-5", f'privacy.grad_sample_mode="{grad_sample_mode}"']
            config = load_federation(DEMO, sets)
            start = time.perf_counter()
            result = run(config, run_dir=Path(tmp) / f"eps-{eps}")
            privacy = result.summary.get("privacy", {})
            rows.append({
                "epsilon_target": eps,
                "mean_accuracy": result.summary["summary"]["mean"],
                "worst_accuracy": result.summary["summary"]["worst"],
                "epsilon_spent_max": max((p["epsilon"] for p in privacy.values()), default=None),
                "noise_multiplier": {s: p["noise_multiplier"] for s, p in privacy.items()},
                "seconds": time.perf_counter() - start,
            })
            print(f"  ε = {eps if eps is not None else '∞ (no DP)':>12}: mean accuracy {rows[-1]['mean_accuracy']:.3f}, "
                  f"worst site {rows[-1]['worst_accuracy']:.3f}"
                  + (f", ε spent ≤ {rows[-1]['epsilon_spent_max']:.3f}" if privacy else "")
                  + f"  ({rows[-1]['seconds']:.0f} s)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds per run and 2 timed epochs per mode")
    parser.add_argument("--rounds", type=int, help="rounds per accuracy run (default: 15, or 5 with --quick)")
    parser.add_argument("--grad-sample-mode", default="auto", choices=["auto", "hooks", "ghost"],
                        help="clipping mode of the accuracy runs (default: auto)")
    parser.add_argument("--skip-accuracy", action="store_true", help="timings only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rounds = args.rounds or (5 if args.quick else load_federation(DEMO).run.rounds)
    epochs = 2 if args.quick else 5

    print(f"DP benchmark on {DEMO.relative_to(ROOT)} ({'quick' if args.quick else 'full'}), torch threads {torch.get_num_threads()}")
    print(f"1. time per local epoch, all sites, {epochs} timed epoch(s) per mode, interleaved:", flush=True)
    timing = benchmark_epoch_times(DEMO, epochs=epochs)
    for mode, sec in timing["seconds"].items():
        ratio = "" if mode == "none" else (f"   DP / no DP = {timing['ratios'][mode]:.2f} (medians), "
                                           f"{timing['ratios_min'][mode]:.2f} (fastest epochs)")
        print(f"  {mode:>5}: {sec:.2f} s{ratio}")
    accuracy: list[dict[str, Any]] = []
    if not args.skip_accuracy:
        print(f"2. FedFew K = 3, {rounds} rounds, deployed test accuracy (δ = 1e-5, clipping {args.grad_sample_mode}):", flush=True)
        accuracy = accuracy_runs(rounds, args.grad_sample_mode)
    out = {
        "command": "python benchmarks/dp_benchmark.py" + (" --quick" if args.quick else ""),
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "config": str(DEMO.relative_to(ROOT)),
        "rounds": rounds,
        "epoch_times": timing,
        "accuracy": accuracy,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

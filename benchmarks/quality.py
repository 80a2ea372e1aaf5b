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
seeds (worst site), 95 %, 10,000 draws (:func:`quality_report.paired_bootstrap`); ``matches`` = the interval reaches 0
or above on both. ``--ks`` adds FedFew and IFCA rows for other K; ``--lr-ablation`` adds the earlier
protocol's labelled row (reference preset at μ = 0.01 over lr × {0.5, 1, 2}); neither is in the headline.
The partition is fixed (seed 0); the run seed (initialisation, data order) varies over ``--seeds``.

Reported per method: mean over sites (± std over seeds), worst site, Jain's index (means over seeds),
bytes moved per round (both directions, all sites), wall time per run, the selected configuration and
every configuration's test / validation / worst; per run, collapse diagnostics (largest α per round,
models in use, spread of the K models, re-seeds) and the site replies the server skipped (a failed site,
e.g. a diverging update over ``[faults].max_update_norm``; shown per configuration in the Markdown when
any). Output: ``benchmarks/results/quality_<dataset>[_quick].json``, ``.md`` and ``.png``.

Run times (protocol 1, 35–45 configurations; protocol 2 has 36 plus the rounds check), measured on 2
shared, heavily loaded CPU cores with ``--threads 1``: ``heart`` full (35 configurations × 3 seeds × 30 rounds) 12 min; ``--quick`` runs take 2–10 min per data set (the
``wall_seconds`` of each ``*_quick.json``). A full run costs about (configurations × seeds × the
``s/run`` of its rows), with s/run growing linearly in rounds. Measured full runs on the 2 cores:
``br35h-4-*`` about 125 min, ``br35h-10-*`` about 100 min each (two side by side), ``segmentation``
27 min; the Fashion-MNIST grids need days on 2 cores and have not been run in full. ``--jobs 2`` runs
two runs side by side (forked processes of ``--threads`` each, :mod:`run_pool`) with the same figures,
so a one-thread grid does not leave the second core idle. While a grid runs it says how many of its runs
the run cache holds, then after each run it makes that run's seconds and about how long the rest will take
(the mean time of the runs made × the runs left ÷ the lanes: ``quality_runs.Pace``). A run that trains exactly as another
and differs only at deployment is not trained again (``quality_grid.deployment_twins``): each FedFew run's
final checkpoint also gives the result of its ``fedfew_ft`` twin (same μ, lr and seed; one fine-tune
epoch at deployment), and each FedAvg run at lr × 1 or × 2 those of FedAvg + FT at that lr (1 and 5
fine-tune epochs), cached under the twins' own keys with ``training_of`` naming the run they came from
(``quality_runs.run_one``). Those results equal the twins' own runs: tests check it on a tiny federation,
and on Heart the 3 ``fedfew_ft`` (μ 0.1, lr 0.01) and 12 FedAvg + FT runs made this way equal the runs
made on their own in every per-site test and validation figure (and the committed grid's). It saves 24 of
a grid's 108 trainings (on Br35H 10 sites at 320 rounds about 4 h of run time, 2 h on the 2 cores).

This script is the command line; the protocol lives beside it, one part per module, shared with
``ablation.py``, ``sparse.py``, ``choose_loso.py``, ``finetune_effect.py``, ``headline.py`` and ``per_site.py``:
:mod:`quality_data` (the data sets and the rounds each runs at), :mod:`quality_grid` (every method's
configurations), :mod:`quality_runs` (one run, the run cache, selection on validation, the rounds rule),
:mod:`quality_scores` (a finished run's validation scores, result and diagnostics; a twin made from its
training) and :mod:`quality_report` (the best baseline, the paired bootstrap, the Markdown and plot,
merging rerun rows).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from quality_data import DATASETS, FLAMBY_PUBLISHED, RESULTS, ROOT, protocol_dataset
from quality_grid import KS, PROTOCOL, grid_record, method_grid
from quality_report import (
    comparisons,
    machine,
    merge_rows,
    plot,
    recorded_command,
    result_name,
    to_markdown,
    write_results,
)
from quality_runs import rounds_check, run_grid

from fedfew_med.metrics import PRIMARY


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

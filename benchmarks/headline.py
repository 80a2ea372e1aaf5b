"""The headline table: FedFew K = 3 against the best baseline on every data set benchmarked in full.

Reads ``benchmarks/results/quality_<dataset>.json`` (full runs only; ``*_quick`` are smoke runs),
``speed.json`` and ``sparse_<dataset>.json`` and prints a Markdown summary (also written to
``benchmarks/results/headline.md``), so the README's table is generated, never typed::

    .venv/bin/python benchmarks/headline.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import RESULTS, best_baseline  # noqa: E402  (the same choice as each data set's own summary)


def quality_rows(results: Path) -> list[str]:
    rows = ["| data set | metric | FedFew K=3 (selected) mean ± std / worst | best baseline (selected) mean ± std / worst | "
            "FedFew wins? | seeds | configurations |", "|---|---|---|---|---|---|---|"]
    for path in sorted(results.glob("quality_*.json")):
        if path.stem.endswith("_quick"):
            continue
        res = json.loads(path.read_text())
        methods = res["methods"]
        if "fedfew K=3" not in methods or len(methods) < 3:  # a partial run (a few methods) is not a comparison
            continue
        f, b = methods["fedfew K=3"], best_baseline(methods)
        base = methods[b]
        verdict = "yes" if f["mean"] >= base["mean"] else "no"
        configs = sum(len(m["grid"]) for m in methods.values())
        rows.append(f"| {res['description']} | {res['metric']} | {f['mean']:.3f} ± {f['mean_std_over_seeds']:.3f} / {f['worst']:.3f} "
                    f"({f['selected']}) | {b}: {base['mean']:.3f} ± {base['mean_std_over_seeds']:.3f} / {base['worst']:.3f} "
                    f"({base['selected']}) | {verdict} | {len(res['seeds'])} | {configs} |")
    return rows


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
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    text = "\n".join(quality_rows(args.results) + speed_rows(args.results)) + "\n"
    (args.results / "headline.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()

"""Where FedFew loses: per-site test scores of the protocol-2 results, FedFew rows against the best baseline.

    .venv/bin/python benchmarks/per_site.py            # reads benchmarks/results/quality_*.json

For every full protocol-2 result (``benchmarks/quality.py``, 3 seeds; smoke runs left out) a table of each
site's test score, the mean over seeds of the configuration chosen on validation, for the default FedFew,
``fedfew_ft``, the best baseline, Local and FedAvg, sorted by the gap of the better FedFew row (the one
with the higher mean, as the headline picks it) to the best baseline. Nothing is run: it reads the
per-seed values the result files keep. Writes ``benchmarks/results/per_site.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from headline import full_runs  # noqa: E402
from quality_data import RESULTS  # noqa: E402
from quality_report import FEDFEW_ROWS as FEDFEW  # noqa: E402

CONTEXT = ("local", "fedavg")
GAP = 0.02  # a site this far below the best baseline is listed in the summary line


def site_means(method: dict) -> dict[str, float]:
    """Each site's test score averaged over the seeds of ``method``'s selected configuration."""
    seeds = method["per_seed"]
    return {site: sum(s["per_site"][site] for s in seeds) / len(seeds) for site in seeds[0]["per_site"]}


def table(res: dict) -> list[str]:
    """The per-site table of one result file (Markdown lines)."""
    methods = res["methods"]
    best = res["comparison"]["best_baseline"]
    better = max(FEDFEW, key=lambda m: methods[m]["mean"])
    columns = list(dict.fromkeys(m for m in (*FEDFEW, best, *CONTEXT) if m in methods))
    scores = {m: site_means(methods[m]) for m in columns}
    gaps = {site: scores[better][site] - scores[best][site] for site in scores[better]}
    names = {m: m.replace(" K=3", "") for m in columns}
    names[best] = f"{names[best]} (best baseline)"
    out = [f"## {res['description']} ({res['metric']}, {len(res['seeds'])} seeds, {res['rounds']} rounds)", "",
           "| site | " + " | ".join(names[m] for m in columns) + f" | {names[better]} − best baseline |",
           "|---|" + "---|" * (len(columns) + 1)]
    for site in sorted(gaps, key=gaps.__getitem__):
        out.append(f"| {site} | " + " | ".join(f"{scores[m][site]:.3f}" for m in columns) + f" | {gaps[site]:+.3f} |")
    behind = [s for s in sorted(gaps, key=gaps.__getitem__) if gaps[s] < -GAP]
    ahead = [s for s in gaps if gaps[s] > GAP]
    deficit = sum(min(g, 0.0) for g in gaps.values())
    share = sum(gaps[s] for s in behind) / deficit if deficit < 0 else 0.0
    out += ["", f"{names[better]} is more than {GAP:.2f} below {best} on {len(behind)} of {len(gaps)} sites"
            + (f" ({', '.join(behind)}; {100 * share:.0f} % of its summed per-site shortfall)" if behind else "")
            + f" and more than {GAP:.2f} above on {len(ahead)}.", ""]
    return out


def full_results(results: Path) -> list[dict]:
    """Protocol-2 result files (:func:`headline.full_runs`) with every FedFew row and a best baseline."""
    return [res for res in full_runs(results)
            if res.get("protocol") == 2 and not res.get("quick") and all(m in res["methods"] for m in FEDFEW)
            and "best_baseline" in res.get("comparison", {})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of quality_*.json (and where per_site.md goes)")
    args = parser.parse_args()
    lines = ["# Per-site test scores under protocol 2", "",
             "`python benchmarks/per_site.py`: each site's test score (mean over seeds) of the configuration chosen on "
             "validation; sites sorted by the better FedFew row's gap to the best baseline.", ""]
    for res in full_results(args.results):
        lines += table(res)
    text = "\n".join(lines)
    (args.results / "per_site.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

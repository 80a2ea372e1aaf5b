"""Carry a benchmark grid's finished runs from one machine to the next.

``quality.py`` and ``sparse.py`` keep each finished run as ``runs/bench-cache/<stem>/<key>.json`` (a
metrics record of about 1 kB: per-site test and validation figures, bytes, seconds, collapse
diagnostics; no weights, no data) and reuse it, so a stopped grid continues on the same machine. A grid
longer than one machine's lease (Br35H 10 sites α 0.1 at 320 rounds: about a day on 2 cores) needs its
finished runs on the next machine too: ``pack`` gathers a cache folder's records into one committed file,
``benchmarks/results/records/<stem>.json``, and ``unpack`` writes them back as cache entries there::

    .venv/bin/python benchmarks/run_records.py pack quality_br35h-4-a0.1     # after some runs finished
    .venv/bin/python benchmarks/run_records.py unpack quality_br35h-4-a0.1   # on the next machine, before the grid

The records are keyed exactly as the cache is (``quality_runs.cache_key``: data set, whole resolved config,
algorithm options, torch version), so an unpacked record is reused only by the run that made it. Both
directions merge: existing entries are kept, and a record that differs from an existing one under the
same key is an error (two machines disagreeing on one run), not a silent overwrite.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "runs" / "bench-cache"
RECORDS = ROOT / "benchmarks" / "results" / "records"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".part")
    part.write_text(text)
    os.replace(part, path)


def _merge(into: dict[str, Any], new: dict[str, Any], where: str) -> int:
    """Add ``new``'s records to ``into``; return how many were added. A key with a different record is an error."""
    added = 0
    for key, record in new.items():
        if key in into:
            if into[key] != record:
                raise SystemExit(f"{where}: run {key} differs from the record already there; remove one of them by hand")
            continue
        into[key] = record
        added += 1
    return added


def read_cache(folder: Path) -> dict[str, Any]:
    """The finished runs of one cache folder, by key (``.part`` files of runs in progress are not runs)."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def pack(stem: str, cache: Path = CACHE, records: Path = RECORDS) -> tuple[int, int]:
    """Merge ``cache/<stem>/*.json`` into ``records/<stem>.json``; return (added, total)."""
    target = records / f"{stem}.json"
    have: dict[str, Any] = json.loads(target.read_text())["runs"] if target.is_file() else {}
    added = _merge(have, read_cache(cache / stem), str(target))
    _write_atomic(target, json.dumps({"stem": stem, "runs": dict(sorted(have.items()))}, indent=1) + "\n")
    return added, len(have)


def unpack(stem: str, cache: Path = CACHE, records: Path = RECORDS) -> tuple[int, int]:
    """Write the records of ``records/<stem>.json`` that ``cache/<stem>/`` lacks; return (added, total)."""
    source = records / f"{stem}.json"
    if not source.is_file():
        raise SystemExit(f"{source}: no records of {stem!r} (`pack {stem}` writes them)")
    folder = cache / stem
    have = read_cache(folder) if folder.is_dir() else {}
    runs: dict[str, Any] = json.loads(source.read_text())["runs"]
    new = {k: v for k, v in runs.items() if k not in have}
    _merge(have, runs, str(folder))  # only checks agreement: the new ones are written below
    for key, record in new.items():
        _write_atomic(folder / f"{key}.json", json.dumps(record) + "\n")
    return len(new), len(runs)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["pack", "unpack"])
    parser.add_argument("stems", nargs="+", help="cache folder names, e.g. quality_br35h-4-a0.1")
    parser.add_argument("--cache-dir", type=Path, default=CACHE)
    parser.add_argument("--records-dir", type=Path, default=RECORDS)
    args = parser.parse_args(argv)
    for stem in args.stems:
        added, total = (pack if args.action == "pack" else unpack)(stem, args.cache_dir, args.records_dir)
        print(f"{args.action} {stem}: {added} new, {total} in all")


if __name__ == "__main__":
    main()

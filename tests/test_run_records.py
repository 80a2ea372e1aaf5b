"""benchmarks/run_records.py: a grid's finished runs carried between machines (pack, unpack, merge, conflicts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEM = "quality_x"


def records(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_records.py"), *args, "--cache-dir", str(tmp_path / "cache"),
                           "--records-dir", str(tmp_path / "records")], capture_output=True, text=True)


def write_run(folder: Path, key: str, mean: float) -> dict[str, float]:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"seed": 0, "mean": mean}
    (folder / f"{key}.json").write_text(json.dumps(record) + "\n")
    return record


def test_pack_then_unpack_on_a_fresh_machine_gives_the_same_cache_entries(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / STEM
    runs = {"aaa": write_run(cache, "aaa", 0.8), "bbb": write_run(cache, "bbb", 0.9)}
    (cache / "ccc.part").write_text("{")  # a run being written: not a finished run
    first = records(tmp_path, "pack", STEM)
    assert first.returncode == 0 and f"pack {STEM}: 2 new, 2 in all" in first.stdout
    assert json.loads((tmp_path / "records" / f"{STEM}.json").read_text()) == {"stem": STEM, "runs": runs}
    assert records(tmp_path, "pack", STEM).stdout.strip() == f"pack {STEM}: 0 new, 2 in all"  # idempotent

    for p in cache.iterdir():  # the next machine: an empty cache
        p.unlink()
    write_run(cache, "ddd", 0.7)  # a run it made itself is kept
    back = records(tmp_path, "unpack", STEM)
    assert back.returncode == 0 and f"unpack {STEM}: 2 new, 2 in all" in back.stdout
    assert {p.stem: json.loads(p.read_text()) for p in cache.glob("*.json")} == {**runs, "ddd": {"seed": 0, "mean": 0.7}}

    packed = records(tmp_path, "pack", STEM)  # the merge keeps both machines' runs
    assert packed.stdout.strip() == f"pack {STEM}: 1 new, 3 in all"


def test_a_run_recorded_differently_under_one_key_is_an_error_not_an_overwrite(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / STEM
    write_run(cache, "aaa", 0.8)
    assert records(tmp_path, "pack", STEM).returncode == 0
    write_run(cache, "aaa", 0.5)
    for action in ("pack", "unpack"):
        bad = records(tmp_path, action, STEM)
        assert bad.returncode != 0 and "run aaa differs" in bad.stderr
    assert json.loads((tmp_path / "records" / f"{STEM}.json").read_text())["runs"]["aaa"]["mean"] == 0.8
    assert json.loads((cache / "aaa.json").read_text())["mean"] == 0.5


def test_unpack_without_records_names_the_missing_file(tmp_path: Path) -> None:
    bad = records(tmp_path, "unpack", "quality_none")
    assert bad.returncode != 0 and "quality_none.json: no records" in bad.stderr

"""A disk that fills up mid-run: a clear error, the last good checkpoint intact, ``--resume`` afterwards.

Real OS-level failures, not a patched write: ``fedfew-med simulate --resume`` runs as a
subprocess (after 3 rounds run here) under

- ``RLIMIT_FSIZE``: no file may grow past a limit chosen between two sizes of this run, so the
  write of round 3's record (``record``) or of its checkpoint (``checkpoint``) fails with
  EFBIG (Python ignores SIGXFSZ, so the write raises), and
- a tiny tmpfs, filled up but for a few KiB, holding the run directory: ENOSPC on the
  checkpoint (skipped where this process may not mount a tmpfs).

Each time the CLI exits non-zero with one ``fedfew-med: error:`` line naming the file (no
traceback), ``LATEST`` still names round 2, which loads and verifies, no temporary file is
left, ``metrics.jsonl`` is whole JSON lines, and a resume with room again ends with the models
of an uninterrupted run, to the bit.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedfew_med import checkpoint
from fedfew_med.config import load_federation
from fedfew_med.simulation import run

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TOML = """
[run]
name = "full-disk"
seed = 3
rounds = 5
threads = 1

[algorithm]
name = "fedfew"
params = { k = 2, mu = 0.01, init = "perturbed" }

[training]
lr = 0.05
batch_size = 16

[model]
name = "classifier"
params = { channels = [8, 16], strides = [2, 2] }  # server.safetensors ~24 KB: larger than 4 records

[data]
name = "synthetic"
params = { num_sites = 3, image_size = 16, train_min = 24, train_max = 40, test_per_site = 20, seed = 1 }
"""


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """The CLI runs with ``run.threads = 1``; in-process runs must too, to compare bits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """The config file and the final models of an uninterrupted run."""
    root = tmp_path_factory.mktemp("straight")
    (root / "fed.toml").write_text(TOML)
    run(load_federation(root / "fed.toml"), run_dir=root / "run")
    return root / "fed.toml", load_file(str(root / "run" / "models.safetensors"))


def _three_rounds(config: Path, run_dir: Path) -> None:
    run(load_federation(config), run_dir=run_dir, stop_after=3)
    assert checkpoint.latest_round(run_dir) == 2


def _cli(config: Path, run_dir: Path, *, limit: int | None = None) -> subprocess.CompletedProcess[str]:
    def set_limit() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    fedfew = str(Path(sys.executable).with_name("fedfew-med"))
    return subprocess.run([fedfew, "simulate", str(config), "-o", str(run_dir), "--resume", "-q"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, preexec_fn=set_limit,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _assert_failed_cleanly(proc: subprocess.CompletedProcess[str], run_dir: Path, message: str) -> None:
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    assert err[-1].startswith("fedfew-med: error: ") and message in err[-1], proc.stderr
    # the last good checkpoint is the latest, complete and verified (load checks both SHA-256 digests)
    assert checkpoint.latest_round(run_dir) == 2
    ckpt = checkpoint.load(run_dir)
    assert ckpt is not None and ckpt.round == 2
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["LATEST", "round-00001", "round-00002"], names  # no partial round-00003, no tmp dir
    assert not list(run_dir.glob(".*.tmp-*"))
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert all(line.endswith("\n") for line in lines)
    rounds = [json.loads(line)["round"] for line in lines]  # every line is whole JSON
    assert rounds in ([0, 1, 2], [0, 1, 2, 3])  # round 3's record may precede its failed checkpoint


def _resume_matches(config: Path, run_dir: Path, models: dict[str, torch.Tensor]) -> None:
    result = run(load_federation(config), run_dir=run_dir, resume=True)
    assert result.summary["finished"]
    assert [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3, 4]
    got = load_file(str(run_dir / "models.safetensors"))
    assert got.keys() == models.keys() and all(torch.equal(got[k], models[k]) for k in got)


def _record_size(run_dir: Path) -> int:
    return max(len(line) for line in (run_dir / "metrics.jsonl").read_bytes().splitlines(keepends=True))


LIMITS: dict[str, tuple[Callable[[Path], int], str]] = {
    # metrics.jsonl can hold rounds 0-2 but not round 3's record
    "record": (lambda d: (d / "metrics.jsonl").stat().st_size + 100,
               "metrics.jsonl: cannot append the record of round 3 (File too large); the earlier records are intact"),
    # round 3's record fits, its checkpoint's server.safetensors does not
    "checkpoint": (lambda d: (d / "metrics.jsonl").stat().st_size + 2 * _record_size(d),
                   "round-00003: cannot write the checkpoint of round 3 (File too large); "
                   "the last good checkpoint (round 2) is intact"),
}


@pytest.mark.parametrize("stage", sorted(LIMITS))
def test_a_file_size_limit_mid_run(tmp_path: Path, straight: tuple[Path, dict[str, torch.Tensor]], stage: str) -> None:
    config, models = straight
    run_dir = tmp_path / "run"
    _three_rounds(config, run_dir)
    before = (run_dir / "metrics.jsonl").read_bytes()
    limit_of, message = LIMITS[stage]
    limit = limit_of(run_dir)
    assert limit < (run_dir / "checkpoints/round-00002/server.safetensors").stat().st_size  # the checkpoint cannot fit
    proc = _cli(config, run_dir, limit=limit)
    _assert_failed_cleanly(proc, run_dir, message)
    if stage == "record":  # the partly written line was cut off: the file is byte for byte as before
        assert (run_dir / "metrics.jsonl").read_bytes() == before
    _resume_matches(config, run_dir, models)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs (root with CAP_SYS_ADMIN only; skipped elsewhere), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_mid_run(tmp_path: Path, small_tmpfs: Path, straight: tuple[Path, dict[str, torch.Tensor]]) -> None:
    config, models = straight
    _three_rounds(config, tmp_path / "run")
    run_dir = small_tmpfs / "run"
    shutil.copytree(tmp_path / "run", run_dir)
    st = os.statvfs(small_tmpfs)
    free = st.f_bavail * st.f_frsize
    with (small_tmpfs / "filler").open("wb") as fh:  # leave 8 KiB: room for a record, not for a checkpoint
        fh.write(b"\0" * (free - 8192))
    proc = _cli(config, run_dir)
    _assert_failed_cleanly(proc, run_dir, "(No space left on device)")
    (small_tmpfs / "filler").unlink()  # room again
    _resume_matches(config, run_dir, models)

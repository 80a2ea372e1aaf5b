"""The coordinator's run directory: the same files, with the same meaning, as a simulation's.

``config.json`` (resolved config), ``metrics.jsonl`` (one record per completed
round, written before that round's checkpoint), ``checkpoints/`` (via
:mod:`fedfew_med.checkpoint`; the server models and a JSON state), and at the
end ``models.safetensors`` and ``summary.json``.

Records and the final files are written by the helpers both runners share
(:func:`fedfew_med.checkpoint.append_record`, ``truncate_records``, ``write_final``);
opening the directory and the summary are :mod:`fedfew_med.rundir`'s, as in the
simulation; only the lock that keeps two coordinators off one run is the coordinator's.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedfew_med import checkpoint
from fedfew_med.config import FederationConfig
from fedfew_med.rundir import RunDirError, open_run_dir, summarize_run, summary_table

__all__ = ["RunDirError", "locked", "prepare", "summarize_run", "summary_table"]


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock beside ``run_dir``: two coordinators never write one run."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir.parent / f".{run_dir.name}.lock"
    with lock_path.open("a") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirError(f"{run_dir} is in use by another coordinator process (lock {lock_path})") from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def prepare(run_dir: Path, config: FederationConfig, *, resume: bool, overwrite: bool) -> checkpoint.Checkpoint | None:
    """:func:`fedfew_med.rundir.open_run_dir` in the coordinator's wording (run-config keys, not CLI flags)."""
    return open_run_dir(
        run_dir, config, resume=resume, overwrite=overwrite,
        occupied_hint="set resume=true to continue it or overwrite=true to replace it",
    )

"""Atomic, pickle-free persistence of a run's state.

A checkpoint is a directory ``checkpoints/round-NNNNN/`` holding

- ``server.safetensors``: the K server models (keys ``"{k}/{param}"``),
- ``sites.safetensors``: every site's personal models and buffers
  (keys ``"{site}/{models|buffers}/{slot}/{name}"``),
- ``state.json``: round, config digest, JSON-able run state, and the SHA-256 of
  both tensor files (checked on load).

It is written under a temporary name, fsynced and renamed; then the one-line
``checkpoints/LATEST`` pointer is replaced atomically. A crash at any moment leaves
the previous checkpoint as the latest complete one. Tensors go through
``safetensors``; nothing is ever unpickled.

A write that fails (disk full, file-size limit, I/O error) raises :class:`WriteError`
naming the file, after removing what it had half written: ``LATEST`` still names the last
good checkpoint, a failed append leaves ``metrics.jsonl`` as it was, and ``--resume`` works
once there is room again. Temporary files a killed process left behind (``.*.tmp-<pid>``)
are never read; :func:`remove_stale` deletes them.

The run directory's other files are written here too, for every runner (the in-process
simulation and the Flower coordinator): ``metrics.jsonl`` (:func:`append_record`,
:func:`truncate_records`) and, at the end, ``models.safetensors`` and ``summary.json``
(:func:`write_final`; :func:`load_final` reads the models back after checking their SHA-256).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedfew_med.algorithms.base import Params
from fedfew_med.training import SiteState

log = logging.getLogger(__name__)

KEEP = 2  # complete checkpoints kept on disk


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or belongs to another run."""


class WriteError(CheckpointError):
    """A run-directory file could not be written (disk full, file-size limit, I/O error).

    Raised after the half-written file was removed: what was on disk before is intact.
    """


_WRITE_ERRORS = (OSError, SafetensorError)  # safetensors reports a failed write as its own error


def _reason(exc: BaseException) -> str:
    """A short cause for a failed write, e.g. ``"No space left on device"``."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    # safetensors: "Error while serializing: I/O error: File too large (os error 27)"
    io_error = re.search(r"I/O error: (.+?) \(os error \d+\)", str(exc))
    return io_error.group(1) if io_error else str(exc)


@dataclass
class Checkpoint:
    """A loaded checkpoint."""

    round: int  # last completed round
    server_models: list[Params]
    sites: dict[str, SiteState]
    state: dict[str, Any]  # JSON-able run state saved with it


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace`` (never a half-written file).

    Raises
    ------
    WriteError
        The text could not be written; ``path`` is as it was.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"{path}: cannot write ({_reason(exc)}); the previous version is intact") from exc


def _flat_server(models: list[Params]) -> dict[str, torch.Tensor]:
    return {f"{k}/{name}": t.detach().contiguous().clone() for k, m in enumerate(models) for name, t in m.items()}


def _flat_sites(sites: dict[str, SiteState]) -> dict[str, torch.Tensor]:
    out = {}
    for site, st in sites.items():
        for kind, slots in (("models", st.models), ("buffers", st.buffers)):
            for slot, tensors in slots.items():
                for name, t in tensors.items():
                    out[f"{site}/{kind}/{slot}/{name}"] = t.detach().contiguous().clone()
    return out


def save(run_dir: Path, round_idx: int, *, server_models: list[Params], sites: dict[str, SiteState], state: dict[str, Any]) -> Path:
    """Write the checkpoint of completed round ``round_idx`` atomically and prune old ones.

    Raises
    ------
    WriteError
        The checkpoint could not be written; its temporary directory was removed and ``LATEST``
        still names the previous checkpoint.
    """
    root = run_dir / "checkpoints"
    final = root / f"round-{round_idx:05d}"
    tmp = root / f".round-{round_idx:05d}.tmp-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file(_flat_server(server_models), str(tmp / "server.safetensors"))
        save_file(_flat_sites(sites), str(tmp / "sites.safetensors"))
        digests = {name: sha256_file(tmp / name) for name in ("server.safetensors", "sites.safetensors")}
        meta = {"round": round_idx, "num_models": len(server_models), "digests": digests, "state": state}
        (tmp / "state.json").write_text(json.dumps(meta, sort_keys=True), encoding="utf-8")
        for name in ("server.safetensors", "sites.safetensors", "state.json"):
            _fsync_file(tmp / name)
        if final.exists():  # a re-run of the same round after a crash between rename and pointer update
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        atomic_write_text(root / "LATEST", final.name + "\n")
    except (*_WRITE_ERRORS, WriteError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            previous = latest_round(run_dir)
        except CheckpointError:
            previous = None
        if previous != round_idx and final.exists():  # renamed, but LATEST does not name it: never complete
            shutil.rmtree(final, ignore_errors=True)
        if previous == round_idx:  # only the last directory fsync failed: the checkpoint is complete
            log.warning("%s: written, but syncing %s failed (%s)", final, root, _reason(exc))
            return final
        kept = "there is no earlier checkpoint" if previous is None else f"the last good checkpoint (round {previous}) is intact"
        raise WriteError(f"{final}: cannot write the checkpoint of round {round_idx} ({_reason(exc)}); {kept}") from exc
    complete = sorted(p for p in root.glob("round-*") if p.is_dir())
    for old in complete[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    remove_stale(run_dir)
    return final


def remove_stale(run_dir: Path) -> None:
    """Delete the temporary files and directories (``.*.tmp-<pid>``) a killed process left in ``run_dir``.

    Only call this while holding the run directory (its lock, or as the process writing it):
    a temporary file is never read, so every one found then is garbage.
    """
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        for stale in folder.glob(".*.tmp-*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def latest_round(run_dir: Path) -> int | None:
    """The last completed round recorded in ``checkpoints/LATEST``, or None."""
    pointer = run_dir / "checkpoints" / "LATEST"
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    try:
        return int(name.removeprefix("round-"))
    except ValueError:
        raise CheckpointError(f"{pointer}: expected 'round-NNNNN', got {name!r}") from None


def _read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint folder's ``state.json`` (round, digests, run state)."""
    try:
        return dict(json.loads((path / "state.json").read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / 'state.json'}: unreadable ({exc})") from None


def latest_state(run_dir: Path) -> dict[str, Any] | None:
    """The JSON run state of the latest checkpoint, without loading (or verifying) its tensors; None if there is none."""
    round_idx = latest_round(run_dir)
    if round_idx is None:
        return None
    return dict(_read_meta(run_dir / "checkpoints" / f"round-{round_idx:05d}").get("state") or {})


def load(run_dir: Path) -> Checkpoint | None:
    """Load the latest complete checkpoint, verifying digests; None if there is none."""
    round_idx = latest_round(run_dir)
    if round_idx is None:
        return None
    path = run_dir / "checkpoints" / f"round-{round_idx:05d}"
    meta = _read_meta(path)
    digests = meta.get("digests") or {}
    for name in ("server.safetensors", "sites.safetensors"):  # both, always: a dropped digest must not skip the check
        if name not in digests:
            raise CheckpointError(f"{path / 'state.json'}: records no SHA-256 for {name}; the checkpoint cannot be verified")
        if not (path / name).is_file() or sha256_file(path / name) != digests[name]:
            raise CheckpointError(f"{path / name}: missing or its SHA-256 does not match state.json")
    flat = load_file(str(path / "server.safetensors"))
    server: list[Params] = [{} for _ in range(meta["num_models"])]
    for key, t in flat.items():
        k, name = key.split("/", 1)
        server[int(k)][name] = t
    sites: dict[str, SiteState] = {}
    for key, t in load_file(str(path / "sites.safetensors")).items():
        site, kind, slot_and_name = key.split("/", 2)
        slot, name = _split_slot(slot_and_name)
        st = sites.setdefault(site, SiteState())
        target = st.models if kind == "models" else st.buffers
        target.setdefault(slot, {})[name] = t
    return Checkpoint(round=meta["round"], server_models=server, sites=sites, state=meta["state"])


def _split_slot(key: str) -> tuple[str, str]:
    """Split ``"server/0/conv.weight"`` into slot ``"server/0"`` and name ``"conv.weight"``.

    Slots are ``"server/<k>"`` or a single word (``personal``, ``local``, ``finetune``).
    """
    head, rest = key.split("/", 1)
    if head == "server":
        k, name = rest.split("/", 1)
        return f"server/{k}", name
    return head, rest


# ------------------------------------------------------------------ the rest of a run directory
def append_record(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line to ``path`` (``metrics.jsonl``) and fsync it.

    Raises
    ------
    WriteError
        The line could not be written; the file was cut back to its previous length.
    """
    line = json.dumps(record) + "\n"
    size = path.stat().st_size if path.exists() else 0
    try:
        with path.open("a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        try:
            os.truncate(path, size)  # shrinking needs no space: no torn line is left behind
        except OSError:
            log.error("%s: could not remove a partly written line; --resume drops it", path)
        raise WriteError(f"{path}: cannot append the record of round {record.get('round')} ({_reason(exc)}); "
                         "the earlier records are intact") from exc


def truncate_records(path: Path, last_round: int) -> list[dict[str, Any]]:
    """Keep only complete records of rounds <= ``last_round`` (a crash may leave later or torn lines); return them."""
    kept: list[dict[str, Any]] = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            if rec.get("round", math.inf) <= last_round:
                kept.append(rec)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def write_final(run_dir: Path, models: Sequence[Params], summary: dict[str, Any]) -> None:
    """``models.safetensors`` (keys ``"{k}/{param}"``; its SHA-256 goes into ``summary``) and ``summary.json``, atomically.

    Raises
    ------
    WriteError
        A file could not be written (the previous version of each file is intact).
    """
    if models:
        target = run_dir / "models.safetensors"
        tmp = run_dir / f".models.tmp-{os.getpid()}"
        try:
            save_file({f"{k}/{n}": t.contiguous() for k, m in enumerate(models) for n, t in m.items()}, str(tmp))
            _fsync_file(tmp)
            os.replace(tmp, target)
            _fsync_dir(run_dir)
        except _WRITE_ERRORS as exc:
            tmp.unlink(missing_ok=True)
            raise WriteError(f"{target}: cannot write ({_reason(exc)}); the checkpoints are intact") from exc
        summary["models_sha256"] = sha256_file(target)
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")


def load_final(run_dir: Path) -> list[Params]:
    """The K final models of :func:`write_final`, after checking ``models.safetensors`` against ``summary.json``.

    Raises
    ------
    CheckpointError
        ``models.safetensors`` or ``summary.json`` is missing or unreadable, the summary records no
        ``models_sha256``, or the file's SHA-256 differs from it (a changed or corrupt file).
    """
    path, summary_path = run_dir / "models.safetensors", run_dir / "summary.json"
    try:
        recorded = json.loads(summary_path.read_text(encoding="utf-8")).get("models_sha256")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise CheckpointError(f"{summary_path}: unreadable ({exc}); {path.name} cannot be verified") from None
    if not recorded:
        raise CheckpointError(f"{summary_path}: records no models_sha256; {path} cannot be verified")
    if not path.is_file() or sha256_file(path) != recorded:
        raise CheckpointError(f"{path}: missing or its SHA-256 does not match models_sha256 in {summary_path.name}")
    flat = load_file(str(path))
    models: dict[int, Params] = {}
    for key, t in flat.items():
        k, name = key.split("/", 1)
        models.setdefault(int(k), {})[name] = t
    return [models[k] for k in sorted(models)]

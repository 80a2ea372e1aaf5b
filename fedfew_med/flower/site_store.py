"""A site's persistent state on its own disk: one safetensors snapshot per round.

Layout under the SuperNode's ``state-dir``::

    <state-dir>/<run-key>/<site>/round-00004.safetensors
    <state-dir>/<run-key>/<site>/deployed.json      the model this site deploys, after the last evaluation

A snapshot holds the site's :class:`~fedfew_med.training.SiteState` *after* that
round (tensors ``t<i>``; the safetensors header metadata maps each to its kind,
slot and name, and records site, run key, round and the SHA-256 of the tensors,
checked on every load, so a changed or corrupt byte is refused). It is written to a
temporary file, fsynced and renamed, so a crash leaves either the old or the new
snapshot, never half of one.

Which snapshot a message starts from is decided by the coordinator, not by the
site: every train/evaluate message names a *base round*, the last round whose
reply from this site the server accepted (-1: none). That makes a replayed round
after a coordinator restart, and a round whose reply arrived too late, start
from exactly the state the in-process simulation would use. Because the base
round a coordinator sends a site never decreases, every snapshot other than the
base and the one just written can be deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedfew_med.checkpoint import atomic_write_text
from fedfew_med.training import SiteState

log = logging.getLogger(__name__)

_SAFE = re.compile(r"^[A-Za-z0-9._-]+$")
_SNAPSHOT = re.compile(r"^round-(\d{5,})\.safetensors$")


class SiteStateError(RuntimeError):
    """The state a message asks for is not on this site's disk (or is corrupt)."""


class SiteStore:
    """Snapshots of one site's state for one run."""

    def __init__(self, state_dir: Path, *, run_key: str, site: str) -> None:
        for what, value in (("run key", run_key), ("site name", site)):
            if not _SAFE.match(value) or value in (".", ".."):
                raise ValueError(f"{what} must use only letters, digits, '.', '_' and '-', got {value!r}")
        self.run_key = run_key
        self.site = site
        self.root = Path(state_dir) / run_key / site

    def path(self, round_idx: int) -> Path:
        return self.root / f"round-{round_idx:05d}.safetensors"

    def rounds(self) -> list[int]:
        """Rounds with a complete snapshot on disk, ascending."""
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _SNAPSHOT.match(p.name)))

    def load(self, round_idx: int) -> SiteState:
        """The state after ``round_idx`` (-1: a fresh state)."""
        if round_idx < 0:
            return SiteState()
        path = self.path(round_idx)
        if not path.is_file():
            raise SiteStateError(
                f"site {self.site!r}: no state snapshot for round {round_idx} in {self.root} "
                f"(found rounds {self.rounds()}); the state directory was changed or wiped"
            )
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except Exception as exc:  # a truncated or foreign file
            raise SiteStateError(f"{path}: unreadable state snapshot ({exc})") from None
        if meta.get("site") != self.site or meta.get("run_key") != self.run_key or meta.get("round") != str(round_idx):
            raise SiteStateError(f"{path}: snapshot belongs to site {meta.get('site')!r}, run {meta.get('run_key')!r}, "
                                 f"round {meta.get('round')!r}")
        if "sha256" not in meta or "index" not in meta:
            raise SiteStateError(f"{path}: state snapshot records no {'sha256' if 'index' in meta else 'index'}; it cannot be verified")
        if tensors_sha256(tensors, meta["index"]) != meta["sha256"]:
            raise SiteStateError(f"{path}: the snapshot's tensors do not match its SHA-256 (a changed or corrupt file); "
                                 "restore it, or start a new run")
        return unflatten_state(tensors, json.loads(meta["index"]))

    def save(self, round_idx: int, state: SiteState, *, keep: int | None = None) -> Path:
        """Write the state after ``round_idx`` atomically; then drop every snapshot but it and ``keep``."""
        self.root.mkdir(parents=True, exist_ok=True)
        tensors, index = flatten_state(state)
        meta = {"site": self.site, "run_key": self.run_key, "round": str(round_idx), "index": json.dumps(index)}
        meta["sha256"] = tensors_sha256(tensors, meta["index"])
        final = self.path(round_idx)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        save_file({k: t.clone() for k, t in tensors.items()}, str(tmp), metadata=meta)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        atomic_write_text(self.root / "LATEST", f"{final.name}\n")  # for people, and it fsyncs the directory
        for r in self.rounds():
            if r not in (round_idx, keep):
                self.path(r).unlink(missing_ok=True)
        return final


    def save_choice(self, round_idx: int, entry: Mapping[str, Any]) -> Path:
        """Record the model this site deploys after ``round_idx`` (``deployed.json``: round, model, scores, metrics)."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "deployed.json"
        choice = {"site": self.site, "run_key": self.run_key, "round": round_idx,
                  **{k: entry[k] for k in ("model", "scores", "metrics") if k in entry}}
        atomic_write_text(path, json.dumps(choice, indent=2, sort_keys=True) + "\n")
        return path

    def load_choice(self) -> dict[str, Any] | None:
        """The last recorded deployment choice, or None before the first evaluation."""
        path = self.root / "deployed.json"
        if not path.is_file():
            return None
        choice: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return choice


def tensors_sha256(tensors: Mapping[str, torch.Tensor], index: str) -> str:
    """SHA-256 over the index and every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256(index.encode("utf-8"))
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"\0{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # reshape: a 0-dim tensor cannot be viewed
    return h.hexdigest()


def flatten_state(state: SiteState) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """(``{"t<i>": tensor}``, ``{"t<i>": [kind, slot, name]}``): no parsing of slot names needed later."""
    tensors: dict[str, torch.Tensor] = {}
    index: dict[str, list[str]] = {}
    for kind, slots in (("models", state.models), ("buffers", state.buffers)):
        for slot, params in slots.items():  # insertion order is kept, and restored by unflatten_state
            for name, t in params.items():
                key = f"t{len(tensors)}"
                tensors[key] = t.detach().contiguous()
                index[key] = [kind, slot, name]
    return tensors, index


def unflatten_state(tensors: Mapping[str, torch.Tensor], index: Mapping[str, list[str]]) -> SiteState:
    """The inverse of :func:`flatten_state`."""
    if set(tensors) != set(index):
        raise SiteStateError("site state: tensors and index do not match")
    state = SiteState()
    for key in sorted(index, key=lambda k: int(k[1:])):
        kind, slot, name = index[key]
        target = state.models if kind == "models" else state.buffers
        target.setdefault(slot, {})[name] = tensors[key]
    return state

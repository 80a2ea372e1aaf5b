"""A digest chain over a run's privacy ledgers: spent budget cannot be reset or rolled back by editing files.

The ledgers themselves travel in every checkpoint (:func:`fedfew_med.dp.federation.privacy_state`),
and each ledger's state carries a digest of its own history; but a deleted checkpoint, or a
checkpoint whose ledgers were replaced by an older, internally consistent state, would pass those
checks and hand spent budget back. This module adds ``privacy_ledger.jsonl`` to the run directory:
one line per completed round, written (atomically, the whole file replaced) *before* the round's
record and checkpoint, each line::

    {"version": 1, "round": r,
     "sites":  {name: {"epsilon": ε, "digest": ledger history digest, "entries": n}, ...},
     "server": {...},                      # under server-side DP only
     "state":  SHA-256 of the canonical JSON privacy state the checkpoint of round r stores,
     "prev":   SHA-256 of the previous line (first line: of the genesis string with the config digest)}

Rules checked when a run resumes (:func:`open_chain`, then :meth:`LedgerChain.verify_checkpoint`):

- every line parses, has every field, links to the one before it (no line edited, inserted or
  removed in the middle), the rounds run 0, 1, 2 ... without a gap, and the first line names the
  run's config digest;
- the chain reaches the checkpoint's round (a missing or truncated chain refuses), and the state
  digest of the line of that round equals the digest of the privacy state in the checkpoint (an
  edited or older ledger refuses);
- the chain is at most **one** round ahead of the checkpoint. That happens honestly when a run is
  killed between writing the chain line and finishing the checkpoint. The resumed run re-runs that
  round from the checkpoint; every random stream is derived from (seed, round, site, slot), so the
  re-run applies the same mechanisms with the same noise to the same data, i.e. it recomputes the
  same release rather than making a new one, and its ledger must come out *exactly* as the chain
  line recorded (:meth:`LedgerChain.append` refuses otherwise). Budget written to the chain thus
  always counts, even if the checkpoint was lost. Two or more rounds ahead means checkpoints were
  deleted or rolled back: refused;
- with no checkpoint at all, a chain of more than one line, or (chain also gone) a ``metrics.jsonl``
  or ``summary.json`` that reports privacy spending, refuses.

What it does not protect against: someone who recomputes every digest (chain and checkpoint) with
this code, or who deletes the whole run directory and starts again. The digests are not
signatures; against a forger, sign the chain head with a key kept outside the run directory or
anchor it elsewhere. Budget across separate runs over the same data is the privacy policy's
concern (:mod:`fedfew_med.privacy`), not this file's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedfew_med.checkpoint import atomic_write_text
from fedfew_med.dp.ledger import LedgerStateError

CHAIN_FILE = "privacy_ledger.jsonl"
CHAIN_VERSION = 1
_FIELDS = ("version", "round", "sites", "state", "prev")

__all__ = [
    "CHAIN_FILE",
    "LedgerChain",
    "LedgerChainError",
    "chain_entry",
    "encode_entry",
    "genesis",
    "line_digest",
    "open_chain",
    "parse_chain",
    "state_digest",
]


class LedgerChainError(LedgerStateError):
    """``privacy_ledger.jsonl`` is missing, edited, truncated, or disagrees with the checkpoint."""


# --------------------------------------------------------------------------------- pure parts
def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)


def state_digest(privacy_state: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a run's privacy state (the same after a JSON round trip)."""
    return hashlib.sha256(_canonical(privacy_state).encode("utf-8")).hexdigest()


def genesis(config_digest: str) -> str:
    """The ``prev`` of the first line: binds the chain to the run's config."""
    return hashlib.sha256(f"fedfew-med privacy ledger chain v{CHAIN_VERSION}; config {config_digest}".encode()).hexdigest()


def line_digest(line: str) -> str:
    """SHA-256 of one line's text (without its newline)."""
    return hashlib.sha256(line.encode("utf-8")).hexdigest()


def _party(ledger_state: Mapping[str, Any]) -> dict[str, Any]:
    history = ledger_state.get("history") or []
    return {"epsilon": ledger_state.get("epsilon"), "digest": ledger_state.get("digest"), "entries": len(history)}


def chain_entry(round_idx: int, privacy_state: Mapping[str, Any], *, prev: str) -> dict[str, Any]:
    """The line of ``round_idx`` for ``privacy_state`` (as :func:`fedfew_med.dp.federation.privacy_state` returns it).

    Parameters
    ----------
    round_idx
        The completed round.
    privacy_state
        ``{"sites": {name: {"ledger": {...}, ...}}, "server": {"ledger": {...}, ...}}``.
    prev
        Digest of the previous line (:func:`line_digest`) or :func:`genesis` for the first.
    """
    sites = privacy_state.get("sites") or {}
    entry: dict[str, Any] = {
        "version": CHAIN_VERSION,
        "round": int(round_idx),
        "sites": {name: _party(s.get("ledger") or {}) for name, s in sorted(sites.items())},
        "state": state_digest(privacy_state),
        "prev": prev,
    }
    if privacy_state.get("server") is not None:
        entry["server"] = _party(privacy_state["server"].get("ledger") or {})
    return entry


def encode_entry(entry: Mapping[str, Any]) -> str:
    """One line of the chain (canonical JSON, no newline)."""
    return _canonical(entry)


def parse_chain(text: str, *, config_digest: str, where: str) -> list[tuple[str, dict[str, Any]]]:
    """Every ``(line, entry)`` of a chain file's text, after checking format, links and rounds.

    Raises
    ------
    LedgerChainError
        A line is torn, unparsable or lacks a field; a ``prev`` does not match the line before
        (or the genesis of ``config_digest``); the rounds are not 0, 1, 2 ... in order.
    """
    if text and not text.endswith("\n"):
        raise LedgerChainError(f"{where}: the last line is incomplete (no newline); the file was truncated or edited")
    out: list[tuple[str, dict[str, Any]]] = []
    prev = genesis(config_digest)
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LedgerChainError(f"{where}: line {number} is not JSON ({exc.msg}); the file was edited") from None
        if not isinstance(entry, dict) or any(k not in entry for k in _FIELDS):
            missing = [k for k in _FIELDS if not isinstance(entry, dict) or k not in entry]
            raise LedgerChainError(f"{where}: line {number} lacks {', '.join(missing)}; the file was edited")
        if entry["version"] != CHAIN_VERSION:
            raise LedgerChainError(f"{where}: line {number} has version {entry['version']!r}, expected {CHAIN_VERSION}")
        if entry["prev"] != prev:
            what = "the run's config (a chain of another run?)" if number == 1 else f"line {number - 1}"
            raise LedgerChainError(
                f"{where}: line {number} (round {entry.get('round')!r}) does not link to {what}: its 'prev' is "
                f"{str(entry['prev'])[:12]}..., expected {prev[:12]}...; a line was edited, inserted or removed"
            )
        if entry["round"] != len(out):
            raise LedgerChainError(
                f"{where}: line {number} is round {entry['round']!r}, expected round {len(out)}; rounds are missing"
            )
        if encode_entry(entry) != line:
            raise LedgerChainError(f"{where}: line {number} is not in canonical form; the file was edited")
        out.append((line, entry))
        prev = line_digest(line)
    return out


# ------------------------------------------------------------------------- the file of a run
@dataclass
class LedgerChain:
    """The chain of one run directory, held in memory and rewritten atomically on every append.

    Build it with :func:`open_chain`.
    """

    path: Path
    config_digest: str
    lines: list[str] = field(default_factory=list)
    entries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def last_round(self) -> int:
        """The last round in the chain (-1 when empty)."""
        return len(self.entries) - 1

    def verify_checkpoint(self, round_idx: int, privacy_state: Mapping[str, Any] | None, *, where: str) -> None:
        """Check that the checkpoint of ``round_idx`` holds exactly the ledgers the chain recorded for it.

        Raises
        ------
        LedgerChainError
            The chain does not reach ``round_idx``, is more than one round ahead of it, or its line of
            ``round_idx`` records another privacy state (edited, or replaced by an older one).
        """
        _check_rounds(self, round_idx, where=where)
        if privacy_state is None:
            raise LedgerChainError(f"{where}: the checkpoint holds no privacy state, but {self.path} records spending")
        recorded = self.entries[round_idx]["state"]
        actual = state_digest(privacy_state)
        if actual != recorded:
            raise LedgerChainError(
                f"{where}: the privacy ledgers in the checkpoint of round {round_idx} do not match line {round_idx + 1} "
                f"of {self.path} (state digest {actual[:12]}..., recorded {recorded[:12]}...); the checkpoint's ledgers "
                "were edited or replaced by an older state, which would hand spent budget back"
            )
        if self._line(round_idx, privacy_state) != self.lines[round_idx]:  # same state, other ε or digests: the line was edited
            raise LedgerChainError(
                f"{where}: line {round_idx + 1} of {self.path} does not describe the checkpoint's ledgers of round "
                f"{round_idx} (its ε, digests or entry counts were edited)"
            )

    def _line(self, round_idx: int, privacy_state: Mapping[str, Any]) -> str:
        """The line ``round_idx`` must have, given the lines before it."""
        prev = line_digest(self.lines[round_idx - 1]) if 0 < round_idx <= len(self.lines) else genesis(self.config_digest)
        return encode_entry(chain_entry(round_idx, privacy_state, prev=prev))

    def append(self, round_idx: int, privacy_state: Mapping[str, Any]) -> None:
        """Record the ledgers after ``round_idx`` (call before the round's record and checkpoint).

        The round after the last one is appended; the last one itself (a round re-run after a kill
        between this call and its checkpoint) must reproduce its line exactly and writes nothing.

        Raises
        ------
        LedgerChainError
            A re-run round spent differently than its line records, or ``round_idx`` would leave a gap.
        """
        line = self._line(round_idx, privacy_state)
        if round_idx == self.last_round:
            if line != self.lines[round_idx]:
                raise LedgerChainError(
                    f"{self.path}: round {round_idx} was re-run after an interruption but its privacy ledgers differ "
                    f"from those the chain recorded for it (line {round_idx + 1}); the budget it spent cannot be replaced"
                )
            return
        if round_idx != self.last_round + 1:
            raise LedgerChainError(f"{self.path}: cannot record round {round_idx}; the chain ends at round {self.last_round}")
        self.lines.append(line)
        self.entries.append(json.loads(line))
        atomic_write_text(self.path, "".join(f"{x}\n" for x in self.lines))


def _check_rounds(chain: LedgerChain, checkpoint_round: int, *, where: str) -> None:
    """The chain reaches ``checkpoint_round`` (-1: no checkpoint) and is at most one round ahead."""
    last = chain.last_round
    if last < checkpoint_round:
        state = "is missing" if not chain.path.exists() else f"ends at round {last}" if chain.entries else "is empty"
        raise LedgerChainError(
            f"{where}: {chain.path} {state}, but the checkpoint is of round {checkpoint_round} and holds privacy "
            "ledgers; the chain was deleted or truncated, and resuming would lose track of the spent budget"
        )
    if last > checkpoint_round + 1:
        have = f"the latest checkpoint is of round {checkpoint_round}" if checkpoint_round >= 0 else "there is no checkpoint"
        raise LedgerChainError(
            f"{where}: {chain.path} records privacy spending through round {last}, but {have}; checkpoints were "
            "deleted or rolled back, and resuming from them would reset the spent budget"
        )


def _reports_spending(run_dir: Path) -> str | None:
    """A file of ``run_dir`` that reports privacy spending (metrics.jsonl, summary.json), or None."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            data = json.loads(summary.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            data = {}
        if isinstance(data, dict) and (data.get("privacy") or data.get("server_privacy")):
            return str(summary)
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and (rec.get("privacy") or rec.get("server_privacy")):
                return str(metrics)
    return None


def open_chain(run_dir: Path, *, config_digest: str, resume: bool, checkpoint_round: int | None) -> LedgerChain:
    """The chain of ``run_dir``: empty for a new run; read and checked against the checkpoint round on resume.

    Call it before the run directory is opened (nothing in it has changed yet).

    Parameters
    ----------
    run_dir
        The run directory.
    config_digest
        The run's config digest (the chain's first line is bound to it).
    resume
        Whether the run continues; a new run starts an empty chain (its directory is empty or replaced).
    checkpoint_round
        The round of the latest checkpoint (``checkpoints/LATEST``), None when there is none.

    Raises
    ------
    LedgerChainError
        On resume: see the module docstring for every rule.
    """
    path = Path(run_dir) / CHAIN_FILE
    chain = LedgerChain(path=path, config_digest=config_digest)
    if not resume:
        return chain
    where = str(path)
    if path.exists():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise LedgerChainError(f"{where}: unreadable ({exc})") from None
        for line, entry in parse_chain(text, config_digest=config_digest, where=where):
            chain.lines.append(line)
            chain.entries.append(entry)
    elif checkpoint_round is None and (reporter := _reports_spending(Path(run_dir))) is not None:
        raise LedgerChainError(
            f"{where} is missing and there is no checkpoint, but {reporter} reports privacy spending; the chain and "
            "the checkpoints were deleted, and resuming would reset the spent budget"
        )
    _check_rounds(chain, -1 if checkpoint_round is None else checkpoint_round, where=f"{Path(run_dir)}")
    return chain


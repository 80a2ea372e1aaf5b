"""Waiting for the SuperNodes' replies: bounded per site, ended early when a SuperNode disappears.

The coordinator pushes one message per site and waits for the replies. Each wait is bounded by a
:class:`Bound`: ``[faults].site_timeout_s`` when it is set (> 0) and not above ``round-timeout``,
else ``round-timeout`` (``query-timeout`` for the queries of new SuperNodes). A wait also ends as
soon as the site is known to be gone:

- the SuperLink answers for it with an error that means the node or the message is gone
  (``NODE_UNAVAILABLE``, ``MESSAGE_UNAVAILABLE``, ``REPLY_MESSAGE_UNAVAILABLE``): recorded in the
  words of :data:`OFFLINE_WORDS`, Flower's own reason only in the coordinator's log;
- its SuperNode is no longer among ``grid.get_node_ids()``, which the coordinator re-reads every
  :func:`liveness_every` seconds while it waits: recorded as :data:`LEFT`.

How soon Flower 1.41 notices a dead SuperNode: a SuperNode sends a heartbeat every 17.5–22.5 s
(``(30 - 5) × 0.8 ± 0.1``, ``flwr.supercore.heartbeat``) declaring a 30 s interval, and the
SuperLink lists it as online until 2 × 30 s after the last one (``HEARTBEAT_PATIENCE``); so a
SuperNode killed without a goodbye leaves ``get_node_ids()`` 38–60 s after it died, and the
coordinator sees it at its next liveness check (≤ 5 s later at the default ``poll-interval``).

Every message is pulled by its own small thread. A pull can block for minutes inside Flower:
when a SuperNode dies while uploading its reply, the SuperLink holds the reply without all its
objects and ``Grid.pull_messages`` retries them until the upload session expires (180 s,
``OBJECT_PUSH_SESSION_TTL_SECONDS``). One stuck pull therefore never holds up the other sites'
replies nor the coordinator, which stops waiting at the bound; a reply that arrives after that
is discarded (and logged).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)

LEFT = "SiteOffline: the site's SuperNode left the SuperLink during the round (its heartbeat stopped)"
"""A pending site whose SuperNode is no longer listed by the SuperLink."""

OFFLINE_WORDS: Mapping[int, str] = {
    ErrorCode.NODE_UNAVAILABLE: LEFT,
    ErrorCode.MESSAGE_UNAVAILABLE: "SiteOffline: the site's reply never reached the SuperLink whole (its SuperNode "
                                   "went away while sending it, or the message expired)",
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "SiteOffline: the site's reply expired at the SuperLink before the "
                                         "coordinator collected it",
}
"""Flower error codes that mean the site's node or message is gone, in the record's words."""

LIVENESS_EVERY = 5.0  # seconds between two reads of the online SuperNodes while waiting (at most)


@dataclass(frozen=True)
class Bound:
    """How long to wait for one site's reply, and the setting that says so (for the record's words).

    Attributes
    ----------
    seconds
        The bound, > 0.
    setting
        ``"[faults].site_timeout_s"``, ``"round-timeout"`` or ``"query-timeout"``.
    """

    seconds: float
    setting: str

    @classmethod
    def for_round(cls, *, site_timeout_s: float, round_timeout: float) -> Bound:
        """The bound of a train or evaluate wait: ``site_timeout_s`` when set (> 0) and not above ``round_timeout``."""
        if 0 < site_timeout_s <= round_timeout:
            return cls(site_timeout_s, "[faults].site_timeout_s")
        return cls(round_timeout, "round-timeout")

    def words(self) -> str:
        """``"[faults].site_timeout_s = 20 s"``."""
        return f"{self.setting} = {self.seconds:g} s"


def liveness_every(poll_interval: float) -> float:
    """Seconds between two liveness checks: 10 polls, at most :data:`LIVENESS_EVERY` (never below one poll)."""
    return max(poll_interval, min(LIVENESS_EVERY, 10 * poll_interval))


def offline_words(code: int) -> str | None:
    """The record's words for a Flower error code that means the node or the message is gone; None otherwise."""
    return OFFLINE_WORDS.get(code)


class _Puller(threading.Thread):
    """Pulls the reply to one message until it arrives, the pull fails, or :attr:`stop` is set."""

    def __init__(self, grid: Grid, message_id: str, *, poll_interval: float, wake: threading.Event) -> None:
        super().__init__(name=f"fedfew-pull-{message_id[:12]}", daemon=True)  # a stuck pull never blocks the exit
        self.grid = grid
        self.message_id = message_id
        self.poll_interval = poll_interval
        self.wake = wake
        self.stop = threading.Event()
        self.reply: Message | None = None
        self.error: BaseException | None = None
        self.finished = False

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                got = [m for m in self.grid.pull_messages([self.message_id])
                       if m.metadata.reply_to_message_id == self.message_id]
                if got:
                    self.reply = got[0]
                    if self.stop.is_set():
                        log.info("a reply to message %s arrived after the coordinator stopped waiting; discarded",
                                 self.message_id)
                    return
                self.stop.wait(self.poll_interval)
        except BaseException as exc:  # handed to the coordinator's thread, which raises it
            self.error = exc
        finally:
            self.finished = True
            self.wake.set()


def collect(
    grid: Grid,
    pushed: Mapping[str, tuple[K, int]],
    *,
    bound: Bound,
    poll_interval: float,
    describe: Callable[[int, str], str],
    timeout_words: Callable[[K], str],
) -> tuple[dict[K, Message], dict[K, str]]:
    """Pull the replies to ``pushed`` (message id -> (key, node id)) until each arrived, failed or its wait ended.

    Parameters
    ----------
    grid
        The Flower grid the messages were pushed to.
    pushed
        Message id -> (the caller's key for it, e.g. a site name; the destination node id).
    bound
        How long each wait may last (all messages were pushed together, so one deadline).
    poll_interval
        Seconds between two pulls of one message.
    describe
        ``(error code, Flower's reason) -> record text`` for error replies not in :data:`OFFLINE_WORDS`.
    timeout_words
        The record text of a key whose wait reached ``bound``.

    Returns
    -------
    answers, failures
        Replies without error by key; the record text of every other key.
    """
    wake = threading.Event()
    pullers = {mid: _Puller(grid, mid, poll_interval=poll_interval, wake=wake) for mid in pushed}
    for puller in pullers.values():
        puller.start()
    answers: dict[K, Message] = {}
    failures: dict[K, str] = {}
    deadline = time.monotonic() + bound.seconds
    every = liveness_every(poll_interval)
    next_check = time.monotonic() + every
    waiting = dict(pullers)
    try:
        while waiting:
            wake.wait(max(min(deadline, next_check) - time.monotonic(), 0.0))
            wake.clear()  # before reading the pullers: a puller that finishes now sets it again
            for mid, puller in list(waiting.items()):
                if not puller.finished:
                    continue
                del waiting[mid]
                key, node = pushed[mid]
                if puller.error is not None:
                    raise puller.error
                reply = puller.reply
                assert reply is not None  # a puller ends without a reply only when stopped, and a stopped one is not waited for
                if not reply.has_error():
                    answers[key] = reply
                    continue
                code, reason = int(reply.error.code), reply.error.reason or ""
                words = offline_words(code)
                if words is not None:
                    log.warning("SuperNode %d (%s): Flower error %d: %s", node, key, code, reason)
                failures[key] = words if words is not None else describe(code, reason)
            now = time.monotonic()
            if waiting and now >= next_check:
                online = set(grid.get_node_ids())
                for mid in [m for m in waiting if pushed[m][1] not in online]:
                    key, node = pushed[mid]
                    log.warning("SuperNode %d (%s) is no longer connected to the SuperLink; not waiting for its reply",
                                node, key)
                    failures[key] = LEFT
                    waiting.pop(mid).stop.set()
                next_check = now + every
            if waiting and now >= deadline:
                break
    finally:
        for puller in waiting.values():
            puller.stop.set()  # a puller inside a blocked pull ends on its own later; its reply is discarded
    for mid in waiting:
        key, _ = pushed[mid]
        failures[key] = timeout_words(key)
    return answers, failures

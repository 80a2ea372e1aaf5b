"""Waiting for replies (fedfew_med.flower.waits): Flower's error codes in the record's words, a blocked pull, bounds."""

from __future__ import annotations

import threading
import time

import pytest
from flwr.app import Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from fedfew_med.flower.coordinator import describe_error
from fedfew_med.flower.waits import LEFT, OFFLINE_WORDS, Bound, collect, liveness_every

pytestmark = pytest.mark.usefixtures("task_identity")


def _pushed(node: int) -> Message:
    msg = Message(RecordDict(), node, "train", group_id="1")
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


def _reply(msg: Message, *, error: tuple[int, str] | None = None) -> Message:
    reply = Message(Error(*error), reply_to=msg) if error else Message(RecordDict(), reply_to=msg)
    reply.metadata.__dict__["_message_id"] = reply.object_id
    return reply


class StubGrid:
    """Replies ready (or never) by message id; ``blocked`` ids make pull_messages hang until ``release`` is set."""

    def __init__(self, online: set[int]) -> None:
        self.online = online
        self.replies: dict[str, Message] = {}
        self.blocked: set[str] = set()
        self.release = threading.Event()
        self.node_reads = 0

    def pull_messages(self, ids):
        ids = list(ids)
        if self.blocked & set(ids):
            self.release.wait(30)  # like Flower retrying the objects of a half-uploaded reply
            return []
        return [self.replies.pop(i) for i in ids if i in self.replies]

    def get_node_ids(self):
        self.node_reads += 1
        return sorted(self.online)


def _collect(grid: StubGrid, messages: dict[str, Message], seconds: float = 5.0, poll: float = 0.02):
    pushed = {m.metadata.message_id: (site, m.metadata.dst_node_id) for site, m in messages.items()}
    return collect(grid, pushed, bound=Bound(seconds, "[faults].site_timeout_s"), poll_interval=poll,
                   describe=describe_error, timeout_words=lambda site: f"SiteTimeout: {site}")


CLIENT_EXCEPTION = "<class 'fedfew_med.flower.site_errors.SiteFailure'>:<'SiteValidationError while handling a train message'>"


@pytest.mark.parametrize(("code", "reason", "expected"), [
    (ErrorCode.NODE_UNAVAILABLE, "Error: Node Unavailable — The destination node failed to report a heartbeat", LEFT),
    (ErrorCode.MESSAGE_UNAVAILABLE, "Reply message objects are unavailable. The sender may not have completed the upload "
                                    "before the object-push session expired.", OFFLINE_WORDS[ErrorCode.MESSAGE_UNAVAILABLE]),
    (ErrorCode.REPLY_MESSAGE_UNAVAILABLE, "Error: Reply Message Unavailable - The reply message has expired.",
     OFFLINE_WORDS[ErrorCode.REPLY_MESSAGE_UNAVAILABLE]),
    (ErrorCode.CLIENT_APP_RAISED_EXCEPTION, CLIENT_EXCEPTION, "SiteValidationError while handling a train message"),
    (ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "<class 'OSError'>:<'disk full'>", "OSError: disk full"),
    (ErrorCode.CLIENT_APP_CRASHED, "ClientApp stopped responding.", "CLIENT_APP_CRASHED: ClientApp stopped responding."),
])
def test_flower_errors_read_in_the_records_words(code, reason, expected, caplog):
    grid = StubGrid({5})
    msg = _pushed(5)
    grid.replies[msg.metadata.message_id] = _reply(msg, error=(code, reason))
    with caplog.at_level("WARNING", logger="fedfew_med.flower.waits"):
        answers, failures = _collect(grid, {"a": msg})
    assert answers == {} and failures == {"a": expected}
    if expected.startswith("SiteOffline"):
        assert "Flower" not in expected and "session" not in expected  # Flower's internal text stays in the log
        assert any(reason in m for m in caplog.messages)


def test_offline_words_cover_every_code_that_means_the_node_or_message_is_gone():
    assert set(OFFLINE_WORDS) == {ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE}
    assert all(words.startswith("SiteOffline: ") for words in OFFLINE_WORDS.values())


def test_a_blocked_pull_holds_up_neither_the_other_sites_nor_the_bound():
    """A SuperNode died while uploading its reply: Flower's pull of it hangs. The live site's reply is taken,
    and the wait ends at the bound, not when the pull returns."""
    grid = StubGrid({5, 6})
    stuck, live = _pushed(5), _pushed(6)
    grid.blocked.add(stuck.metadata.message_id)
    grid.replies[live.metadata.message_id] = _reply(live)
    t0 = time.monotonic()
    try:
        answers, failures = _collect(grid, {"stuck": stuck, "live": live}, seconds=0.5)
    finally:
        grid.release.set()
    assert time.monotonic() - t0 < 3.0
    assert list(answers) == ["live"] and failures == {"stuck": "SiteTimeout: stuck"}


def test_a_node_that_leaves_ends_its_wait_at_the_next_liveness_check():
    grid = StubGrid({5, 6})
    gone, live = _pushed(5), _pushed(6)
    grid.replies[live.metadata.message_id] = _reply(live)
    grid.online.discard(5)  # heartbeat expired: the SuperLink no longer lists it
    t0 = time.monotonic()
    answers, failures = _collect(grid, {"gone": gone, "live": live}, seconds=30.0, poll=0.02)
    assert time.monotonic() - t0 < liveness_every(0.02) + 2.0
    assert list(answers) == ["live"] and failures == {"gone": LEFT} and grid.node_reads >= 1


@pytest.mark.parametrize(("site_timeout_s", "round_timeout", "expected"), [
    (0.0, 600.0, Bound(600.0, "round-timeout")),  # the default: no site limit, round-timeout bounds
    (20.0, 600.0, Bound(20.0, "[faults].site_timeout_s")),
    (900.0, 600.0, Bound(600.0, "round-timeout")),  # never past round-timeout
    (600.0, 600.0, Bound(600.0, "[faults].site_timeout_s")),
])
def test_the_bound_of_a_round_wait(site_timeout_s, round_timeout, expected):
    assert Bound.for_round(site_timeout_s=site_timeout_s, round_timeout=round_timeout) == expected


@pytest.mark.parametrize(("poll", "every"), [(0.5, 5.0), (0.05, 0.5), (5.0, 5.0), (10.0, 10.0)])
def test_liveness_is_checked_every_ten_polls_at_most_every_five_seconds(poll, every):
    assert liveness_every(poll) == pytest.approx(every)

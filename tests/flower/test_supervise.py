"""The supervisor of ``fedfew-med flower superlink|supernode``: signals forwarded, nothing left behind, no colour codes.

The child here is a small Python script that does what Flower does: it starts a grandchild in a
session of its own (as ``flower-superlink`` starts ``flower-superexec``), writes coloured lines
to stdout and stderr (as Flower's console handler does), then exits, ignores SIGTERM, or stops
cleanly on a signal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fedfew_med.flower import supervise as sv

CHILD = r"""
import signal, subprocess, sys, time
mode = sys.argv[2]
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
print("\x1b[92mINFO \x1b[0m:      child up", flush=True)
print("\x1b[93mWARNING \x1b[0m:   on stderr", file=sys.stderr, flush=True)
if mode == "exit":
    open(sys.argv[1], "w").write(str(grandchild.pid))
    sys.exit(3)
if mode.startswith("ignore"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if mode == "ignore-all":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
if mode == "graceful":
    def bye(signum, _frame):
        print(f"child stopping on {signal.Signals(signum).name}", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, bye)
    signal.signal(signal.SIGINT, bye)
open(sys.argv[1], "w").write(str(grandchild.pid))
time.sleep(120)
"""


def _child(tmp_path: Path, mode: str) -> tuple[list[str], Path]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    pidfile = tmp_path / "grandchild.pid"
    return [sys.executable, str(script), str(pidfile), mode], pidfile


def _wait_pid(pidfile: Path, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pidfile.exists() and pidfile.read_text().strip():
            return int(pidfile.read_text())
        time.sleep(0.02)
    raise AssertionError(f"the child did not write {pidfile} within {timeout:g}s")


def _gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while sv.alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)  # do not leave it to the next test
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize(("text", "expected"), [
    (b"\x1b[92mINFO \x1b[0m:      Starting Flower SuperLink\n", b"INFO :      Starting Flower SuperLink\n"),
    (b"\x1b[1;31mbold red\x1b[0m and \x1b[38;5;208morange\x1b[m", b"bold red and orange"),
    (b"\x1b]0;a window title\x07text\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\", b"textlink"),
    (b"\x1b[2K\x1b[1Gprogress 50%", b"progress 50%"),
    (b"plain [brackets] and 12/06/2026:INFO: stay", b"plain [brackets] and 12/06/2026:INFO: stay"),
])
def test_ansi_escape_sequences_are_removed_and_nothing_else(text, expected):
    assert sv.strip_ansi(text) == expected


def test_descendants_walk_the_tree_parents_first():
    table = {2: 1, 3: 2, 4: 2, 5: 3, 9: 8}
    assert sv.descendants(1, table) == [2, 3, 4, 5]
    assert sv.descendants(8, table) == [9] and sv.descendants(5, table) == []
    assert os.getpid() in sv.process_table() and sv.alive(os.getpid())


@pytest.mark.parametrize(("sig", "seen"), [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT"), (signal.SIGHUP, "SIGTERM")],
                         ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_signal_reaches_the_child_and_what_it_started_is_stopped(tmp_path, sig, seen):
    """The supervisor as its own process, output to a log file (`> log 2>&1`), stopped as a service manager
    (SIGTERM), Ctrl-C (SIGINT) or a closed terminal (SIGHUP, passed on as SIGTERM) would: the child stops in
    its own way, its detached grandchild is stopped too, and the file has each line once, without colour codes."""
    cmd, pidfile = _child(tmp_path, "graceful")
    code = ("import logging, sys\nlogging.basicConfig(level=logging.INFO)\nfrom fedfew_med.flower.supervise import supervise\n"
            f"sys.exit(supervise({cmd!r}, grace=5, kill_grace=0.5))\n")
    logfile = tmp_path / "service.log"
    with logfile.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=Path(__file__).resolve().parents[2])
        try:
            grandchild = _wait_pid(pidfile)
            child = [p for p in sv.descendants(proc.pid) if p != grandchild]
            assert child and sv.alive(grandchild)
            os.kill(proc.pid, sig)
            assert proc.wait(timeout=20) == 0  # the child's exit status
        finally:
            if proc.poll() is None:
                proc.kill()
    assert _gone(grandchild) and all(_gone(p) for p in child)
    text = logfile.read_bytes().decode()
    assert "\x1b" not in text, text
    lines = text.splitlines()
    for line in ("INFO :      child up", "WARNING :   on stderr", f"child stopping on {seen}"):
        assert lines.count(line) == 1, text
    assert f"{sig.name} received, stopping it" in text and "left 1 process(es) running" in text


@pytest.mark.parametrize(("mode", "status"), [("ignore-term", 128 + signal.SIGINT), ("ignore-all", 128 + signal.SIGKILL)])
def test_a_child_that_ignores_sigterm_gets_sigint_then_sigkill(tmp_path, caplog, mode, status):
    """Half the grace period after SIGTERM the child gets SIGINT (uvicorn's force quit), at its end SIGKILL."""
    cmd, pidfile = _child(tmp_path, mode)
    out = (tmp_path / "out.log").open("wb")
    grandchild: list[int] = []

    def stop_us(_proc: subprocess.Popen[bytes]) -> None:  # once our handlers are set: SIGTERM to this very process
        def later() -> None:
            grandchild.append(_wait_pid(pidfile))
            os.kill(os.getpid(), signal.SIGTERM)
        threading.Thread(target=later, daemon=True).start()

    caplog.set_level("INFO", logger="fedfew_med.flower.supervise")
    previous = signal.getsignal(signal.SIGTERM)
    start = time.monotonic()
    with out:
        code = sv.supervise(cmd, grace=2.0, kill_grace=0.5, stdout=out, stderr=out, on_start=stop_us)
    assert code == status and time.monotonic() - start < 15
    assert signal.getsignal(signal.SIGTERM) is previous  # our handler is gone again
    assert grandchild and _gone(grandchild[0])
    assert "still runs 1s after SIGTERM: sending SIGINT (force quit)" in caplog.text
    assert ("did not stop within 2s of SIGTERM: killed" in caplog.text) == (mode == "ignore-all")
    assert (tmp_path / "out.log").read_bytes().count(b"child up") == 1


def test_what_a_child_leaves_behind_when_it_exits_is_stopped(tmp_path):
    cmd, pidfile = _child(tmp_path, "exit")
    subreaper = sv._is_subreaper()
    with (tmp_path / "out.log").open("wb") as out:
        assert sv.supervise(cmd, kill_grace=0.5, stdout=out, stderr=out) == 3  # the child's own exit status
    assert _gone(_wait_pid(pidfile))
    assert sv._is_subreaper() == subreaper  # this process is as it was
    assert b"\x1b" not in (tmp_path / "out.log").read_bytes()


def test_colours_are_kept_when_asked_for(tmp_path):
    cmd, _ = _child(tmp_path, "exit")
    with (tmp_path / "out.log").open("wb") as out:
        assert sv.supervise(cmd, kill_grace=0.5, stdout=out, stderr=out, strip_colours=False) == 3
    assert b"\x1b[92mINFO \x1b[0m:      child up" in (tmp_path / "out.log").read_bytes()

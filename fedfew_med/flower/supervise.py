"""Run a Flower service as a child process: stop it, and everything it started, on a signal.

``flower-superlink`` starts ``flower-superexec`` in a session of its own, which starts one
``flwr-serverapp`` per run; ``flower-supernode`` starts a SuperExec that starts ``flwr-clientapp``
processes. When Flower's own process is stopped these notice it only by polling (or not at all,
for a SuperExec that was already orphaned), so a ``kill`` of the SuperLink left its ServerApp
running. :func:`supervise` runs the command instead of replacing the current process:

- the child gets a session of its own; SIGTERM and SIGINT (Ctrl-C) received here are forwarded
  to it, SIGHUP (a closed terminal) as SIGTERM, so Flower shuts down in its own way;
- if it still runs after half of ``grace`` seconds it gets SIGINT, a second Ctrl-C (the SuperLink's
  web server otherwise waits for every open connection, e.g. a ``flwr log`` stream, to close); after
  ``grace`` seconds it is killed; then every process it left behind (found by walking the process
  tree while it runs and, on Linux, adopted as a child subreaper) has ``kill_grace`` seconds to end
  by itself (Flower's notice that their parent is gone), then gets SIGTERM and, ``kill_grace``
  seconds later, SIGKILL;
- on Linux the child also gets SIGTERM if this process dies (``PR_SET_PDEATHSIG``);
- an output that is not a terminal (a log file, a pipe, journald) gets the child's lines without
  ANSI colour codes (Flower colours its log levels unconditionally); a terminal gets them as they are.

The exit status is the child's, or 128 + N when signal N ended it (as a shell reports it).
Standard library only: the CLI imports it lazily, and ``--help`` stays light.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import FrameType
from typing import IO, Any

log = logging.getLogger(__name__)

FORWARDED = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))
"""The signals passed on to the child (SIGINT is what Ctrl-C sends; SIGHUP, a closed terminal, goes on as SIGTERM:
Flower stops gracefully only on SIGTERM and SIGINT)."""

# CSI sequences (colours, cursor moves), OSC sequences (titles, links) and two-byte escapes
_ANSI = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


def strip_ansi(data: bytes) -> bytes:
    """``data`` without ANSI escape sequences (colours, cursor moves, terminal titles)."""
    return _ANSI.sub(b"", data)


# ------------------------------------------------------------------ the process tree
def process_table() -> dict[int, int]:
    """Every live process as ``{pid: parent pid}`` (``/proc`` on Linux, ``ps`` elsewhere)."""
    table: dict[int, int] = {}
    if os.path.isdir("/proc/self"):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                fields = _stat(int(entry))
                if fields is not None and fields[0] != "Z":
                    table[int(entry)] = int(fields[1])
        return table
    try:
        text = subprocess.run(["ps", "-A", "-o", "pid=", "-o", "ppid="], capture_output=True, text=True,
                              check=False).stdout
    except OSError:
        return table
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            table[int(parts[0])] = int(parts[1])
    return table


def descendants(pid: int, table: Mapping[int, int] | None = None) -> list[int]:
    """The live processes below ``pid``, parents before their children."""
    children: dict[int, list[int]] = {}
    for child, parent in (process_table() if table is None else table).items():
        children.setdefault(parent, []).append(child)
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in sorted(children.get(todo.pop(0), [])):
            out.append(child)
            todo.append(child)
    return out


def _stat(pid: int) -> list[str] | None:
    """Fields 3... of ``/proc/PID/stat`` (state, ppid, ..., start time at index 19); None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    return raw.rsplit(b")", 1)[1].decode().split()


def start_time(pid: int) -> str | None:
    """The start time of ``pid`` (Linux), to tell a process from a later one with the same number."""
    fields = _stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def alive(pid: int, identity: str | None = None) -> bool:
    """Whether ``pid`` runs (a zombie does not), and is still the process whose start time was ``identity``."""
    fields = _stat(pid)
    if fields is not None:
        return fields[0] != "Z" and (identity is None or fields[19] == identity)
    if os.path.isdir("/proc/self"):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap(pids: Iterable[int]) -> None:
    """Collect the exit status of those of ``pids`` that are (adopted) children of this process and have ended."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def _signal(pids: Iterable[int], sig: int, known: Mapping[int, str | None]) -> None:
    for pid in pids:
        if alive(pid, known.get(pid)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def _wait_gone(pids: Mapping[int, str | None], timeout: float) -> list[int]:
    """Wait up to ``timeout`` seconds for ``pids`` to end (reaping those that are our children); those still alive."""
    deadline = time.monotonic() + timeout
    while True:
        _reap(pids)
        left = [p for p in pids if alive(p, pids.get(p))]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def stop_processes(pids: Mapping[int, str | None], *, grace: float, wait_first: float = 0.0) -> tuple[list[int], list[int]]:
    """Stop ``pids`` ({pid: start time or None}): wait ``wait_first`` seconds for them to end by themselves,
    then SIGTERM, then SIGKILL to those still alive after ``grace`` seconds.

    Returns the processes that were sent SIGTERM and those that had to be killed.
    """
    termed = _wait_gone(pids, wait_first)
    _signal(termed, signal.SIGTERM, pids)
    killed = _wait_gone({p: pids.get(p) for p in termed}, grace)
    _signal(killed, signal.SIGKILL, pids)
    _wait_gone({p: pids.get(p) for p in killed}, 5.0)
    return termed, killed


# ------------------------------------------------------------------ Linux process controls
def _prctl(option: int, arg: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, arg, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _is_subreaper() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        flag = ctypes.c_int(0)
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0)) == 0 and bool(flag.value)
    except (OSError, AttributeError):
        return False


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


# ------------------------------------------------------------------ output
def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _fileno(stream: Any) -> int | None:
    try:
        return int(stream.fileno())
    except (AttributeError, ValueError, OSError):
        return None


def _same_file(a: Any, b: Any) -> bool:
    fa, fb = _fileno(a), _fileno(b)
    try:
        return fa is not None and fb is not None and os.path.sameopenfile(fa, fb)
    except OSError:
        return False


def _pump(source: IO[bytes], target: Any, *, strip: bool) -> None:
    """Copy ``source`` to ``target`` line by line (without colour codes if ``strip``); keep draining on write errors."""
    sink = getattr(target, "buffer", None)
    for line in iter(source.readline, b""):
        data = strip_ansi(line) if strip else line
        try:
            if sink is not None:
                sink.write(data)
            else:
                target.write(data if "b" in getattr(target, "mode", "") else data.decode(errors="replace"))
            target.flush()
        except (OSError, ValueError):  # our output went away (closed pipe): the child must not block on its writes
            pass
    source.close()


# ------------------------------------------------------------------ the supervisor
def supervise(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    grace: float = 10.0,
    kill_grace: float = 5.0,
    strip_colours: bool | None = None,
    stdout: Any = None,
    stderr: Any = None,
    poll_interval: float = 0.2,
    on_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> int:
    """Run ``cmd`` until it ends; on SIGTERM/SIGINT/SIGHUP stop it and everything it started.

    Parameters
    ----------
    cmd
        The command line (``flower-superlink ...``, ``flower-supernode ...``, ``flwr run ...``).
    env
        Its environment (default: this process's).
    grace
        Seconds the child has to stop after the first forwarded signal before it is killed; it gets
        SIGINT (force quit) when half of them have passed.
    kill_grace
        Seconds the processes it leaves behind have to end by themselves, and then between SIGTERM
        and SIGKILL.
    strip_colours
        Remove ANSI colour codes from its output; default: for each of stdout and stderr that is
        not a terminal.
    stdout, stderr
        Where its output goes (default ``sys.stdout``, ``sys.stderr``): text streams (written
        through their ``buffer``) or binary files.
    poll_interval
        Seconds between looks at the child (signals are forwarded within this time).
    on_start
        Called with the child's ``Popen`` once it runs (tests).

    Returns
    -------
    int
        The child's exit status, or 128 + N when signal N ended it.
    """
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    strip_out = not _isatty(out) if strip_colours is None else strip_colours
    strip_err = not _isatty(err) if strip_colours is None else strip_colours
    pipe_out = strip_out or _fileno(out) is None  # a stream without a file descriptor is written by a pump
    pipe_err = strip_err or _fileno(err) is None
    merged = pipe_out and pipe_err and strip_out == strip_err and _same_file(out, err)  # `> f 2>&1`: one pipe, in order
    child_env = dict(os.environ if env is None else env)
    if pipe_out or pipe_err:
        child_env.setdefault("PYTHONUNBUFFERED", "1")  # lines reach the pipe as they are written

    was_subreaper = _is_subreaper()
    subreaper = was_subreaper or _prctl(_PR_SET_CHILD_SUBREAPER, 1)  # orphans of the child become ours
    ours_before = set(descendants(os.getpid())) if subreaper else set()
    received: list[int] = []
    previous: dict[int, Any] = {}

    def note(signum: int, _frame: FrameType | None) -> None:  # forwarded by the loop below, once the child runs
        received.append(signum)

    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        for forwarded_signal in FORWARDED:
            previous[int(forwarded_signal)] = signal.signal(forwarded_signal, note)
    proc: subprocess.Popen[bytes] | None = None
    pumps: list[threading.Thread] = []
    known: dict[int, str | None] = {}  # processes seen below the child, {pid: start time}, where no subreaper adopts them
    try:
        proc = subprocess.Popen(
            list(cmd), env=child_env, start_new_session=True,
            stdout=subprocess.PIPE if pipe_out else out,
            stderr=subprocess.STDOUT if merged else (subprocess.PIPE if pipe_err else err),
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        for pipe, target, strip in ((proc.stdout, out, strip_out), (proc.stderr, err, strip_err)):
            if pipe is not None:
                thread = threading.Thread(target=_pump, args=(pipe, target), kwargs={"strip": strip}, daemon=True,
                                          name=f"supervise-{proc.pid}")
                thread.start()
                pumps.append(thread)
        if on_start is not None:
            on_start(proc)
        name = os.path.basename(cmd[0])
        forwarded = 0
        stop_by: float | None = None
        nudge_at: float | None = None
        next_walk = 0.0
        while True:
            now = time.monotonic()
            if not subreaper and (now >= next_walk or len(received) > forwarded):
                for pid in descendants(proc.pid):
                    known.setdefault(pid, start_time(pid))
                next_walk = now + 1.0
            while forwarded < len(received):
                signum = received[forwarded]
                forwarded += 1
                if stop_by is None:
                    stop_by, nudge_at = now + grace, now + grace / 2
                    log.info("%s: %s received, stopping it (at most %gs)", name, signal.Signals(signum).name, grace)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM if signum == getattr(signal, "SIGHUP", None) else signum)
            if nudge_at is not None and now >= nudge_at and proc.poll() is None:
                nudge_at = None
                log.info("%s still runs %gs after %s: sending SIGINT (force quit)", name, grace / 2,
                         signal.Signals(received[0]).name)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGINT)
            if stop_by is not None and now >= stop_by and proc.poll() is None:
                log.warning("%s did not stop within %gs of %s: killed", name, grace, signal.Signals(received[0]).name)
                _signal([proc.pid, *descendants(proc.pid)], signal.SIGKILL, {})
            try:
                proc.wait(timeout=poll_interval)
                break
            except subprocess.TimeoutExpired:
                continue
        # whatever it started and did not stop: adopted by this subreaper, or seen in the walks
        adopted = [p for p in descendants(os.getpid()) if p not in ours_before] if subreaper else []
        left = {p: known.get(p) or start_time(p) for p in dict.fromkeys([*adopted, *known]) if alive(p, known.get(p))}
        if left:  # Flower's own stop when they notice their parent is gone (they poll): give them the time
            termed, killed = stop_processes(left, grace=kill_grace, wait_first=kill_grace)
            log.log(logging.WARNING if killed else logging.INFO,
                    "%s left %d process(es) running (pids %s): %d ended by themselves, %d on SIGTERM, %d killed",
                    name, len(left), ", ".join(map(str, sorted(left))), len(left) - len(termed),
                    len(termed) - len(killed), len(killed))
    finally:
        if proc is not None and proc.poll() is None:  # an error here: take the child down with us
            _signal([proc.pid, *descendants(proc.pid)], signal.SIGKILL, {})
            proc.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if subreaper and not was_subreaper:
            _prctl(_PR_SET_CHILD_SUBREAPER, 0)
        for thread in pumps:
            thread.join(timeout=2.0)
    code = int(proc.returncode)
    return 128 - code if code < 0 else code

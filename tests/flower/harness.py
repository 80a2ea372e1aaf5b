"""A federation of real Flower processes on loopback, for the integration tests.

One SuperLink (TLS, SuperNode authentication, SQLite state) and SuperNodes (one per
site, each with its own key, FLWR_HOME and Runtime API port), started with the
command lines of :mod:`fedfew_med.flower.launch`. Every wait is bounded; every
process started here, and everything they start, is killed by :meth:`LoopbackFederation.close`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from fedfew_med.flower import launch
from fedfew_med.flower.supervise import (  # the process tree as the CLI's supervisor walks it
    alive,
    descendants,
)

T = TypeVar("T")
CONNECTION = "fedfew-test"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], T], *, timeout: float, what: str, interval: float = 0.5,
              diagnostics: Callable[[], str] | None = None) -> T:
    """Poll ``predicate`` until it returns something truthy; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{diagnostics()}" if diagnostics else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}{extra}")
        time.sleep(interval)


def kill_tree(proc: subprocess.Popen[bytes], *, sig: int = signal.SIGTERM, grace: float = 15.0) -> None:
    """Signal ``proc``, its process group and all its descendants; SIGKILL what is left after ``grace``."""
    pids = [proc.pid, *descendants(proc.pid)]
    for target in pids:
        try:
            os.kill(target, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + grace
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for target in [*pids, *descendants(proc.pid)]:
        if alive(target):
            try:
                os.kill(target, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


class LoopbackFederation:
    """SuperLink + SuperNodes on 127.0.0.1; use as a context manager."""

    def __init__(self, root: Path, *, sites: list[str], node_configs: Mapping[str, Mapping[str, Any]]) -> None:
        self.root = root
        self.sites = sites
        self.node_configs = node_configs
        self.port = free_port()
        self.creds = launch.make_credentials(root / "credentials", sites=sites, hosts=["127.0.0.1", "localhost"])
        self.cli_home = root / "flwr-cli"
        self.link: subprocess.Popen[bytes] | None = None
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}
        self.node_ports = {s: free_port() for s in sites}
        self.started: list[subprocess.Popen[bytes]] = []
        self._logs: list[Any] = []
        self.restarts = 0
        launch.write_connection(self.cli_home, CONNECTION, address=f"127.0.0.1:{self.port}", root_certificates=self.creds.ca_cert)

    # ---------------------------------------------------------------- processes
    def _spawn(self, cmd: list[str], name: str, home: Path) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.log").open("ab")
        self._logs.append(log)
        env = launch.flower_env(flwr_home=home)
        env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = "0.2"  # start ClientApp/ServerApp processes sooner (default 1 s)
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.root)
        self.started.append(proc)
        return proc

    def start_superlink(self) -> None:
        cmd = launch.superlink_command(credentials=self.creds, port=self.port, database=self.root / "superlink.db")
        self.link = self._spawn(cmd, "superlink", self.root / "link-home")
        wait_for(self._port_open, timeout=90, what="the SuperLink to listen", diagnostics=self.logs)

    def crash_superlink(self) -> None:
        assert self.link is not None
        kill_tree(self.link, sig=signal.SIGKILL, grace=5)
        self.link = None

    def register_all(self) -> None:
        for site in self.sites:
            self.flwr(launch.register_command(self.creds.node_keys[site][1], CONNECTION), timeout=90)

    def start_supernode(self, site: str) -> None:
        cmd = launch.supernode_command(
            superlink=f"127.0.0.1:{self.port}", node_config=self.node_configs[site],
            root_certificates=self.creds.ca_cert, private_key=self.creds.node_keys[site][0],
            runtime_port=self.node_ports[site],
        )
        self.nodes[site] = self._spawn(cmd, f"supernode-{site}", self.root / f"home-{site}")

    def start_all(self) -> None:
        """The SuperLink, every site registered and its SuperNode started, all of them online."""
        self.start_superlink()
        self.register_all()
        for site in self.sites:
            self.start_supernode(site)
        self.wait_online(len(self.sites))

    def crash_supernode(self, site: str) -> None:
        kill_tree(self.nodes.pop(site), sig=signal.SIGKILL, grace=5)

    def close(self) -> None:
        for proc in reversed(self.started):
            kill_tree(proc, sig=signal.SIGTERM, grace=10)
        for fh in self._logs:
            fh.close()

    def __enter__(self) -> LoopbackFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- the flwr CLI
    def flwr(self, cmd: list[str], *, timeout: float) -> str:
        done = subprocess.run(cmd, env=launch.flower_env(flwr_home=self.cli_home), capture_output=True, timeout=timeout,
                              cwd=self.root, stdin=subprocess.DEVNULL)
        text = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{text}\n{self.logs()}")
        return text

    def online_nodes(self) -> int:
        out = self.flwr([launch.flower_executable("flwr"), "supernode", "ls", CONNECTION, "--format", "json"], timeout=60)
        data = json.loads(out[out.index("{"):])
        return sum(1 for n in data.get("nodes", []) if str(n.get("status", "")).lower() == "online")

    def wait_online(self, n: int, *, timeout: float = 180) -> None:
        wait_for(lambda: self.online_nodes() >= n, timeout=timeout, interval=2, what=f"{n} SuperNodes online",
                 diagnostics=self.logs)

    def run(self, run_config: Mapping[str, Any]) -> int:
        out = self.flwr(launch.flwr_run_command(CONNECTION, run_config), timeout=120)
        match = re.search(r"started run (\d+)", out)
        assert match, out
        return int(match.group(1))

    # ---------------------------------------------------------------- helpers
    def _port_open(self) -> bool:
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def logs(self, tail: int = 4000) -> str:
        parts = []
        for path in sorted(self.root.glob("*.log")):
            parts.append(f"----- {path.name} -----\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

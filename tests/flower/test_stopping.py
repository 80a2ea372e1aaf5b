"""Stopping a real deployment started with the documented commands: nothing is left running, logs are clean.

``fedfew-med flower superlink`` and one ``fedfew-med flower supernode`` (the CLI, as docs/deployment.md
starts them, output redirected to files) with two more SuperNodes, a run whose ServerApp log is
streamed to a file; SIGTERM to both CLI processes while the ServerApp and a ClientApp run. Before the
supervisor, the SuperLink's ServerApp (started by its SuperExec, in a session of its own) outlived it,
every coordinator line was written twice (once more by the root handler Opacus's ``basicConfig``
installs), and the files held Flower's ANSI colour codes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedfew_med.flower import launch
from fedfew_med.flower.supervise import alive, descendants, start_time
from tests.flower.conftest import write_config
from tests.flower.harness import CONNECTION, LoopbackFederation, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # real processes: a minute or two
NAMES = ["site00-bright", "site01-dark", "site02-noisy"]
OPACUS_FORMAT = re.compile(r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:[A-Z]+:")  # Opacus's basicConfig format


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _tree(pid: int) -> dict[int, str]:
    return {p: _cmdline(p) for p in [pid, *descendants(pid)]}


def _has(pid: int, program: str) -> bool:
    return any(program in cmd for cmd in _tree(pid).values())


def test_sigterm_to_the_cli_superlink_and_supernode_leaves_no_process_and_clean_logs(tmp_path):
    config_path = tmp_path / "federation.toml"
    write_config(config_path, run={"rounds": 2})
    node_configs = {name: {"federation-config": str(config_path), "site-index": i, "state-dir": str(tmp_path / f"state-{name}")}
                    for i, name in enumerate(NAMES)}
    cli = launch.flower_executable("fedfew-med")
    files = []

    def spawn(cmd: list[str], name: str, home: Path) -> subprocess.Popen[bytes]:
        fh = (tmp_path / f"{name}.log").open("wb")
        files.append(fh)
        env = launch.flower_env(flwr_home=home)
        env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = "0.2"
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=tmp_path)
        fed.started.append(proc)  # killed by fed.close() if the test fails first
        return proc

    run_dir = tmp_path / "run"
    run_config = {"federation-config": str(config_path), "run-dir": str(run_dir), "expected-sites": 3,
                  "connect-timeout": 120.0, "query-timeout": 120.0, "round-timeout": 180.0, "poll-interval": 0.2}
    with LoopbackFederation(tmp_path, sites=NAMES, node_configs=node_configs) as fed:
        link = spawn([cli, "flower", "superlink", "--credentials", str(fed.creds.root), "--port", str(fed.port)],
                     "superlink-cli", tmp_path / "link-home")
        wait_for(fed._port_open, timeout=90, what="the SuperLink to listen", diagnostics=fed.logs)
        fed.register_all()
        key = fed.creds.node_keys[NAMES[0]][0]
        node = spawn([cli, "flower", "supernode", "--superlink", f"127.0.0.1:{fed.port}", "--ca", str(fed.creds.ca_cert),
                      "--key", str(key), "--runtime-port", str(fed.node_ports[NAMES[0]]), "--federation-config",
                      str(config_path), "--site-index", "0", "--state-dir", str(tmp_path / f"state-{NAMES[0]}")],
                     "supernode-cli", tmp_path / f"home-{NAMES[0]}")
        for name in NAMES[1:]:
            fed.start_supernode(name)
        fed.wait_online(3)
        # the ServerApp's log, streamed to a file through the same supervisor (what `flower run --stream` should do)
        stream_cmd = launch.flwr_run_command(CONNECTION, run_config, stream=True)
        spawn([sys.executable, "-c", f"import sys\nfrom fedfew_med.flower.supervise import supervise\n"
               f"sys.exit(supervise({stream_cmd!r}))"], "run-stream", fed.cli_home)
        run_log = tmp_path / "run-stream.log"
        wait_for(lambda: run_log.read_text(errors="replace").count(" is SuperNode ") >= 3 and _has(link.pid, "flwr-serverapp")
                 and _has(node.pid, "flwr-clientapp"), timeout=400, interval=0.1,
                 what="the coordinator's site lines, a running ServerApp and a ClientApp at the CLI SuperNode",
                 diagnostics=fed.logs)
        before = {**_tree(link.pid), **_tree(node.pid)}
        assert any("flower-superexec" in c for c in before.values()), before
        identity = {p: start_time(p) for p in before if alive(p)}
        os.kill(node.pid, signal.SIGTERM)
        os.kill(link.pid, signal.SIGTERM)
        link_code, node_code = link.wait(timeout=60), node.wait(timeout=60)
        left = {p: before[p] for p, start in identity.items() if alive(p, start)}
        assert left == {}, f"left running after SIGTERM: {left}"
        print(f"exit status: superlink {link_code}, supernode {node_code}")  # shown with pytest -rP
        assert 128 + signal.SIGKILL not in (link_code, node_code)  # both stopped without being killed
        assert not (run_dir / "summary.json").exists()  # it was stopped in the middle of the run
    logs = {name: (tmp_path / f"{name}.log").read_text(errors="replace") for name in ("superlink-cli", "supernode-cli", "run-stream")}
    for name, text in logs.items():
        assert "\x1b[" not in text, f"{name}.log has ANSI escape sequences:\n{text[-3000:]}"
    assert logs["superlink-cli"].count("Starting Flower SuperLink") == 1
    assert "SuperNode" in logs["supernode-cli"]
    lines = logs["run-stream"].splitlines()
    ours = [line for line in lines if line.startswith("INFO fedfew_med.")]
    assert len(ours) >= 3 and len(ours) == len(set(ours)), logs["run-stream"]  # each coordinator line once
    for name in NAMES:
        assert sum(f"site {name} is SuperNode" in line for line in lines) == 1, logs["run-stream"]
    assert not [line for line in lines if OPACUS_FORMAT.match(line)], logs["run-stream"]  # no second format

"""The app processes' logging: each record once, whatever a library did to the root logger."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from fedfew_med.flower.logs import forward_logs


def test_a_record_is_written_once_when_a_library_gave_the_root_logger_a_console_handler(capsys, caplog):
    """As in a ServerApp or ClientApp process after Opacus's ``logging.basicConfig``: our handler shows
    the record, the root's console handler does not repeat it; pytest's capture (not a console) still has it."""
    root = logging.getLogger()
    opacus_like = logging.StreamHandler(sys.stderr)
    opacus_like.setFormatter(logging.Formatter("%(asctime)s:%(levelname)s:%(message)s", "%m/%d/%Y %H:%M:%S"))
    root.addHandler(opacus_like)
    try:
        with forward_logs():
            logging.getLogger("fedfew_med.flower.coordinator").info("round 0 done: 3 replies")
            logging.getLogger("somelib").warning("a library record")  # not ours: the root handler still writes it
        logging.getLogger("fedfew_med.flower.coordinator").warning("after the app call")
    finally:
        root.removeHandler(opacus_like)
    err = capsys.readouterr().err.splitlines()
    assert err.count("INFO fedfew_med.flower.coordinator: round 0 done: 3 replies") == 1
    assert [line for line in err if "round 0 done" in line] == ["INFO fedfew_med.flower.coordinator: round 0 done: 3 replies"]
    assert sum("a library record" in line for line in err) == 1
    assert sum("after the app call" in line for line in err) == 1  # the root handler is as it was again
    assert not opacus_like.filters
    assert "round 0 done: 3 replies" in caplog.messages


@pytest.mark.slow  # a fresh interpreter imports torch, MONAI, Opacus and Flower: half a minute on 2 busy cores
def test_loading_the_server_app_leaves_the_root_logger_unconfigured():
    """What ``flwr-serverapp`` does first: import the ServerApp (which imports Opacus). Before the fix, the root
    logger had Opacus's stderr handler afterwards and every record of the process was written twice
    (fedfew_med.dp.quiet_import undoes it where the package imports Opacus)."""
    code = ("import logging, sys\nimport fedfew_med.flower.server_app\n"
            "assert 'opacus.utils.module_utils' in sys.modules\nprint(len(logging.getLogger().handlers))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2], check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"

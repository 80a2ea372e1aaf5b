"""Importing the DP package configures no logging (Opacus' import-time ``basicConfig`` is undone)."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import logging
root = logging.getLogger()
import fedfew_med.dp  # imports Opacus
import opacus.utils.module_utils  # the module that calls basicConfig
assert root.handlers == [], root.handlers
assert root.level == logging.WARNING, root.level
"""


def test_importing_dp_leaves_the_root_logger_unconfigured():
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_the_check_would_catch_opacus_configuring_logging():
    bare = CHECK.replace("import fedfew_med.dp  # imports Opacus\n", "")
    done = subprocess.run([sys.executable, "-c", bare], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "AssertionError" in done.stderr

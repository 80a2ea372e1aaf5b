"""Show the library's log records while a Flower app runs.

The library only logs (``logging.getLogger(__name__)``) and never configures
handlers. A ServerApp or ClientApp process, however, is an entry point that
nobody else configures; :func:`forward_logs` attaches a stderr handler to the
``fedfew_med`` logger for the duration of one handler call and removes it again.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def forward_logs(level: int = logging.INFO) -> Iterator[None]:
    """Temporarily send ``fedfew_med`` records at ``level`` and above to stderr."""
    logger = logging.getLogger("fedfew_med")
    if logger.handlers:  # someone (the CLI, a test) already decided where the records go
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(level, previous) if previous else level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)

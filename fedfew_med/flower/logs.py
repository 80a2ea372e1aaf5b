"""Show the library's log records, once each, while a Flower app runs.

The library only logs (``logging.getLogger(__name__)``) and never configures
handlers. A ServerApp or ClientApp process, however, is an entry point that
nobody else configures; :func:`forward_logs` attaches a stderr handler to the
``fedfew_med`` logger for the duration of one handler call and removes it again.

Opacus calls ``logging.basicConfig`` when it is imported (``opacus/utils/module_utils.py``),
which gives the root logger a stderr handler in any process that imports it: our records
(they propagate to the root) and Flower's (the ``flwr`` logger propagates too, DEBUG
included) were then written twice, in two formats. :mod:`fedfew_med.dp.quiet_import` undoes
that where Opacus is imported, for every process; :func:`forward_logs` also keeps our records
off any console handler that something else gives the root logger while its own handler shows them.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_LOGGER = "fedfew_med"


class _NotOurs(logging.Filter):
    """Lets through every record except those of the ``fedfew_med`` loggers."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == _LOGGER or record.name.startswith(_LOGGER + "."))


def _console_handlers(logger: logging.Logger) -> list[logging.Handler]:
    """``logger``'s handlers that write to this process's stdout or stderr (not pytest's, not files)."""
    consoles = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) if s is not None}
    return [h for h in logger.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) and id(h.stream) in consoles]


@contextmanager
def forward_logs(level: int = logging.INFO) -> Iterator[None]:
    """Temporarily send ``fedfew_med`` records at ``level`` and above to stderr, each once.

    A console handler that something else gave the root logger (Opacus's ``basicConfig``) does not
    repeat them meanwhile; other root handlers (a file, pytest's capture) still receive them.
    """
    logger = logging.getLogger(_LOGGER)
    if logger.handlers:  # someone (the CLI, a test) already decided where the records go
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    not_ours = _NotOurs()
    repeaters = _console_handlers(logging.getLogger())
    previous = logger.level
    logger.addHandler(handler)
    for h in repeaters:
        h.addFilter(not_ours)
    logger.setLevel(min(level, previous) if previous else level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        for h in repeaters:
            h.removeFilter(not_ours)
        logger.setLevel(previous)


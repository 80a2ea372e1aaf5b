"""Import Opacus without letting it configure logging.

Opacus calls ``logging.basicConfig()`` when it is first imported (``opacus/utils/module_utils.py``),
which gives the root logger a stderr handler in every process that imports this package: each log
record would then be printed twice (a Flower ServerApp's or ClientApp's, a notebook's). A library
does not configure logging, so the package imports Opacus here first and undoes that.
"""

from __future__ import annotations

import logging

_root = logging.getLogger()
_handlers, _level = list(_root.handlers), _root.level

import opacus  # noqa: E402,F401  (the import whose side effect is undone below)

for _handler in [h for h in _root.handlers if h not in _handlers]:
    _root.removeHandler(_handler)
_root.setLevel(_level)

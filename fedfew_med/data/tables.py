"""CSV reading and cell parsing shared by the sources: columns, class labels, splits.

Every failure is a :class:`Problem` naming the file (and the line, for a cell);
the caller decides whether the rest of the file is still usable.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedfew_med.data.splits import SPLITS

FLOAT32_MAX = 3.4028234663852886e38  # features are stored as float32
# cells that mean "no value" in a table (compared case-insensitively): the spellings spreadsheet and
# statistics exports use; "?" is the UCI repository's. Anything else that is not a number is an error.
MISSING = frozenset({"", "na", "n/a", "nan", "null", "?"})


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a site's data: the file it concerns and what is wrong."""

    file: str
    message: str


@dataclass(frozen=True)
class Table:
    """A CSV file's rows (cells stripped) with their line numbers, header first."""

    columns: list[str]
    rows: list[tuple[int, dict[str, str]]]


def read_table(path: Path, shown: str, required: Sequence[str]) -> tuple[Table | None, list[Problem]]:
    """Read ``path``; ``None`` with problems when it cannot be read or lacks ``required`` columns."""
    try:
        with path.open(
            newline="", encoding="utf-8-sig"
        ) as fh:  # utf-8-sig: spreadsheet exports start with a BOM
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = []
            for row in reader:
                cells = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}
                if any(cells.values()):  # blank lines are not records
                    rows.append((reader.line_num, cells))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return None, [Problem(shown, f"cannot read the CSV file: {exc}")]
    if not columns:
        return None, [Problem(shown, "the CSV file is empty (no header line)")]
    missing = [c for c in required if c and c not in columns]
    if missing:
        have = ", ".join(repr(c) for c in columns)
        gone = ", ".join(repr(c) for c in missing)
        return None, [Problem(shown, f"missing column(s) {gone}; the CSV has columns {have}")]
    return Table(columns, rows), []


def class_index(value: Any, names: Sequence[str]) -> int:
    """The class a label cell or datalist value means: an index into ``names`` or one of them.

    Raises
    ------
    ValueError
        When the value is neither, or is an index outside ``0..len(names)-1``.
    """
    listing = ", ".join(names)
    number: int | None = None
    if isinstance(value, str):
        text = value.strip()
        if text in names:
            return list(names).index(text)
        try:
            as_float = float(text)
            if as_float.is_integer():
                number = int(as_float)
        except ValueError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    if number is None:
        raise ValueError(f"label {value!r} is neither a class index nor one of the names {listing}")
    if not 0 <= number < len(names):
        raise ValueError(f"label {number} is outside the label map (0..{len(names) - 1}: {listing})")
    return number


def split_value(value: str) -> str:
    """A split column cell as ``train``, ``val`` or ``test`` (``ValueError`` otherwise)."""
    text = value.strip().lower()
    if text not in SPLITS:
        raise ValueError(f"split {value!r} must be one of train, val, test")
    return text


def read_header(path: Path) -> list[str] | None:
    """The stripped column names of a CSV file, or ``None`` when it cannot be read or is empty.

    Reads the first line only: a federation compares its sites' columns before reading their rows.
    The reasons a file cannot be read are reported later, by :func:`read_table`.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), None)
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    return [c.strip() for c in header] if header else None


def feature_mismatch(have: Sequence[str], want: Sequence[str]) -> str | None:
    """How the feature names ``have`` differ from ``want``, or ``None`` when they are the same list.

    Names missing from ``have`` and extra in it come first; the same names in another order
    are reported as such (positions would cross features silently).
    """
    missing = [c for c in want if c not in have]
    extra = [c for c in have if c not in want]
    parts = []
    if missing:
        parts.append("lacks column(s) " + ", ".join(repr(c) for c in missing))
    if extra:
        parts.append("has extra column(s) " + ", ".join(repr(c) for c in extra))
    if parts:
        return " and ".join(parts)
    if list(have) != list(want):
        return "has the same columns in another order: " + ", ".join(repr(c) for c in have)
    return None


def float_cell(value: str, column: str, *, allow_missing: bool = False) -> float:
    """A finite number that float32 can hold (``ValueError`` naming the column otherwise).

    With ``allow_missing``, a cell spelled as in :data:`MISSING` is NaN (to be imputed later).
    """
    missing = value.strip().lower() in MISSING
    if missing and allow_missing:
        return math.nan
    hint = " (a missing value: [preprocessing].missing = 'mean' or 'median' imputes it)" if missing else ""
    if not value:
        raise ValueError(f"column {column!r} is empty{hint}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"column {column!r} is not a number: {value!r}{hint}") from None
    if not math.isfinite(number):
        raise ValueError(f"column {column!r} is NaN/Inf: {value!r}{hint}")
    if abs(number) > FLOAT32_MAX:
        raise ValueError(f"column {column!r} is too large for float32 (|x| <= {FLOAT32_MAX:.4g}): {value!r}")
    return number

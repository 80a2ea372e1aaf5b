"""A small table that notebooks display as HTML and scripts read as rows (no pandas needed)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fedfew_med.evaluation.stats import Estimate


def format_cell(value: Any) -> str:
    """How a cell is shown: floats with 3 decimals, NaN and None as a dash, estimates with their CI."""
    if value is None:
        return "-"
    if isinstance(value, Estimate):
        return "-" if math.isnan(value.value) else str(value)
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3f}"
    return str(value)


@dataclass(frozen=True)
class Table:
    """Rows of values under named columns.

    Attributes
    ----------
    columns
        Column names.
    rows
        One sequence of values per row (floats, ints, strings, :class:`Estimate`, None).
    title
        Shown above the table.
    notes
        Shown below the table (e.g. how the intervals were computed).
    """

    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    title: str = ""
    notes: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(f"row {i} has {len(row)} values, but the table has {len(self.columns)} columns")

    def records(self) -> list[dict[str, Any]]:
        """The rows as dictionaries keyed by column name (raw values, not formatted)."""
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]

    def column(self, name: str) -> list[Any]:
        """The raw values of one column."""
        if name not in self.columns:
            raise KeyError(f"no column {name!r}; columns are {list(self.columns)}")
        j = list(self.columns).index(name)
        return [row[j] for row in self.rows]

    def __str__(self) -> str:
        cells = [list(self.columns)] + [[format_cell(v) for v in row] for row in self.rows]
        widths = [max(len(r[j]) for r in cells) for j in range(len(self.columns))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(([self.title] if self.title else []) + lines + list(self.notes))

    def _repr_html_(self) -> str:
        esc = html.escape
        head = "".join(f"<th>{esc(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{esc(format_cell(v))}</td>" for v in row) + "</tr>" for row in self.rows)
        title = f"<caption>{esc(self.title)}</caption>" if self.title else ""
        notes = "".join(f"<p><small>{esc(n)}</small></p>" for n in self.notes)
        return f"<table>{title}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{notes}"

"""A tabular site's served model on new rows: the ``predict`` of a site whose records are CSV rows.

The input is a CSV holding the site's feature columns, matched **by name** as the federation
matched them in training (any order, extra columns allowed). Each row goes through the site's
own preprocessing with the statistics its train split gave (imputation, then scaling:
:func:`fedfew_med.data.transforms.apply_feature_statistics`), so a row of the site's own CSV is
scored exactly as the run scored it. Columns that are neither features nor the label nor the
split (a patient identifier, say) are copied into the row's output, first. A row that training
would refuse (a cell that is not a number, a missing value the site does not impute, a label
outside the label map) is skipped with the reason, naming the file and line; the others are
predicted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfew_med.data import SiteData
from fedfew_med.data.sources import feature_names
from fedfew_med.data.tables import class_index, float_cell, read_table
from fedfew_med.data.transforms import apply_feature_statistics
from fedfew_med.site_config import SiteConfig


@dataclass
class RowPredictions:
    """Output rows (one per predicted CSV row) and the rows skipped, with why."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # ("<file> line <n>", why)


def predict_rows(
    cfg: SiteConfig,
    site: SiteData,
    network: torch.nn.Module,
    how: str,
    path: str | Path,
    *,
    on_row: Callable[[int, int, str], None] | None = None,
) -> RowPredictions:
    """Class probabilities of ``network`` for every row of the CSV at ``path``.

    Parameters
    ----------
    cfg, site
        The site's config and data (its metadata hold the train split's statistics).
    network
        The served network, in eval mode.
    how
        Which model serves the site, written into every row.
    path
        A CSV with (at least) the site's feature columns; its label column, when present and
        filled, adds ``label`` and ``correct``.
    on_row
        Called with (done, total, row) after each row, for a progress bar.

    Raises
    ------
    ValueError
        The file cannot be read or lacks one of the site's feature columns.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--input {p}: no such file (a tabular site reads a CSV of rows)")
    features = site.metadata.get("features") or feature_names(cfg) or []
    table, problems = read_table(p, str(p), features)
    if table is None:
        raise ValueError("; ".join(f"{q.file}: {q.message}" for q in problems))
    src, names = cfg.source, list(cfg.labels.names)
    impute = cfg.preprocessing.missing != "refuse"
    passed = [c for c in table.columns if c not in {*features, src.label_column, src.split_column}]
    out = RowPredictions()
    kept: list[tuple[dict[str, Any], np.ndarray, int | None]] = []  # (output row, features (F,), label)
    for line, row in table.rows:
        where = f"{p} line {line}"
        try:
            x = np.array([float_cell(row[c], c, allow_missing=impute) for c in features], dtype=np.float32)
            cell = row.get(src.label_column, "") if src.label_column else ""
            label = class_index(cell, names) if cell else None
        except ValueError as exc:
            out.skipped.append((where, str(exc)))
            continue
        kept.append(({**{c: row.get(c, "") for c in passed}, "input": where, "site": site.name, "model": how}, x, label))
    if kept:
        features_in = torch.from_numpy(apply_feature_statistics(np.stack([k[1] for k in kept]), site.metadata))  # (N, F)
        with torch.no_grad():
            probs = torch.softmax(network(features_in).float(), dim=1)  # (N, classes)
        for i, ((row_out, _, label), p_row) in enumerate(zip(kept, probs, strict=True)):
            out.rows.append(scored_row(row_out, p_row, label, names))
            if on_row:
                on_row(i + 1, len(kept), row_out["input"])
    return out


def scored_row(row: dict[str, Any], probs: torch.Tensor, label: int | None, names: Sequence[str]) -> dict[str, Any]:
    """``row`` with the predicted class name, one probability per class (C,) and, when labelled, the truth.

    The columns of a classification row of ``predictions.csv``, for images and tabular rows alike.
    """
    predicted = int(probs.argmax())
    row = {**row, "predicted": names[predicted], **{f"p_{n}": round(float(v), 6) for n, v in zip(names, probs, strict=True)}}
    if label is not None:
        row.update({"label": names[label], "correct": int(label == predicted)})
    return row

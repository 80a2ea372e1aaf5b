"""The records of a site, listed from its source: one dict per image (or table row).

Each source kind turns the site's files into items ``{"id": str, "image": path |
[paths] | (F,) features, "label": class index | mask path}`` plus ``"split"`` when
a split column gives it. Nothing is loaded here but CSV and JSON files; every
record that cannot be used is left out and reported as a :class:`Problem`
(missing column, row pointing at a missing file, label outside the label map...).

===============  ==============================================================
kind             records
===============  ==============================================================
``images_csv``   one per CSV row: image path (relative to root), label, split
``tabular_csv``  one per CSV row: the feature columns as floats (in the order of
                 :func:`feature_names`; NaN for a missing cell when imputing), label, split
``nifti_folder`` one per ``.nii``/``.nii.gz`` in ``images``; masks ``labels/<id>.nii.gz``;
                 classification labels (and splits) from the CSV, matched by id
``dicom_series`` one per sub-folder of ``images`` (a series); masks and CSV as above
``msd_datalist`` one per entry of the MSD ``dataset.json`` section ``datalist_key``
===============  ==============================================================
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import load_decathlon_datalist

from fedfew_med.data.tables import Problem, class_index, float_cell, read_header, read_table, split_value
from fedfew_med.site_config import SiteConfig, inside_root

Item = dict[str, Any]
_NIFTI = (".nii.gz", ".nii")


@dataclass
class Listing:
    """The usable records of a site and the problems met while listing them."""

    items: list[Item] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def problem(self, file: str, message: str) -> None:
        """Record one problem."""
        self.problems.append(Problem(file, message))


def case_id(name: str) -> str:
    """A volume's or series' id: its file name without folder and image suffix."""
    base = Path(name.strip()).name
    for suffix in (*_NIFTI, ".dcm"):
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def _row_path(cfg: SiteConfig, csv_path: Path, value: str) -> Path | None:
    # relative to root, else to the CSV's folder; None when it leaves root ('..' or a symlink)
    return inside_root(cfg.paths.root, csv_path.parent, value, cfg.paths.links)


def _via_link(cfg: SiteConfig, value: str) -> str:
    """`` (through a symlink)`` when ``value`` is inside root by name but leaves it once resolved."""
    by_name = os.path.normpath(cfg.paths.root / value)
    return " (through a symlink)" if Path(by_name).is_relative_to(cfg.paths.root) else ""


def _escapes(cfg: SiteConfig, path: Path, out: Listing) -> bool:
    """Report ``path`` (a listed image, series slice or label) if it leaves the data root."""
    why = cfg.outside(path)
    if why is None and path.is_dir():  # a series folder: every slice must stay inside too
        why = next(
            (f"holds {p.name!r}, which {w}" for p in sorted(path.iterdir()) if (w := cfg.outside(p))), None
        )
    if why is not None:
        out.problem(cfg.display(path), f"{why}; refused")
    return why is not None


def _label_file(cfg: SiteConfig, ident: str) -> Path | None:
    assert cfg.paths.labels is not None
    for suffix in _NIFTI:
        candidate = cfg.paths.labels / f"{ident}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _images_csv(cfg: SiteConfig, out: Listing) -> None:
    src, csv_path = cfg.source, cfg.paths.csv
    assert csv_path is not None
    shown = cfg.display(csv_path)
    table, problems = read_table(csv_path, shown, [src.image_column, src.label_column, src.split_column])
    out.problems += problems
    for line, row in table.rows if table else []:
        where = f"line {line}"
        try:
            item: Item = {}
            for key, column in (("image", src.image_column), ("label", src.label_column)):
                if key == "label" and cfg.site.task != "segmentation":
                    item["label"] = class_index(row[column], cfg.labels.names)
                    continue
                if not row[column]:
                    raise ValueError(f"column {column!r} is empty")
                path = _row_path(cfg, csv_path, row[column])
                if path is None:
                    raise ValueError(f"{key} {row[column]!r} is outside root{_via_link(cfg, row[column])}")
                if path.is_dir():
                    raise ValueError(f"{key} {row[column]!r} is a folder, not a file")
                if not path.is_file():
                    raise ValueError(f"{key} {row[column]!r} does not exist")
                item[key] = str(path)
            if src.split_column:
                item["split"] = split_value(row[src.split_column])
        except ValueError as exc:
            out.problem(shown, f"{where}: {exc}")
            continue
        item["id"] = cfg.display(item["image"])
        out.items.append(item)


def _features(cfg: SiteConfig, columns: list[str]) -> list[str]:
    src = cfg.source
    return list(src.feature_columns) or [c for c in columns if c not in (src.label_column, src.split_column)]


def feature_names(cfg: SiteConfig) -> list[str] | None:
    """A tabular site's feature columns, in the order its feature vectors use.

    ``[source].feature_columns`` when given (a federation's sites may be given the common
    order this way, see :func:`fedfew_med.data.sites.load_sites`), else every CSV column but
    the label and split columns, in the CSV's order. ``None`` when the CSV header cannot be
    read (listing the records reports why).
    """
    if cfg.source.feature_columns:
        return list(cfg.source.feature_columns)
    if cfg.paths.csv is None:
        return None
    columns = read_header(cfg.paths.csv)
    return None if columns is None else _features(cfg, columns)


def _tabular_csv(cfg: SiteConfig, out: Listing) -> None:
    src, csv_path = cfg.source, cfg.paths.csv
    assert csv_path is not None
    shown = cfg.display(csv_path)
    required = [src.label_column, src.split_column, *src.feature_columns]
    table, problems = read_table(csv_path, shown, required)
    out.problems += problems
    if table is None:
        return
    features = _features(cfg, table.columns)
    if not features:
        out.problem(shown, "no feature columns (every column is the label or the split)")
        return
    used = {*features, src.label_column, src.split_column} - {""}
    repeated = sorted({c for c in table.columns if c in used and table.columns.count(c) > 1})
    if repeated:  # columns are matched by name: a repeated name would be a silent choice of one of them
        out.problem(
            shown,
            "column(s) " + ", ".join(repr(c) for c in repeated) + " appear more than once in the header",
        )
        return
    impute = cfg.preprocessing.missing != "refuse"
    for line, row in table.rows:
        try:
            item: Item = {
                "id": f"line {line}",
                "image": np.array(
                    [float_cell(row[c], c, allow_missing=impute) for c in features], dtype=np.float32
                ),
                "label": class_index(row[src.label_column], cfg.labels.names),
            }
            if src.split_column:
                item["split"] = split_value(row[src.split_column])
        except ValueError as exc:
            out.problem(shown, f"line {line}: {exc}")
            continue
        out.items.append(item)
    if impute and out.items:
        x = np.stack([i["image"] for i in out.items])  # (N, F)
        empty = [c for c, gone in zip(features, np.isnan(x).all(axis=0), strict=True) if gone]
        if empty:  # nothing to take a mean or median of
            names = ", ".join(repr(c) for c in empty)
            out.problem(
                shown,
                f"column(s) {names} have no value in any row, so [preprocessing].missing cannot impute them",
            )


def _csv_by_id(cfg: SiteConfig, out: Listing, known: set[str]) -> tuple[bool, dict[str, Item] | None]:
    """Per-image facts (label, split) from a folder source's CSV, keyed by case id.

    Returns ``(usable, facts)``: ``facts`` is ``None`` without a CSV; ``usable`` is false when
    the CSV cannot be read or lacks a column (already reported).
    """
    src, csv_path = cfg.source, cfg.paths.csv
    if csv_path is None:
        return True, None
    shown = cfg.display(csv_path)
    classify = cfg.site.task == "classification"
    required = [src.image_column, src.label_column if classify else "", src.split_column]
    table, problems = read_table(csv_path, shown, required)
    out.problems += problems
    if table is None:
        return False, None
    facts: dict[str, Item] = {}
    for line, row in table.rows:
        ident = case_id(row[src.image_column])
        try:
            if ident not in known:
                raise ValueError(
                    f"no image {row[src.image_column]!r} in {cfg.display(cfg.paths.images or '')}"
                )
            if ident in facts:
                raise ValueError(f"a second row for image {ident!r}")
            entry: Item = {}
            if classify:
                entry["label"] = class_index(row[src.label_column], cfg.labels.names)
            if src.split_column:
                entry["split"] = split_value(row[src.split_column])
        except ValueError as exc:
            out.problem(shown, f"line {line}: {exc}")
            continue
        facts[ident] = entry
    return True, facts


def _folder(cfg: SiteConfig, out: Listing, *, series: bool) -> None:
    images = cfg.paths.images
    assert images is not None
    entries = sorted(
        p for p in images.iterdir() if not p.name.startswith(".")
    )  # '._x' files: macOS debris in MSD tars
    if series:
        cases = {p.name: p for p in entries if p.is_dir()}
    else:
        cases = {case_id(p.name): p for p in entries if p.is_file() and p.name.lower().endswith(_NIFTI)}
    usable, facts = _csv_by_id(cfg, out, set(cases))
    if not usable:
        return
    segmentation = cfg.site.task == "segmentation"
    needs_row = cfg.site.task == "classification" or bool(cfg.source.split_column)
    for ident, path in cases.items():
        if _escapes(cfg, path, out):
            continue
        item: Item = {"id": ident, "image": str(path)}
        if facts is not None and ident in facts:
            item.update(facts[ident])
        elif facts is not None and needs_row:
            out.problem(cfg.display(path), f"has no valid row in {cfg.display(cfg.paths.csv or '')}")
            continue
        if segmentation:
            label = _label_file(cfg, ident)
            if label is None:
                out.problem(
                    cfg.display(path),
                    f"no label volume {ident}.nii.gz in {cfg.display(cfg.paths.labels or '')}",
                )
                continue
            if _escapes(cfg, label, out):
                continue
            item["label"] = str(label)
        out.items.append(item)
    if segmentation and cfg.paths.labels is not None:
        for label in sorted(cfg.paths.labels.iterdir()):
            if (
                label.name.lower().endswith(_NIFTI)
                and not label.name.startswith(".")
                and case_id(label.name) not in cases
            ):
                out.problem(
                    cfg.display(label), f"label volume has no matching image in {cfg.display(images)}"
                )


def _msd_datalist(cfg: SiteConfig, out: Listing) -> None:
    datalist = cfg.paths.datalist
    assert datalist is not None
    shown, key = cfg.display(datalist), cfg.source.datalist_key
    segmentation = cfg.site.task == "segmentation"
    try:
        entries = load_decathlon_datalist(datalist, is_segmentation=segmentation, data_list_key=key)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        out.problem(shown, f"cannot read section {key!r}: {exc}")
        return
    root = cfg.paths.root
    for number, entry in enumerate(entries, start=1):
        where = f"entry {number} of {key!r}"
        try:
            if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
                raise ValueError("must have an image and a label")
            item: Item = {}
            for field_name in ("image", "label") if segmentation else ("image",):
                values = entry[field_name] if isinstance(entry[field_name], list) else [entry[field_name]]
                paths = [inside_root(root, root, str(v), cfg.paths.links) for v in values]
                for value, path in zip(values, paths, strict=True):
                    if path is None:
                        raise ValueError(
                            f"{field_name} {str(value)!r} is outside root{_via_link(cfg, str(value))}"
                        )
                    if not path.exists():
                        raise ValueError(f"{field_name} {cfg.display(path)!r} does not exist")
                item[field_name] = [str(p) for p in paths] if len(paths) > 1 else str(paths[0])
            if not segmentation:
                item["label"] = class_index(entry["label"], cfg.labels.names)
        except ValueError as exc:
            out.problem(shown, f"{where}: {exc}")
            continue
        first = item["image"][0] if isinstance(item["image"], list) else item["image"]
        item["id"] = case_id(first)
        out.items.append(item)


_KINDS: dict[str, Callable[[SiteConfig, Listing], None]] = {
    "images_csv": _images_csv,
    "tabular_csv": _tabular_csv,
    "nifti_folder": lambda cfg, out: _folder(cfg, out, series=False),
    "dicom_series": lambda cfg, out: _folder(cfg, out, series=True),
    "msd_datalist": _msd_datalist,
}


def list_items(cfg: SiteConfig) -> Listing:
    """List the site's records from its source (see the module docstring); nothing raises for bad data."""
    out = Listing()
    _KINDS[cfg.source.kind](cfg, out)
    return out

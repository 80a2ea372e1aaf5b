"""Check a site before training on it: every record read once, every problem named by file.

:func:`validate_site` lists the records (see :mod:`fedfew_med.data.sources`), reads
each image (and mask) raw, before any augmentation, and reports

* unreadable or corrupt files, and files of an unknown format; NIfTI files holding less
  voxel data than their header declares (truncated, or a lying header);
* 4-D NIfTI images (several volumes along a 4th axis) unless ``[preprocessing].volume_4d``
  says how to read them;
* images whose dimensionality differs from ``[preprocessing].spatial_size``;
* NaN/Inf voxels, in images or masks, and value ranges too wide for float32;
* constant images (every voxel one value: a blank or failed export);
* images that ``[preprocessing].spacing`` would resample to more than
  :data:`~fedfew_med.site_config.MAX_VOXELS` voxels;
* files or series slices that leave the data root through a symlink;
* masks whose shape differs from their image's, with several channels, with
  non-integer values or with values outside the label map;
* masks whose affine (voxel-to-world mapping) differs from their image's beyond
  :data:`AFFINE_ORIGIN_TOL_MM` and :data:`AFFINE_AXIS_RTOL`, compared after the
  reorientation training applies (so a mask stored in another axis order but on the
  same grid is accepted, exactly when training would align it);
* channel counts that differ between images (unless ``[preprocessing].channels`` fixes them);
* missing CSV columns, CSV rows pointing at missing files, labels outside the label map,
  bad split values, non-numeric features (found while listing);
* an empty site, or an empty train split;

with a JSON-able summary: counts per split, class balance, shapes, spacings.
:func:`fedfew_med.data.sites.load_site` refuses a site with any problem.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from fedfew_med.data.readers import ReaderSet, RefusedVolume, read_image, spacing_of
from fedfew_med.data.sources import Item, Listing, feature_names, list_items
from fedfew_med.data.splits import SPLITS, split_by_column, stratified_split
from fedfew_med.data.tables import Problem
from fedfew_med.data.transforms import orientation
from fedfew_med.site_config import MAX_VOXELS, SiteConfig, load_site_config

__all__ = [
    "AFFINE_AXIS_RTOL",
    "AFFINE_ORIGIN_TOL_MM",
    "Problem",
    "ValidationReport",
    "inspect_site",
    "validate_config",
    "validate_site",
]

logger = logging.getLogger(__name__)
_FLOAT32_MAX = float(np.finfo(np.float32).max)

# How far a mask's affine may stray from its image's. Headers store affines in float32
# (about 1e-5 mm at 500 mm from the origin), so these only forgive storage rounding; a
# real misregistration (half a voxel, a flipped axis, another spacing) is far larger.
AFFINE_ORIGIN_TOL_MM = 1e-3  # world position of voxel 0, in mm
AFFINE_AXIS_RTOL = 1e-4  # each voxel axis (spacing x direction), relative to the image's voxel size


@dataclass(frozen=True)
class ValidationReport:
    """What :func:`validate_site` found. ``ok`` when there is no problem."""

    site: str
    file: str
    problems: list[Problem]
    summary: dict[str, Any]

    @property
    def ok(self) -> bool:
        """True when the site can be loaded."""
        return not self.problems

    def format(self) -> str:
        """Human-readable report: a headline, one line per problem (site and file first), a summary."""
        s = self.summary
        head = f"{self.site} ({self.file}): " + ("ok" if self.ok else f"{len(self.problems)} problem(s)")
        lines = [head, *(f"{self.site}: {p.file}: {p.message}" for p in self.problems)]
        splits = ", ".join(f"{k} {v}" for k, v in s.get("splits", {}).items())
        lines.append(f"{self.site}: {s.get('records', 0)} usable records ({splits}; {s.get('split_by', '')})")
        balance = s.get("class_balance", {}).get("all", {})
        if balance:
            what = "records containing each class" if s.get("task") == "segmentation" else "records per class"
            lines.append(f"{self.site}: {what}: " + ", ".join(f"{k} {v}" for k, v in balance.items()))
        for key in ("shape", "spacing"):
            if s.get(key):
                lines.append(f"{self.site}: {key} from {tuple(s[key]['min'])} to {tuple(s[key]['max'])}")
        return "\n".join(lines)


@dataclass
class Inspection:
    """A report plus what loading needs: the usable records of each split and the channel count."""

    report: ValidationReport
    splits: dict[str, list[Item]] = field(default_factory=dict)
    in_channels: int = 0


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    kind = type(exc)
    # built-in names alone (ValueError); others with their module (zlib.error, not a bare 'error')
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return f"{name}: {text[0] if text else ''}".rstrip(": ")


def _plain(img: torch.Tensor) -> torch.Tensor:
    return img.as_tensor() if isinstance(img, MetaTensor) else img


def _vector(v: np.ndarray) -> str:
    return "(" + ", ".join(f"{float(x):.4g}" for x in v) + ")"


def _grid_mismatch(label: torch.Tensor, image: torch.Tensor, ndim: int) -> str | None:
    """How ``label``'s voxel grid departs from ``image``'s beyond the tolerances, or ``None``.

    Both are read (and oriented) images; their affines map voxel indices to world mm.
    """
    if not (isinstance(label, MetaTensor) and isinstance(image, MetaTensor)):
        return None
    lab = np.asarray(label.affine, dtype=np.float64)
    img = np.asarray(image.affine, dtype=np.float64)
    rows = min(len(lab), len(img)) - 1  # world axes: 3, or 2 for a 2-D affine
    for axis in range(ndim):
        want, got = img[:rows, axis], lab[:rows, axis]  # one voxel step along this axis, in mm
        if np.linalg.norm(got - want) > AFFINE_AXIS_RTOL * np.linalg.norm(want):
            return f"voxel axis {axis} steps {_vector(got)} mm, the image's {_vector(want)} mm"
    shift = lab[:rows, -1] - img[:rows, -1]
    if np.linalg.norm(shift) > AFFINE_ORIGIN_TOL_MM:
        return f"its grid is shifted by {_vector(shift)} mm ({np.linalg.norm(shift):.4g} mm) from the image's"
    return None


def _check_label(
    cfg: SiteConfig, item: Item, image: torch.Tensor, readers: ReaderSet, out: list[Problem]
) -> dict[str, Any]:
    """Voxel counts per class of the record's mask, or its problems (added to ``out``).

    ``image`` is the record's image, read and oriented as training will see it.
    """
    shown = cfg.display(item["label"])
    spatial = tuple(image.shape[1:])
    try:
        # as channels whatever [preprocessing].volume_4d says: a 4th axis is then named below as
        # extra channels, which a mask never has
        label: torch.Tensor = read_image(item["label"], readers, volume_4d="channels")
    except Exception as exc:  # any reader failure means the file is unusable
        out.append(Problem(shown, f"cannot read: {_reason(exc)}"))
        return {}
    orient = orientation(cfg.preprocessing, len(spatial))
    if orient is not None and label.ndim - 1 == len(spatial):
        label = orient(label)
    if label.shape[0] != 1:
        out.append(
            Problem(shown, f"label has {label.shape[0]} channels, expected 1 (one map of class values)")
        )
    if tuple(label.shape[1:]) != spatial:
        out.append(Problem(shown, f"label shape {tuple(label.shape[1:])} differs from image shape {spatial}"))
        return {}
    mismatch = _grid_mismatch(label, image, len(spatial))
    if mismatch:
        codes = cfg.preprocessing.orientation.upper()[: len(spatial)]
        oriented = "" if orient is None else f" once both are reoriented to {codes}"
        message = (
            f"label affine (voxel-to-world) differs from its image's ({cfg.display(_first(item['image']))})"
            f"{oriented}: {mismatch}; they must agree within {AFFINE_ORIGIN_TOL_MM:g} mm in origin and "
            f"{AFFINE_AXIS_RTOL:g} of the voxel size along each axis (spacing and direction)"
        )
        out.append(Problem(shown, message))
        return {}
    values = _plain(label)
    if not torch.isfinite(values).all():
        out.append(Problem(shown, f"label has {int((~torch.isfinite(values)).sum())} NaN/Inf voxels"))
        return {}
    if not torch.equal(values, values.round()):
        out.append(Problem(shown, "label has non-integer values (a mask must hold class indices)"))
        return {}
    present = [int(v) for v in torch.unique(values)]
    bad = [v for v in present if not 0 <= v < cfg.num_classes]
    if bad:
        names = ", ".join(cfg.labels.names)
        out.append(
            Problem(
                shown, f"label values {bad[:8]} are outside the label map 0..{cfg.num_classes - 1} ({names})"
            )
        )
        return {}
    counts = torch.bincount(values.long().flatten(), minlength=cfg.num_classes)
    return {"voxels": counts.tolist()}


def _check_item(cfg: SiteConfig, item: Item, readers: ReaderSet) -> tuple[dict[str, Any], list[Problem]]:
    """Facts (shape, spacing, channels, mask voxel counts) about one record, or its problems."""
    out: list[Problem] = []
    shown = cfg.display(_first(item["image"]))
    ndim = len(cfg.preprocessing.spatial_size)
    try:
        img: torch.Tensor = read_image(item["image"], readers, volume_4d=cfg.preprocessing.volume_4d)
    except RefusedVolume as exc:  # readable, but not as this site file says to read it
        return {}, [Problem(shown, str(exc))]
    except Exception as exc:  # any reader failure means the file is unusable
        return {}, [Problem(shown, f"cannot read: {_reason(exc)}")]
    if img.ndim - 1 != ndim:
        shape = tuple(img.shape[1:])
        message = f"image has {img.ndim - 1} spatial dimensions {shape}, but [preprocessing].spatial_size has {ndim}"
        return {}, [Problem(shown, message)]
    values = _plain(img)
    nan, inf = int(torch.isnan(values).sum()), int(torch.isinf(values).sum())
    if nan or inf:
        out.append(Problem(shown, f"image has {nan} NaN and {inf} Inf voxels"))
    elif values.numel() and float(values.max()) - float(values.min()) > _FLOAT32_MAX:
        low, high = float(values.min()), float(values.max())
        out.append(Problem(shown, f"image values from {low:.4g} to {high:.4g} overflow float32 when scaled"))
    elif values.numel() and float(values.max()) == float(values.min()):
        value = float(values.min())
        out.append(
            Problem(
                shown,
                f"image is constant: all {values.numel()} voxels are {value:g} (a blank or failed export?); "
                "it holds nothing to learn from",
            )
        )
    channels, wanted = int(img.shape[0]), cfg.preprocessing.channels
    if wanted == 3 and channels not in (1, 3):
        out.append(Problem(shown, f"cannot make {wanted} channels from {channels}"))
    orient = orientation(cfg.preprocessing, ndim)
    if orient is not None:
        img = orient(img)
    facts: dict[str, Any] = {"shape": tuple(img.shape[1:]), "spacing": spacing_of(img), "channels": channels}
    resampled = _resampled_voxels(cfg, facts["shape"], facts["spacing"])
    if cfg.preprocessing.spacing and resampled > MAX_VOXELS:
        message = (
            f"resampling to [preprocessing].spacing {list(cfg.preprocessing.spacing)} would give "
            f"{resampled:.3g} voxels (at most {MAX_VOXELS}); use a coarser spacing"
        )
        out.append(Problem(shown, message))
    if cfg.site.task == "segmentation":
        facts.update(_check_label(cfg, item, img, readers, out))
    return facts, out


def check_image(cfg: SiteConfig, image: str | list[str], readers: ReaderSet | None = None) -> list[Problem]:
    """What ``validate-site`` would say of one image alone (no label): for images a site predicts on."""
    image_only = dataclasses.replace(cfg, site=dataclasses.replace(cfg.site, task="classification"))
    return _check_item(image_only, {"image": image}, readers or ReaderSet())[1]


def _resampled_voxels(cfg: SiteConfig, shape: tuple[int, ...], spacing: tuple[float, ...]) -> float:
    """Voxels of the image after ``[preprocessing].spacing`` (its own count without resampling)."""
    target = cfg.preprocessing.spacing
    if not target or len(target) != len(shape):
        return float(math.prod(shape))
    return math.prod(n * s / t for n, s, t in zip(shape, spacing, target, strict=True))


def _channel_problems(
    cfg: SiteConfig, checked: list[tuple[Item, dict[str, Any]]]
) -> tuple[int, list[Problem]]:
    counts = Counter(f["channels"] for _, f in checked)
    if not counts:
        return max(cfg.preprocessing.channels, 1), []
    common = counts.most_common(1)[0][0]
    if cfg.preprocessing.channels:
        return cfg.preprocessing.channels, []
    message = "image has {} channel(s), most images have {}; set [preprocessing].channels to 1 or 3"
    if cfg.preprocessing.volume_4d == "channels":  # averaging a series' volumes is rarely what is meant
        message += " (4-D images: give each the same number of volumes, or set volume_4d = 'first')"
    odd = [
        Problem(cfg.display(_first(item["image"])), message.format(f["channels"], common))
        for item, f in checked
        if f["channels"] != common
    ]
    return common, odd


def _first(image: str | list[str]) -> str:
    return image[0] if isinstance(image, list) else image


def _split(cfg: SiteConfig, items: list[Item]) -> tuple[dict[str, list[Item]], str]:
    """Records per split, and how they were split (for the summary)."""
    sp = cfg.split
    labels = None if cfg.site.task == "segmentation" else [int(i["label"]) for i in items]
    kind = "random" if labels is None else "stratified"
    if not (cfg.source.split_column and items and all("split" in i for i in items)):
        index = stratified_split(
            labels, n=len(items), seed=sp.seed, val_fraction=sp.val_fraction, test_fraction=sp.test_fraction
        )
        how = f"{kind}, seed {sp.seed}"
    else:
        index = split_by_column([i["split"] for i in items])
        how = f"column {cfg.source.split_column!r}"
        train = index["train"]
        if not index["val"] and sp.val_fraction > 0 and train:  # no val rows: carve val from the train rows
            sub = stratified_split(
                None if labels is None else [labels[i] for i in train],
                n=len(train),
                seed=sp.seed,
                val_fraction=sp.val_fraction,
                test_fraction=0.0,
            )
            index = {
                "train": [train[i] for i in sub["train"]],
                "val": [train[i] for i in sub["val"]],
                "test": index["test"],
            }
            how += f"; val {kind} from its train rows, seed {sp.seed}"
    return {s: [items[i] for i in index[s]] for s in SPLITS}, how


def _range(rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    """Per-axis minimum and maximum of shapes or spacings, and how many distinct ones there are."""
    if not rows:
        return {}
    arr = np.array(rows)
    return {"min": arr.min(axis=0).tolist(), "max": arr.max(axis=0).tolist(), "distinct": len(set(rows))}


def inspect_site(cfg: SiteConfig) -> Inspection:
    """Validate ``cfg``'s data; return the report, the split records and the channel count."""
    try:
        listing = list_items(cfg)
    except OSError as exc:  # a folder that cannot be listed (permissions, a vanished mount)
        listing = Listing(
            problems=[Problem(cfg.display(exc.filename or cfg.paths.root), f"cannot list: {_reason(exc)}")]
        )
    problems = list(listing.problems)
    readers = ReaderSet()
    facts: dict[int, dict[str, Any]] = {}
    if cfg.site.task == "tabular":
        facts = {id(i): {"channels": int(i["image"].shape[0])} for i in listing.items}
    else:
        logger.info("site %s: reading %d records to validate them", cfg.site.name, len(listing.items))
        for item in listing.items:
            found, item_problems = _check_item(cfg, item, readers)
            problems += item_problems
            if not item_problems:
                facts[id(item)] = found
    usable = [i for i in listing.items if id(i) in facts]
    checked = [(i, facts[id(i)]) for i in usable]
    if cfg.site.task == "tabular":
        in_channels = checked[0][1]["channels"] if checked else 0  # the feature count
    else:
        in_channels, odd = _channel_problems(cfg, checked)
        problems += odd
    if not listing.items:
        problems.append(
            Problem(cfg.file, f"the site is empty: its {cfg.source.kind!r} source lists no records")
        )
    splits, how = _split(cfg, usable)
    if usable and not splits["train"]:
        problems.append(Problem(cfg.file, "the train split is empty"))
    problems += _train_values_problems(cfg, splits)
    summary = _summary(cfg, splits, checked, how, in_channels)
    report = ValidationReport(site=cfg.site.name, file=cfg.file, problems=problems, summary=summary)
    return Inspection(report=report, splits=splits, in_channels=in_channels)


def _train_values_problems(cfg: SiteConfig, splits: dict[str, list[Item]]) -> list[Problem]:
    """The feature columns imputation cannot fill: those with values in val or test rows only.

    Imputation learns from the train split alone, so such a column is refused (a column empty
    everywhere is already reported by the listing).
    """
    train = splits.get("train", [])
    if cfg.site.task != "tabular" or cfg.preprocessing.missing == "refuse" or not train:
        return []
    everywhere = np.stack([i["image"] for s in splits.values() for i in s])  # (N, F)
    in_train = np.stack([i["image"] for i in train])  # (N_train, F)
    gone = np.isnan(in_train).all(axis=0) & ~np.isnan(everywhere).all(axis=0)
    if not gone.any():
        return []
    names = feature_names(cfg) or []
    columns = ", ".join(repr(names[j]) if j < len(names) else f"#{j}" for j in np.flatnonzero(gone))
    shown = cfg.display(cfg.paths.csv) if cfg.paths.csv is not None else cfg.file
    return [Problem(
        shown,
        f"column(s) {columns} have no value in the train split, so [preprocessing].missing cannot impute "
        "them (imputation learns from the train split only, never from val or test rows)",
    )]


def _summary(
    cfg: SiteConfig,
    splits: dict[str, list[Item]],
    checked: list[tuple[Item, dict[str, Any]]],
    how: str,
    in_channels: int,
) -> dict[str, Any]:
    names = cfg.labels.names
    by_item = {id(i): f for i, f in checked}
    balance: dict[str, dict[str, int]] = {}
    for split, items in [("all", [i for i, _ in checked]), *splits.items()]:
        if cfg.site.task == "segmentation":  # records in which each class appears
            present = [by_item[id(i)].get("voxels", [0] * len(names)) for i in items]
            balance[split] = {n: sum(1 for v in present if v[c] > 0) for c, n in enumerate(names)}
        else:
            counts = Counter(int(i["label"]) for i in items)
            balance[split] = {n: counts.get(c, 0) for c, n in enumerate(names)}
    summary: dict[str, Any] = {
        "site": cfg.site.name,
        "file": cfg.file,
        "task": cfg.site.task,
        "source": cfg.source.kind,
        "records": len(checked),
        "splits": {s: len(v) for s, v in splits.items()},
        "split_by": how,
        "split_seed": cfg.split.seed,
        "classes": list(names),
        "class_balance": balance,
        "in_channels": in_channels,
    }
    if cfg.site.task != "tabular":
        summary["shape"] = _range([f["shape"] for _, f in checked])
        summary["spacing"] = _range([f["spacing"] for _, f in checked])
    if cfg.site.task == "segmentation":
        voxels = (
            np.sum([f.get("voxels", [0] * len(names)) for _, f in checked], axis=0)
            if checked
            else np.zeros(len(names))
        )
        total = max(float(np.sum(voxels)), 1.0)
        summary["voxel_share"] = {n: round(float(v) / total, 6) for n, v in zip(names, voxels, strict=True)}
    return summary


def validate_config(cfg: SiteConfig) -> ValidationReport:
    """Validate an already loaded site config (see the module docstring)."""
    return inspect_site(cfg).report


def validate_site(path: str | Path) -> ValidationReport:
    """Load the site file at ``path`` and validate its data.

    Raises
    ------
    ConfigError
        When the site file itself is invalid (the data is then not looked at).
    """
    return validate_config(load_site_config(path))

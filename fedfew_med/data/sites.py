"""Real sites: a site file in, a validated, split, ready-to-load :class:`SiteData` out.

``load_site`` = site config -> records -> validation (refused on any problem) ->
split (seeded and stratified, or by the split column) -> datasets. Image splits
are MONAI ``CacheDataset``s of the deterministic prefix (``cache = "memory"``,
one thread: sites are loaded one after another on small machines) with the
random transforms applied on access; patch sampling wraps them in
:mod:`fedfew_med.data.patches`. Tabular splits are in-memory tensors scaled with
train-split statistics.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset
from monai.data import Dataset as MonaiDataset
from torch.utils.data import Dataset

from fedfew_med.config import ConfigError
from fedfew_med.data.base import SiteData
from fedfew_med.data.patches import GridPatches, RandomPatches
from fedfew_med.data.readers import ReaderSet
from fedfew_med.data.sources import Item
from fedfew_med.data.synthetic import TensorDictDataset
from fedfew_med.data.transforms import augmentation_seed, build_pipeline, scale_features
from fedfew_med.data.validate import Inspection, ValidationReport, inspect_site
from fedfew_med.site_config import SiteConfig, SiteConfigError, load_site_config

logger = logging.getLogger(__name__)


class SiteValidationError(ConfigError):
    """Sites failed validation; the message lists every problem, as ``validate-site`` prints them.

    ``reports`` are the sites whose data has problems, ``config_errors`` the site files that
    could not be loaded at all. ``headline`` (a federation's) comes first when given.
    """

    def __init__(
        self,
        reports: Sequence[ValidationReport],
        config_errors: Sequence[SiteConfigError] = (),
        *,
        headline: str = "",
    ) -> None:
        self.reports = list(reports)
        self.config_errors = list(config_errors)
        lines = [headline] if headline else []
        lines += [str(e) for e in self.config_errors] + [r.format() for r in self.reports]
        super().__init__("\n".join(lines))

    @property
    def sites(self) -> list[str]:
        """Every failing site, by name (or by file where the name could not be read)."""
        return [e.site or e.file for e in self.config_errors] + [r.site for r in self.reports]


def _tabular_splits(
    cfg: SiteConfig, splits: dict[str, list[Item]]
) -> tuple[dict[str, Dataset[Any]], dict[str, Any]]:
    def stack(items: list[Item]) -> tuple[np.ndarray, np.ndarray]:
        width = len(splits["train"][0]["image"])
        x = np.stack([i["image"] for i in items]) if items else np.zeros((0, width), np.float32)
        return x.astype(np.float32), np.array([i["label"] for i in items], dtype=np.int64)

    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (
        stack(splits[s]) for s in ("train", "val", "test")
    )
    x_train, (x_val, x_test), stats = scale_features(x_train, [x_val, x_test], cfg.preprocessing.intensity)
    datasets: dict[str, Dataset[Any]] = {
        name: TensorDictDataset(torch.from_numpy(x), torch.from_numpy(y))
        for name, x, y in (("train", x_train, y_train), ("val", x_val, y_val), ("test", x_test, y_test))
    }
    return datasets, {"feature_scaling": cfg.preprocessing.intensity, **stats}


def _image_splits(
    cfg: SiteConfig, splits: dict[str, list[Item]]
) -> tuple[dict[str, Dataset[Any]], dict[str, Any]]:
    pre = cfg.preprocessing
    readers = ReaderSet()
    datasets: dict[str, Dataset[Any]] = {}
    for name, items in splits.items():
        train = name == "train"
        pipeline = build_pipeline(cfg, train=train, readers=readers)
        records = [{"image": i["image"], "label": i["label"]} for i in items]
        base: Dataset[Any]
        if pre.cache == "memory":
            base = CacheDataset(records, pipeline, cache_rate=1.0, num_workers=0, progress=False)
        else:
            base = MonaiDataset(records, pipeline)
        if pre.patches_per_image and train:
            base = RandomPatches(base, pre.patches_per_image)
        elif pre.patches_per_image:
            base = GridPatches(base, pre.spatial_size, segmentation=cfg.site.task == "segmentation")
        datasets[name] = base
    extra = {
        "spatial_size": list(pre.spatial_size),
        "patches_per_image": pre.patches_per_image,
        "eval_patches": "grid" if pre.patches_per_image else "none",
        "augment": pre.augment,
        "augmentation_seed": augmentation_seed(cfg.split.seed)
        if pre.augment or pre.patches_per_image
        else None,
    }
    return datasets, extra


def build_site(cfg: SiteConfig, inspection: Inspection) -> SiteData:
    """The :class:`SiteData` of a validated site (``inspection.report.ok`` must hold)."""
    if not inspection.report.ok:
        raise SiteValidationError([inspection.report])
    summary = inspection.report.summary
    if cfg.site.task == "tabular":
        datasets, extra = _tabular_splits(cfg, inspection.splits)
        spatial_dims = 0
    else:
        datasets, extra = _image_splits(cfg, inspection.splits)
        spatial_dims = len(cfg.preprocessing.spatial_size)
    metadata: dict[str, Any] = {
        "source": cfg.source.kind,
        "site_file": cfg.file,
        "counts": {name: len(d) for name, d in datasets.items()},  # type: ignore[arg-type]
        "records": summary["splits"],
        "split_by": summary["split_by"],
        "split_seed": cfg.split.seed,
        "classes": list(cfg.labels.names),
        "class_balance": summary["class_balance"],
        **{k: summary[k] for k in ("shape", "spacing", "voxel_share") if k in summary},
        **extra,
        **(
            {"privacy": dict(cfg.privacy)} if cfg.privacy else {}
        ),  # the site's own [privacy] table (fedfew_med.dp reads it)
    }
    logger.info("site %s: %s records %s", cfg.site.name, cfg.source.kind, summary["splits"])
    return SiteData(
        name=cfg.site.name,
        task=cfg.site.task,
        splits=datasets,
        in_channels=inspection.in_channels,
        num_classes=cfg.num_classes,
        spatial_dims=spatial_dims,
        metadata=metadata,
    )


def load_site(path: str | Path) -> SiteData:
    """Load one site from its site file.

    Raises
    ------
    ConfigError
        When the site file is invalid.
    SiteValidationError
        When the data has any problem :func:`~fedfew_med.data.validate.validate_site` reports.
    """
    cfg = load_site_config(path)
    return build_site(cfg, inspect_site(cfg))


def _agree(what: str, values: list[Any], files: list[str]) -> None:
    for value, file in zip(values[1:], files[1:], strict=True):
        if value != values[0]:
            raise ConfigError(
                f"{file}: {what} must be the same at every site ({values[0]!r} in {files[0]}), got {value!r}"
            )


def _check_federation(configs: list[SiteConfig], files: list[str]) -> None:
    """Sites of one federation differ in name and share task, label map and dimensions."""
    names: dict[str, str] = {}
    for cfg, file in zip(configs, files, strict=True):
        if cfg.site.name in names:
            raise ConfigError(
                f"{file}: [site].name must differ between sites, got {cfg.site.name!r} (also in {names[cfg.site.name]})"
            )
        names[cfg.site.name] = file
    _agree("[site].task", [c.site.task for c in configs], files)
    _agree("[labels].names", [list(c.labels.names) for c in configs], files)
    _agree("len([preprocessing].spatial_size)", [len(c.preprocessing.spatial_size) for c in configs], files)


def load_sites(files: Sequence[str], base_dir: Path) -> list[SiteData]:
    """Load a federation's sites; relative paths are taken from ``base_dir`` (the federation file's folder).

    Every site is validated before any error is raised, so one run lists every site's problems:
    the federation refuses to start (nothing trained, nothing written) while any site is bad,
    rather than silently running without it.

    Raises
    ------
    ConfigError
        When the sites disagree on task, label map, channels or dimensions.
    SiteValidationError
        When any site file is invalid or any site's data has problems; its message starts with
        a line naming every failing site, then each site's problems.
    """
    if not files:
        raise ConfigError("the federation must list at least one site file, got none")
    paths = [Path(f) if Path(f).is_absolute() else Path(base_dir) / f for f in files]
    configs: list[SiteConfig] = []
    config_errors: list[SiteConfigError] = []
    for p in paths:
        try:
            configs.append(load_site_config(p))
        except SiteConfigError as exc:
            config_errors.append(exc)
    if not config_errors:
        _check_federation(configs, [str(p) for p in paths])  # before any image is read
    inspections = [inspect_site(cfg) for cfg in configs]
    failed = [i.report for i in inspections if not i.report.ok]
    if failed or config_errors:
        bad = [f"{e.site} ({e.file})" if e.site else e.file for e in config_errors]
        bad += [f"{r.site} ({r.file})" for r in failed]
        headline = (
            f"{len(bad)} of {len(paths)} sites failed validation, so the federation does not start "
            f"(nothing was trained): {', '.join(bad)}"
        )
        raise SiteValidationError(failed, config_errors, headline=headline)
    _agree(
        "the number of input channels (features)",
        [i.in_channels for i in inspections],
        [str(p) for p in paths],
    )
    return [build_site(cfg, i) for cfg, i in zip(configs, inspections, strict=True)]

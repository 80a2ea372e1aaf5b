"""Real sites: a site file in, a validated, split, ready-to-load :class:`SiteData` out.

``load_site`` = site config -> records -> validation (refused on any problem) ->
split (seeded and stratified, or by the split column) -> datasets. Image splits
are MONAI ``CacheDataset``s of the deterministic prefix (``cache = "memory"``,
one thread: sites are loaded one after another on small machines) with the
random transforms applied on access; patch sampling wraps them in
:mod:`fedfew_med.data.patches`. Tabular splits are in-memory tensors, with missing
cells imputed (``[preprocessing].missing``) and features scaled, both with
train-split statistics only.

Tables are matched by column name, never by position: a federation's tabular sites
(:func:`load_sites`) must have the same feature columns, and every site's feature
vectors follow one common order, the first site's (its ``[source].feature_columns``,
or its CSV's order). A site whose CSV lists the columns in another order is
reordered to it; a missing or extra column stops the federation, naming the site,
its CSV file and the columns. A site loaded alone (a Flower SuperNode) records its
order in ``metadata["features"]``, which the coordinator compares across sites.
"""

from __future__ import annotations

import dataclasses
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
from fedfew_med.data.base import Progress, SiteData
from fedfew_med.data.patches import GridPatches, RandomPatches
from fedfew_med.data.readers import ReaderSet
from fedfew_med.data.sources import Item, feature_names
from fedfew_med.data.synthetic import TensorDictDataset
from fedfew_med.data.tables import feature_mismatch
from fedfew_med.data.transforms import augmentation_seed, build_pipeline, impute_features, scale_features
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
    pre = cfg.preprocessing
    extra: dict[str, Any] = {"features": feature_names(cfg) or []}
    if pre.missing != "refuse":  # before scaling: the scaling statistics must not see NaN
        x_train, (x_val, x_test), filled = impute_features(x_train, [x_val, x_test], pre.missing)
        extra.update(missing=pre.missing, imputed_with=filled)
    x_train, (x_val, x_test), stats = scale_features(x_train, [x_val, x_test], pre.intensity)
    datasets: dict[str, Dataset[Any]] = {
        name: TensorDictDataset(torch.from_numpy(x), torch.from_numpy(y))
        for name, x, y in (("train", x_train, y_train), ("val", x_val, y_val), ("test", x_test, y_test))
    }
    return datasets, {"feature_scaling": pre.intensity, **stats, **extra}


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


def load_site(path: str | Path, *, feature_order: Sequence[str] | None = None) -> SiteData:
    """Load one site from its site file.

    ``feature_order`` (a tabular site joining a trained federation): the federation's feature
    columns; the site's are matched to them by name (:func:`in_feature_order`).

    Raises
    ------
    ConfigError
        When the site file is invalid, or its feature columns are not ``feature_order``'s.
    SiteValidationError
        When the data has any problem :func:`~fedfew_med.data.validate.validate_site` reports.
    """
    cfg = load_site_config(path)
    if feature_order is not None and cfg.site.task == "tabular":
        why = feature_order_problem(cfg, feature_order)
        if why is not None:
            raise ConfigError(f"{path}: {why}; the federation's features are {', '.join(repr(c) for c in feature_order)} "
                              "(matched by name; list the shared ones in [source].feature_columns)")
        cfg = in_feature_order(cfg, feature_order)
    return build_site(cfg, inspect_site(cfg))


def feature_order_problem(cfg: SiteConfig, order: Sequence[str]) -> str | None:
    """How a tabular site's feature columns differ from ``order`` as a set (``None``: the same names)."""
    why = feature_mismatch(sorted(feature_names(cfg) or []), sorted(order))
    if why is None:
        return None
    return f"{cfg.display(cfg.paths.csv) if cfg.paths.csv is not None else '?'} {why}"


def in_feature_order(cfg: SiteConfig, order: Sequence[str]) -> SiteConfig:
    """``cfg`` reading its features in ``order`` (its columns must be those names): unchanged when it already does."""
    if (feature_names(cfg) or []) == list(order):
        return cfg  # its features, and every result computed from them, stay as they were
    return dataclasses.replace(cfg, source=dataclasses.replace(cfg.source, feature_columns=tuple(order)))


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


def _align_features(
    configs: list[SiteConfig], inspections: list[Inspection], files: list[str]
) -> tuple[list[SiteConfig], list[Inspection]]:
    """Tabular sites, validated: each given the federation's feature order, by column name.

    The first site's order (:func:`~fedfew_med.data.sources.feature_names`) is the
    federation's; a site with the same columns in another order gets that order as its
    ``[source].feature_columns`` and is listed again; sites already in that order are returned
    unchanged (so their features, and every result computed from them, stay as they were).

    Raises
    ------
    ConfigError
        When a site lacks a column of the first site or has one more, naming every such site,
        its CSV file and the columns.
    """
    if not configs or configs[0].site.task != "tabular":
        return configs, inspections
    names = [feature_names(cfg) or [] for cfg in configs]  # validated: every header was readable
    order = names[0]
    wrong = []
    for cfg, file in zip(configs[1:], files[1:], strict=True):
        why = feature_order_problem(cfg, order)
        if why is not None:
            wrong.append(f"{cfg.site.name} ({file}): {why}")
    if wrong:
        first = configs[0]
        raise ConfigError(
            "the feature columns must be the same at every tabular site of a federation (they are matched "
            f"by name; {first.site.name} ({files[0]}) has {', '.join(repr(c) for c in order)}), but\n"
            + "\n".join(wrong)
            + "\nrename or drop those columns, or list the shared ones in each site's [source].feature_columns"
        )
    out_configs, out_inspections = [], []
    for cfg, inspection, have in zip(configs, inspections, names, strict=True):
        if have != order:
            logger.info(
                "site %s: features reordered by name to the federation's order %s", cfg.site.name, order
            )
            cfg = in_feature_order(cfg, order)
            inspection = inspect_site(cfg)  # the same rows, columns by name
            if not inspection.report.ok:  # the same cells in another order: cannot fail where it passed
                raise SiteValidationError([inspection.report])
        out_configs.append(cfg)
        out_inspections.append(inspection)
    return out_configs, out_inspections


def load_sites(files: Sequence[str], base_dir: Path, progress: Progress | None = None) -> list[SiteData]:
    """Load a federation's sites; relative paths are taken from ``base_dir`` (the federation file's folder).

    ``progress`` is called with a message, the steps done and the steps in all (two per site:
    its files checked, then preprocessed), for a progress bar over what can take a minute.

    Every site is validated before any error is raised, so one run lists every site's problems:
    the federation refuses to start (nothing trained, nothing written) while any site is bad,
    rather than silently running without it.

    Raises
    ------
    ConfigError
        When the sites disagree on task, label map, channels or dimensions, or (tabular) when a
        site lacks a feature column of the first site or has an extra one (see :func:`_align_features`).
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
    steps = 2 * len(configs)
    inspections = []
    for i, cfg in enumerate(configs):
        inspections.append(inspect_site(cfg))
        if progress:
            progress(f"{cfg.site.name}: files checked", i + 1, steps)
    failed = [i.report for i in inspections if not i.report.ok]
    if failed or config_errors:
        bad = [f"{e.site} ({e.file})" if e.site else e.file for e in config_errors]
        bad += [f"{r.site} ({r.file})" for r in failed]
        headline = (
            f"{len(bad)} of {len(paths)} sites failed validation, so the federation does not start "
            f"(nothing was trained): {', '.join(bad)}"
        )
        raise SiteValidationError(failed, config_errors, headline=headline)
    # after each site's own validation, so that a site's missing label or feature column is reported
    # as that site's problem, not as a federation that disagrees
    configs, inspections = _align_features(configs, inspections, [str(p) for p in paths])
    _agree(
        "the number of input channels (features)",
        [i.in_channels for i in inspections],
        [str(p) for p in paths],
    )
    built = []
    for cfg, inspection in zip(configs, inspections, strict=True):
        built.append(build_site(cfg, inspection))
        if progress:
            progress(f"{cfg.site.name}: preprocessed", len(configs) + len(built), steps)
    return built

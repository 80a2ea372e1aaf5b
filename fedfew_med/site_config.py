"""One site's data description: a TOML file loaded into frozen dataclasses.

Layer 0: standard library only. A site file says where the site's images and
labels are, what the labels mean, how to preprocess and how to split::

    [site]           name, task (classification | segmentation | tabular)
    [source]         kind (nifti_folder | dicom_series | images_csv | msd_datalist | tabular_csv),
                     root, csv, image_column, label_column, split_column, feature_columns,
                     images, labels, datalist, datalist_key, links
    [labels]         names (value i means names[i]; at least two)
    [preprocessing]  spatial_size, spacing, orientation, intensity, a_min, a_max,
                     crop_foreground, patches_per_image, augment, cache, channels,
                     volume_4d (refuse | channels | first),
                     missing (tabular: refuse | mean | median)
    [split]          seed, val_fraction, test_fraction (with a split column: val carved from
                     its train rows when it marks none as val)
    [privacy]        any table; validated by the DP module

``root`` is the site's data root, relative to the site file's folder. Every
other path (keys of ``[source]``, CSV rows, datalist entries, the files found in
``images`` and ``labels``) is relative to ``root`` (a path written relative to the
site file's folder is accepted too) and must stay inside ``root`` once ``..`` and
symbolic links are resolved: ``../../etc/passwd``, an absolute path elsewhere and a
symlink pointing out of ``root`` are all refused. Data kept elsewhere and linked
into ``root`` is allowed only where ``[source].links`` lists the folder the links
point into (absolute, or relative to the site file's folder).

Numbers have upper bounds (:data:`MAX_AXIS`, :data:`MAX_VOXELS`,
:data:`MAX_PATCHES`, :data:`MAX_SEED`...) so that a typing slip (``spatial_size =
[100000, 100000]``) is refused at load time instead of exhausting memory later.
Every error is a :class:`ConfigError` naming the site (when ``[site].name`` is
readable), file, key, expectation and value, e.g.::

    site0: site0.toml: [source].csv must name an existing file inside root, got 'x.csv'
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedfew_med.config import ConfigError, build_dataclass, did_you_mean, read_toml, require

SourceKind = Literal["nifti_folder", "dicom_series", "images_csv", "msd_datalist", "tabular_csv"]
SiteTask = Literal["classification", "segmentation", "tabular"]
Volume4D = Literal["refuse", "channels", "first"]  # how an image with a 4th axis (X, Y, Z, T) is read
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_AXES = ("LR", "AP", "SI")

MAX_NAME = 64  # site names end up in file names, checkpoints and every log line
MAX_AXIS = 4096  # voxels along one axis of spatial_size
MAX_VOXELS = 512**3  # voxels of one resized image or patch (512 MiB as float32)
MAX_SPACING = 1000.0  # millimetres per voxel
MIN_SPACING = 1e-3  # a micrometre: finer than any scanner this toolkit reads
MAX_INTENSITY = 1e30  # |a_min|, |a_max|: far beyond any stored intensity
MAX_PATCHES = 1000  # patches per image and epoch
MAX_SEED = 2**32 - 1
MAX_CLASSES = 1000


class SiteConfigError(ConfigError):
    """A site file is invalid. ``site`` is its ``[site].name`` when readable, ``file`` the file as given."""

    def __init__(self, message: str, *, site: str | None, file: str) -> None:
        super().__init__(message)
        self.site = site
        self.file = file


@dataclass(frozen=True)
class SiteSection:
    """``[site]``: who the site is and what it learns."""

    name: str
    task: SiteTask

    def __post_init__(self) -> None:
        require(
            bool(_NAME.fullmatch(self.name)), "name", "use only letters, digits, '-', '_' and '.'", self.name
        )
        require(len(self.name) <= MAX_NAME, "name", f"have at most {MAX_NAME} characters", self.name)


@dataclass(frozen=True)
class SourceSection:
    """``[source]``: where the records are. Keys that do not apply to ``kind`` are ignored."""

    kind: SourceKind
    root: str = "."
    csv: str = ""  # images_csv / tabular_csv; per-image labels (and splits) for nifti_folder / dicom_series
    image_column: str = (
        "image"  # images_csv: path relative to root; folders: the volume's file or series name
    )
    label_column: str = "label"  # integer class, a name from [labels].names, or (segmentation) a mask path
    split_column: str = ""  # values train / val / test; "" = use [split]
    feature_columns: tuple[str, ...] = ()  # tabular_csv: () = every column except label/split
    images: str = "imagesTr"  # nifti_folder: volumes; dicom_series: one sub-folder per series
    labels: str = "labelsTr"  # segmentation label volumes named <id>.nii.gz (or .nii)
    datalist: str = "dataset.json"  # msd_datalist
    datalist_key: str = "training"
    links: tuple[str, ...] = ()  # folders outside root that symlinks inside root may point into


@dataclass(frozen=True)
class LabelsSection:
    """``[labels]``: the label map; value ``i`` means ``names[i]`` (segmentation: 0 is background)."""

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        require(len(self.names) >= 2, "names", "list at least two class names", list(self.names))
        require(
            len(self.names) <= MAX_CLASSES, "names", f"list at most {MAX_CLASSES} classes", len(self.names)
        )
        require(len(set(self.names)) == len(self.names), "names", "not repeat a name", list(self.names))
        require(all(n.strip() for n in self.names), "names", "not contain empty names", list(self.names))


@dataclass(frozen=True)
class PreprocessingSection:
    """``[preprocessing]``: the deterministic pipeline, patch sampling, augmentation and caching."""

    spatial_size: tuple[int, ...] = ()  # resize target, or the patch size when patches_per_image > 0
    spacing: tuple[float, ...] = ()  # resample to this voxel size (mm) first; () keeps the native spacing
    orientation: str = "RAS"  # axis codes for volumes; "" keeps the stored orientation
    intensity: Literal["minmax", "zscore", "window", "none"] = "minmax"
    a_min: float | None = None  # intensity = "window": values mapped to [0, 1], clipped
    a_max: float | None = None
    crop_foreground: bool = False  # crop to the box of voxels above the image minimum
    patches_per_image: int = 0  # 0: resize whole images; n > 0: n random patches per image and epoch
    augment: bool = False  # random flips, 90-degree rotations and noise, train split only
    cache: Literal["memory", "none"] = "memory"  # keep the deterministic prefix in memory
    channels: int = 0  # 0 keeps the stored channels; 1 averages colour to grey; 3 repeats grey
    # a NIfTI image with a 4th axis of T > 1 volumes (time, echoes, b-values): refused, its T volumes
    # read as T input channels, or its first volume only; labels must be 3-D whatever this says
    volume_4d: Volume4D = "refuse"
    # tabular: a missing cell (see fedfew_med.data.tables.MISSING) refuses the row, or is imputed with
    # the column's mean / median over the site's own train split (never val or test)
    missing: Literal["refuse", "mean", "median"] = "refuse"

    def __post_init__(self) -> None:
        size = list(self.spatial_size)
        require(len(size) in (0, 2, 3), "spatial_size", "list 2 or 3 sizes", size)
        require(all(s >= 1 for s in size), "spatial_size", "contain integers >= 1", size)
        require(all(s <= MAX_AXIS for s in size), "spatial_size", f"contain integers <= {MAX_AXIS}", size)
        require(
            math.prod(size) <= MAX_VOXELS,
            "spatial_size",
            f"hold at most {MAX_VOXELS} voxels (512**3), not {math.prod(size)}",
            size,
        )
        require(
            not self.spacing or len(self.spacing) == len(size),
            "spacing",
            f"list one voxel size per axis of spatial_size ({len(size)})",
            list(self.spacing),
        )
        require(
            all(MIN_SPACING <= s <= MAX_SPACING for s in self.spacing),
            "spacing",
            f"contain voxel sizes from {MIN_SPACING} to {MAX_SPACING} mm",
            list(self.spacing),
        )
        codes = self.orientation.upper()
        valid_codes = len(codes) == 3 and all(sum(c in pair for c in codes) == 1 for pair in _AXES)
        require(
            self.orientation == "" or valid_codes,
            "orientation",
            "be 3 axis codes such as 'RAS', or ''",
            self.orientation,
        )
        windowed = self.intensity == "window"
        for key, value in (("a_min", self.a_min), ("a_max", self.a_max)):
            require((value is not None) == windowed, key, "be given exactly when intensity = 'window'", value)
            require(
                value is None or abs(value) <= MAX_INTENSITY,
                key,
                f"be a number from {-MAX_INTENSITY:g} to {MAX_INTENSITY:g}",
                value,
            )
        if self.a_min is not None and self.a_max is not None:
            require(self.a_min < self.a_max, "a_max", f"be > a_min ({self.a_min})", self.a_max)
        require(
            0 <= self.patches_per_image <= MAX_PATCHES,
            "patches_per_image",
            f"be an integer from 0 to {MAX_PATCHES}",
            self.patches_per_image,
        )
        require(self.channels in (0, 1, 3), "channels", "be 0 (as stored), 1 or 3", self.channels)


@dataclass(frozen=True)
class SplitSection:
    """``[split]``: the seeded train/val/test split, stratified by class (segmentation: plain).

    With ``[source].split_column`` the column decides and ``test_fraction`` is unused;
    if no row is marked ``val``, ``val_fraction`` of the rows marked ``train`` become val.
    """

    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        require(0 <= self.seed <= MAX_SEED, "seed", f"be an integer from 0 to {MAX_SEED}", self.seed)
        require(0.0 <= self.val_fraction < 1.0, "val_fraction", "be in [0, 1)", self.val_fraction)
        require(0.0 <= self.test_fraction < 1.0, "test_fraction", "be in [0, 1)", self.test_fraction)
        total = self.val_fraction + self.test_fraction
        require(
            total < 1.0,
            "test_fraction",
            f"leave training data (val_fraction + test_fraction < 1, val_fraction = {self.val_fraction})",
            self.test_fraction,
        )


@dataclass(frozen=True)
class SitePaths:
    """Absolute, checked paths; ``None`` where the source kind does not use the key."""

    root: Path
    csv: Path | None = None
    images: Path | None = None
    labels: Path | None = None
    datalist: Path | None = None
    links: tuple[Path, ...] = ()  # [source].links: where symlinks inside root may point

    def outside(self, path: Path | str) -> str | None:
        """Why ``path`` leaves the data root (``..``, an absolute path, a symlink), or ``None``."""
        return outside_root(Path(path), self.root, self.links)


@dataclass(frozen=True)
class SiteConfig:
    """One site, as loaded from its TOML file."""

    site: SiteSection
    source: SourceSection
    labels: LabelsSection
    paths: SitePaths
    preprocessing: PreprocessingSection = field(default_factory=PreprocessingSection)
    split: SplitSection = field(default_factory=SplitSection)
    privacy: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))
    file: str = "<memory>"  # the site file as given, for messages

    @property
    def num_classes(self) -> int:
        """Classes in the label map (segmentation: background included)."""
        return len(self.labels.names)

    def outside(self, path: Path | str) -> str | None:
        """Why ``path`` leaves the site's data root, or ``None`` when it stays inside (see the module)."""
        return self.paths.outside(path)

    def display(self, path: Path | str) -> str:
        """``path`` relative to the root when inside it, for messages."""
        p = _normal(Path(path))
        return p.relative_to(self.paths.root).as_posix() if p.is_relative_to(self.paths.root) else str(path)


_SECTIONS: dict[str, type] = {
    "site": SiteSection,
    "source": SourceSection,
    "labels": LabelsSection,
    "preprocessing": PreprocessingSection,
    "split": SplitSection,
}
_USES = {  # which path keys each kind reads: (csv, images, labels, datalist); "seg" = segmentation only
    "nifti_folder": ("optional", "yes", "seg", "no"),
    "dicom_series": ("optional", "yes", "seg", "no"),
    "images_csv": ("yes", "no", "no", "no"),
    "tabular_csv": ("yes", "no", "no", "no"),
    "msd_datalist": ("no", "no", "no", "yes"),
}


def _normal(path: Path) -> Path:
    # lexical normalisation: '..' cannot climb out of root, yet symlinked data stores stay allowed
    return Path(os.path.normpath(os.path.abspath(path)))


def outside_root(path: Path, root: Path, links: tuple[Path, ...] = ()) -> str | None:
    """Why ``path`` leaves ``root`` once ``..`` and symlinks are resolved, or ``None`` if it stays.

    ``root`` must be absolute and normalised. ``links`` are folders outside ``root`` that
    symlinks inside it may point into (data stores linked into the site's folder).
    """
    lexical = _normal(path)
    if not lexical.is_relative_to(root):
        return "is outside root"
    real = Path(os.path.realpath(lexical))
    allowed = (root, *links)
    if any(real.is_relative_to(os.path.realpath(folder)) for folder in allowed):
        return None
    return f"is a symlink to {str(real)!r}, outside root (list that folder in [source].links to allow it)"


def inside_root(root: Path, base: Path, value: str, links: tuple[Path, ...] = ()) -> Path | None:
    """Resolve ``value`` against ``root`` (then ``base``); ``None`` if it leaves ``root``.

    ``root`` and ``base`` must be absolute and normalised. Leaving ``root`` includes a
    symlink that points out of it (see :func:`outside_root`). A path that exists nowhere
    is returned relative to ``root`` so that the caller can report it as missing.
    """
    for start in (root, base):
        candidate = _normal(start / value)
        if candidate.exists() and outside_root(candidate, root, links) is None:
            return candidate
    candidate = _normal(root / value)
    return candidate if outside_root(candidate, root, links) is None else None


def _path(file: str, paths: SitePaths, base: Path, key: str, value: str, *, folder: bool) -> Path:
    what = "folder" if folder else "file"
    root = paths.root
    resolved = inside_root(root, base, value, paths.links)
    if resolved is None:
        raise ConfigError(
            f"{file}: [source].{key} must stay inside root ('{root}') once '..' and symlinks are resolved, "
            f"got {value!r}"
        )
    if not (resolved.is_dir() if folder else resolved.is_file()):
        raise ConfigError(f"{file}: [source].{key} must name an existing {what} inside root, got {value!r}")
    return resolved


def _resolve_paths(file: str, base: Path, task: str, source: SourceSection) -> SitePaths:
    root = _normal(base / source.root)
    if not root.is_dir():
        raise ConfigError(
            f"{file}: [source].root must name an existing folder (relative to the site file's folder), got {source.root!r}"
        )
    links = []
    for i, link in enumerate(source.links):
        folder = _normal(base / link)
        if not folder.is_dir():
            raise ConfigError(
                f"{file}: [source].links[{i}] must name an existing folder (relative to the site file's folder), "
                f"got {link!r}"
            )
        links.append(folder)
    found = SitePaths(root=root, links=tuple(links))
    csv_use, images_use, labels_use, datalist_use = _USES[source.kind]
    kind = source.kind
    needs_csv = csv_use == "yes" or (csv_use == "optional" and task == "classification")
    if needs_csv and not source.csv:
        why = (
            f"kind {kind!r}"
            if csv_use == "yes"
            else f"classification with kind {kind!r} (it holds the labels)"
        )
        raise ConfigError(f"{file}: [source].csv is required for {why}")
    csv = (
        _path(file, found, base, "csv", source.csv, folder=False) if source.csv and csv_use != "no" else None
    )
    images = _path(file, found, base, "images", source.images, folder=True) if images_use == "yes" else None
    labels = None
    if labels_use == "seg" and task == "segmentation":
        labels = _path(file, found, base, "labels", source.labels, folder=True)
    datalist = (
        _path(file, found, base, "datalist", source.datalist, folder=False) if datalist_use == "yes" else None
    )
    return dataclasses.replace(found, csv=csv, images=images, labels=labels, datalist=datalist)


def _check_task(file: str, site: SiteSection, source: SourceSection, pre: PreprocessingSection) -> None:
    tabular_kind = source.kind == "tabular_csv"
    if tabular_kind != (site.task == "tabular"):
        raise ConfigError(
            f"{file}: [site].task must be 'tabular' exactly when [source].kind is 'tabular_csv', "
            f"got task {site.task!r} with kind {source.kind!r}"
        )
    if site.task != "tabular" and not pre.spatial_size:
        raise ConfigError(
            f"{file}: [preprocessing].spatial_size is required for task {site.task!r}, got nothing"
        )
    if site.task != "tabular" and pre.missing != "refuse":
        raise ConfigError(
            f"{file}: [preprocessing].missing must be 'refuse' for task {site.task!r} "
            f"(imputation applies to tabular data only), got {pre.missing!r}"
        )
    repeated = sorted({c for c in source.feature_columns if source.feature_columns.count(c) > 1})
    if repeated:
        raise ConfigError(
            f"{file}: [source].feature_columns must name each column once, got {repeated} more than once"
        )
    if site.task == "tabular" and pre.intensity == "window":
        raise ConfigError(
            f"{file}: [preprocessing].intensity must be 'minmax', 'zscore' or 'none' for tabular data, got 'window'"
        )


def site_config_from_dict(
    data: Mapping[str, Any], *, file: str = "<memory>", base_dir: Path | str = "."
) -> SiteConfig:
    """Validate a raw mapping (as parsed from TOML) into a :class:`SiteConfig`.

    Parameters
    ----------
    data
        The parsed TOML document.
    file
        Name of the file it came from, used in every message.
    base_dir
        The site file's folder; ``[source].root`` is relative to it.

    Raises
    ------
    ConfigError
        On unknown sections or keys, wrong types or values, missing files or folders, or
        paths that leave ``[source].root``.
    """
    unknown = sorted(set(data) - set(_SECTIONS) - {"privacy"})
    if unknown:
        allowed = ", ".join(f"[{s}]" for s in [*_SECTIONS, "privacy"])
        hint = did_you_mean(unknown[0], [*_SECTIONS, "privacy"])
        raise ConfigError(f"{file}: unknown section [{unknown[0]}]{hint}; allowed sections are {allowed}")
    built: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        if name not in data:
            if name in ("site", "source", "labels"):
                raise ConfigError(f"{file}: section [{name}] is required but missing")
            continue
        built[name] = build_dataclass(cls, data[name], where=f"{file}: [{name}]")
    privacy = data.get("privacy", {})
    if not isinstance(privacy, Mapping):
        raise ConfigError(f"{file}: [privacy] must be a table, got {privacy!r}")
    built["privacy"] = types.MappingProxyType(dict(privacy))
    pre = built.get("preprocessing", PreprocessingSection())
    _check_task(file, built["site"], built["source"], pre)
    paths = _resolve_paths(file, _normal(Path(base_dir)), built["site"].task, built["source"])
    return SiteConfig(paths=paths, file=file, **built)


def load_site_config(path: str | Path) -> SiteConfig:
    """Load and check one site file (see the module docstring for the schema).

    Raises
    ------
    SiteConfigError
        A :class:`ConfigError` naming the site (when ``[site].name`` is readable), the file, the key, what must
        hold and what was given.
    """
    p = Path(path)
    try:
        raw = read_toml(p)
    except ConfigError as exc:
        raise SiteConfigError(str(exc), site=None, file=str(path)) from None
    try:
        return site_config_from_dict(raw, file=str(path), base_dir=p.parent)
    except ConfigError as exc:
        name = _readable_name(raw)
        message = str(exc) if name is None else f"{name}: {exc}"
        raise SiteConfigError(message, site=name, file=str(path)) from None


def _readable_name(raw: Mapping[str, Any]) -> str | None:
    """``[site].name`` of a raw document when it is a valid name, for messages."""
    site = raw.get("site")
    name = site.get("name") if isinstance(site, Mapping) else None
    if isinstance(name, str) and _NAME.fullmatch(name) and len(name) <= MAX_NAME:
        return name
    return None

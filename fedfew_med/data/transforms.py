"""MONAI dictionary pipelines for one site, built from its ``[preprocessing]`` section.

A pipeline is a deterministic prefix (cached once per site) followed by the
random part (train split only) and a final typing step::

    read -> channels -> Orientationd -> Spacingd -> intensity -> CropForegroundd
         -> Resized | SpatialPadd                                    (deterministic)
    [train] RandCropByPosNegLabeld | RandSpatialCropd (patch sampling)
            RandFlipd per axis, RandRotate90d (square in-plane), RandGaussianNoised
    EnsureTyped -> SelectItemsd("image", "label")

Items come out as ``{"image": float32 (C, *spatial), "label": int64 () or (1, *spatial)}``.
Random transforms draw from their own ``RandomState``, seeded through
``Compose.set_random_state`` from the split seed: the global RNGs are never used.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    MapTransform,
    NormalizeIntensityd,
    Orientation,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    RandSpatialCropd,
    Resized,
    ScaleIntensityd,
    ScaleIntensityRanged,
    SelectItemsd,
    Spacingd,
    SpatialPadd,
)
from sklearn.impute import SimpleImputer

from fedfew_med.data.readers import ReaderSet, ReadImaged
from fedfew_med.site_config import PreprocessingSection, SiteConfig

IMAGE, LABEL = "image", "label"


def augmentation_seed(split_seed: int) -> int:
    """Seed of the train split's random transforms, derived from (not equal to) the split seed."""
    return int(np.random.SeedSequence([split_seed, 0x617567]).generate_state(1)[0])


def spatial_keys(cfg: SiteConfig) -> list[str]:
    """Keys that carry images: the label too for segmentation."""
    return [IMAGE, LABEL] if cfg.site.task == "segmentation" else [IMAGE]


def _above_minimum(x: torch.Tensor) -> torch.Tensor:
    # foreground = everything brighter than the darkest value, whatever the intensity scaling
    return x > x.min()


class ToChannelsd(MapTransform):
    """Average colour channels to grey (``channels=1``) or repeat grey (``channels=3``)."""

    def __init__(self, keys: Sequence[Hashable], channels: int) -> None:
        super().__init__(keys)
        self.channels = channels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            img = out[key]
            have = img.shape[0]
            if have == self.channels:
                continue
            if self.channels == 1:
                out[key] = img.mean(dim=0, keepdim=True)
            elif have == 1:
                out[key] = img.repeat(self.channels, *([1] * (img.ndim - 1)))
            else:
                raise ValueError(f"cannot make {self.channels} channels from {have}")
        return out


def orientation(pre: PreprocessingSection, ndim: int) -> Orientation | None:
    """The reorientation for images with ``ndim`` spatial axes, or ``None`` when it is off."""
    if not pre.orientation:
        return None
    return Orientation(axcodes=pre.orientation.upper()[:ndim], labels=None)


def _intensity(pre: PreprocessingSection) -> list[Any]:
    if pre.intensity == "minmax":
        return [ScaleIntensityd(IMAGE, minv=0.0, maxv=1.0)]
    if pre.intensity == "zscore":
        return [NormalizeIntensityd(IMAGE, channel_wise=True)]
    if pre.intensity == "window":
        assert pre.a_min is not None and pre.a_max is not None  # checked by PreprocessingSection
        return [
            ScaleIntensityRanged(IMAGE, a_min=pre.a_min, a_max=pre.a_max, b_min=0.0, b_max=1.0, clip=True)
        ]
    return []


def deterministic_transforms(cfg: SiteConfig, readers: ReaderSet | None = None) -> list[Any]:
    """The cacheable prefix: read, orient, resample, scale, crop, resize (or pad to the patch size)."""
    pre = cfg.preprocessing
    keys = spatial_keys(cfg)
    ndim = len(pre.spatial_size)
    modes = ["bilinear", "nearest"][: len(keys)]
    # labels passed validation as 3-D single-channel maps, so volume_4d only ever changes the image
    out: list[Any] = [ReadImaged(keys, readers, volume_4d=pre.volume_4d)]
    if pre.channels:
        out.append(ToChannelsd([IMAGE], pre.channels))
    if pre.orientation:
        out.append(Orientationd(keys, axcodes=pre.orientation.upper()[:ndim], labels=None))
    if pre.spacing:
        out.append(Spacingd(keys, pixdim=pre.spacing, mode=modes))
    out += _intensity(pre)
    if pre.crop_foreground:
        out.append(CropForegroundd(keys, source_key=IMAGE, select_fn=_above_minimum, allow_smaller=True))
    if pre.patches_per_image:
        out.append(SpatialPadd(keys, spatial_size=pre.spatial_size))
    else:
        out.append(Resized(keys, spatial_size=pre.spatial_size, mode=["area", "nearest"][: len(keys)]))
    return out


def random_transforms(cfg: SiteConfig) -> list[Any]:
    """Patch sampling and augmentation, for the train split only."""
    pre = cfg.preprocessing
    keys = spatial_keys(cfg)
    out: list[Any] = []
    if pre.patches_per_image and cfg.site.task == "segmentation":
        # half the patches centred on foreground: lesions are often a tiny share of the voxels
        out.append(
            RandCropByPosNegLabeld(
                keys, label_key=LABEL, spatial_size=pre.spatial_size, pos=1, neg=1, num_samples=1
            )
        )
    elif pre.patches_per_image:
        out.append(RandSpatialCropd(keys, roi_size=pre.spatial_size, random_size=False))
    if pre.augment:
        out += [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(len(pre.spatial_size))]
        if pre.spatial_size[0] == pre.spatial_size[1]:  # a quarter turn keeps the shape only when square
            out.append(RandRotate90d(keys, prob=0.5, max_k=3, spatial_axes=(0, 1)))
        out.append(RandGaussianNoised(IMAGE, prob=0.3, mean=0.0, std=0.05))
    return out


def final_transforms() -> list[Any]:
    """Plain tensors of the contract's dtypes, and nothing but image and label."""
    return [
        EnsureTyped(IMAGE, dtype=torch.float32, track_meta=False),
        EnsureTyped(LABEL, dtype=torch.int64, track_meta=False),
        SelectItemsd([IMAGE, LABEL]),
    ]


def build_pipeline(cfg: SiteConfig, *, train: bool, readers: ReaderSet | None = None) -> Compose:
    """The whole pipeline of one split; the train one is seeded from ``[split].seed``."""
    random = random_transforms(cfg) if train else []
    pipeline = Compose([*deterministic_transforms(cfg, readers), *random, *final_transforms()])
    if train:
        pipeline.set_random_state(seed=augmentation_seed(cfg.split.seed))
    return pipeline


def impute_features(
    train: np.ndarray, others: Sequence[np.ndarray], strategy: str
) -> tuple[np.ndarray, list[np.ndarray], list[float]]:
    """Fill NaN cells of tabular features (N, F) with each column's train-split mean or median.

    ``strategy`` is ``"mean"`` or ``"median"`` (scikit-learn's ``SimpleImputer``); the
    statistics come from ``train`` alone and are applied to ``train`` and ``others`` (val,
    test), so no held-out value leaks into them. Returns the filled arrays (float32) and the
    value used for each column.

    Raises
    ------
    ValueError
        When a column has no value in ``train`` (the imputer would silently drop it).
    """
    wide = train.astype(np.float64)  # float32 sums lose digits over many rows
    empty = (
        [int(j) for j in np.flatnonzero(np.isnan(wide).all(axis=0))]
        if len(wide)
        else list(range(wide.shape[1]))
    )
    if empty:
        raise ValueError(f"feature(s) {empty} have no value in the train split")
    imputer = SimpleImputer(missing_values=np.nan, strategy=strategy)
    imputer.fit(wide)
    filled = [
        imputer.transform(a.astype(np.float64)).astype(np.float32) if len(a) else a for a in (train, *others)
    ]
    return filled[0], filled[1:], [float(v) for v in imputer.statistics_]


def scale_features(
    train: np.ndarray, others: Sequence[np.ndarray], mode: str
) -> tuple[np.ndarray, list[np.ndarray], dict[str, list[float]]]:
    """Scale tabular features (N, F) with statistics of the train split only (no leakage).

    ``mode`` is ``"minmax"`` (to [0, 1]), ``"zscore"`` or ``"none"``; constant features are
    left centred. Returns the scaled train split, the scaled others and the statistics.
    """
    if mode == "none" or len(train) == 0:
        return train, list(others), {}
    wide = train.astype(np.float64)  # float32 sums and spans overflow for features near 3e38
    if mode == "minmax":
        shift, span = wide.min(axis=0), wide.max(axis=0) - wide.min(axis=0)
    else:
        shift, span = wide.mean(axis=0), wide.std(axis=0)
    span = np.where(span > 0, span, 1.0)  # constant features: avoid 0/0
    scaled = [((a.astype(np.float64) - shift) / span).astype(np.float32) for a in (train, *others)]
    return scaled[0], scaled[1:], {"shift": shift.tolist(), "scale": span.tolist()}


def apply_feature_statistics(x: np.ndarray, stats: Mapping[str, Any]) -> np.ndarray:
    """New tabular rows (N, F) through a site's preprocessing, with the statistics its train split gave.

    ``stats`` is the site's metadata (:func:`fedfew_med.data.sites.build_site`): ``imputed_with``
    fills NaN cells when the site imputes (as :func:`impute_features`), then ``shift`` and ``scale``
    are applied as :func:`scale_features` applied them. The arithmetic follows both step by step,
    so a site's own rows come out bit for bit as in training.

    Raises
    ------
    ValueError
        When a cell is NaN and the site does not impute, or ``x`` has another feature count.
    """
    wide = np.asarray(x, dtype=np.float64)
    width = len(stats.get("features") or []) or wide.shape[1]
    if wide.ndim != 2 or wide.shape[1] != width:
        raise ValueError(f"expected rows of {width} features, got shape {tuple(wide.shape)}")
    fill = stats.get("imputed_with")
    if fill is not None:
        wide = np.where(np.isnan(wide), np.asarray(fill, dtype=np.float64), wide)
    elif np.isnan(wide).any():
        raise ValueError("a feature is missing and the site does not impute ([preprocessing].missing = 'refuse')")
    out = wide.astype(np.float32)
    if "shift" in stats:
        shift, span = np.asarray(stats["shift"], dtype=np.float64), np.asarray(stats["scale"], dtype=np.float64)
        out = ((out.astype(np.float64) - shift) / span).astype(np.float32)
    return out

"""A synthetic imaging federation whose sites differ clearly, built with MONAI.

Every image is a 2-D slice of "tissue" with at most one *lesion* and at most one
*distractor* blob (circles from ``monai.data.synthetic.create_test_image_2d``).
The task is lesion present/absent (classification) or the lesion mask
(segmentation). Sites follow one of three acquisition protocols, cycled over
site index, and differ further in intensity offset/scale, noise, lesion size and
class mix:

============  =====================  ======================  ================
protocol      lesion appears          distractor appears      noise, lesion r
============  =====================  ======================  ================
``bright``    hyper-intense (T2-like) hypo-intense            low, 3-6 px
``dark``      hypo-intense (T1-like)  hyper-intense           low, 3-6 px
``noisy``     hyper-intense           hypo-intense            high, 2-4 px
============  =====================  ======================  ================

``bright`` and ``dark`` disagree on what a lesion looks like (as the same
pathology does on T1 and T2 MRI), so one shared model has to learn each site's
protocol from its intensity signature while K ≥ 2 models can specialise; this is
what makes K = 3 beat K = 1 here. Everything is drawn from explicit
``numpy.random.RandomState`` seeds: the same options give the same data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from monai.data.synthetic import create_test_image_2d

from fedfew_med.config import require
from fedfew_med.data.base import SiteData, TensorDictDataset

PROTOCOLS = ("bright", "dark", "noisy")
_PROFILE = {  # polarity of the lesion, noise std, lesion radius range
    "bright": (+1.0, 0.06, (3, 7)),
    "dark": (-1.0, 0.06, (3, 7)),
    "noisy": (+1.0, 0.16, (2, 5)),
}


@dataclass(frozen=True)
class SyntheticOptions:
    """Options of the synthetic federation (config section ``[data.params]``)."""

    num_sites: int = 6
    image_size: int = 32
    task: Literal["classification", "segmentation"] = "classification"
    train_min: int = 120  # training records per site vary between train_min and train_max
    train_max: int = 240
    val_fraction: float = 0.2  # held-out slice of the training records, for model choice
    test_per_site: int = 100
    contrast: float = 0.35
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.num_sites >= 1, "num_sites", "be an integer >= 1", self.num_sites)
        require(self.image_size >= 16, "image_size", "be an integer >= 16", self.image_size)
        require(1 <= self.train_min <= self.train_max, "train_max", f"be >= train_min ({self.train_min})", self.train_max)
        require(0.0 <= self.val_fraction < 1.0, "val_fraction", "be in [0, 1)", self.val_fraction)
        require(self.test_per_site >= 1, "test_per_site", "be an integer >= 1", self.test_per_site)
        require(self.contrast > 0, "contrast", "be > 0", self.contrast)


def _blob(size: int, radius: tuple[int, int], rs: np.random.RandomState) -> np.ndarray:
    """A single filled circle as a boolean (H, W) mask, placed at random."""
    _, seg = create_test_image_2d(
        size, size, num_objs=1, rad_max=radius[1], rad_min=radius[0], noise_max=0.0, num_seg_classes=1, random_state=rs
    )
    return seg > 0


def _site_records(
    n: int, protocol: str, positive_rate: float, offset: float, scale: float, o: SyntheticOptions, rs: np.random.RandomState
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n images (n, 1, H, W) float32, class labels (n,), lesion masks (n, 1, H, W)."""
    polarity, noise, radius = _PROFILE[protocol]
    s = o.image_size
    images = np.empty((n, 1, s, s), dtype=np.float32)
    masks = np.zeros((n, 1, s, s), dtype=np.int64)
    labels = (rs.random_sample(n) < positive_rate).astype(np.int64)
    for i in range(n):
        img = np.full((s, s), 0.5, dtype=np.float64)
        if labels[i]:
            lesion = _blob(s, radius, rs)
            img += polarity * o.contrast * lesion
            masks[i, 0] = lesion
        if rs.random_sample() < 0.8:  # a distractor of the opposite polarity, in most images
            img -= polarity * o.contrast * _blob(s, (3, 7), rs)
        img += rs.normal(0.0, noise, size=(s, s))
        images[i, 0] = (offset + scale * img).astype(np.float32)
    return images, labels, masks


def make_synthetic_federation(options: SyntheticOptions) -> list[SiteData]:
    """Build the sites of the synthetic federation (deterministic in ``options.seed``)."""
    o = options
    sites = []
    for idx in range(o.num_sites):
        rs = np.random.RandomState(np.random.SeedSequence([o.seed, idx]).generate_state(1)[0])
        protocol = PROTOCOLS[idx % len(PROTOCOLS)]
        n_train = int(rs.randint(o.train_min, o.train_max + 1))
        positive_rate = float(rs.uniform(0.3, 0.7))  # label mix differs per site
        offset = float(rs.uniform(-0.2, 0.2))  # scanner intensity offset and gain
        scale = float(rs.uniform(0.8, 1.25))
        n_val = int(round(o.val_fraction * n_train))
        images, labels, masks = _site_records(n_train + n_val + o.test_per_site, protocol, positive_rate, offset, scale, o, rs)
        target = labels if o.task == "classification" else masks
        bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(images))}
        splits = {
            name: TensorDictDataset(torch.from_numpy(images[a:b]), torch.from_numpy(target[a:b]))
            for name, (a, b) in bounds.items()
        }
        sites.append(
            SiteData(
                name=f"site{idx:02d}-{protocol}",
                task=o.task,
                splits=splits,
                in_channels=1,
                num_classes=2,
                spatial_dims=2,
                metadata={
                    "source": "synthetic",
                    "protocol": protocol,
                    "positive_rate": round(positive_rate, 4),
                    "intensity_offset": round(offset, 4),
                    "intensity_scale": round(scale, 4),
                    "n_train": n_train,
                    "n_val": n_val,
                    "n_test": o.test_per_site,
                    "train_label_counts": np.bincount(labels[:n_train], minlength=2).tolist(),
                },
            )
        )
    return sites

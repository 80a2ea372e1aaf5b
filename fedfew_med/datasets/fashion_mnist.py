"""Fashion-MNIST as a federation of M sites, as personalized-FL papers use it.

Source
------
The original IDX files of Fashion-MNIST (Xiao et al. 2017; 60000 train + 10000 test
28 × 28 grey images, 10 classes), as shipped by the Debian package
``dataset-fashion-mnist`` in ``/usr/share/datasets/fashion-mnist/``
(``train-images-idx3-ubyte.gz`` ...). They are read with numpy (no torchvision);
plain or gzip-compressed IDX files are both accepted. Nothing is downloaded.

Sites
-----
As in the pFL literature (PFLlib, FedFew's reference code), the 70000 records are
merged, partitioned over ``num_sites`` sites, and each site's records are re-split
into train / test (``train_fraction`` = 0.75 by default), stratified by class.
A validation slice (``val_fraction`` of the site's training records) is carved out of
the training part for model and hyperparameter choice. Two partitions:

* ``dirichlet`` (Hsu et al. 2019): for every class, proportions over the sites drawn
  from ``Dir(alpha · 1)``; small ``alpha`` (0.1) gives sites dominated by few classes.
  Draws that leave a site with fewer than :data:`MIN_SITE_RECORDS` records are
  repeated with the same generator.
* ``pathological`` (McMahan et al. 2017): every site holds ``classes_per_site``
  classes; each class's records are cut into equal shards over the sites that hold it
  (site i holds classes ``(i · c + j) mod 10`` for ``j < c`` with ``c`` classes per site,
  so every class is used when ``num_sites · c >= 10``).

The sites are built in memory (:func:`fashion_mnist_sites`, a list of
:class:`~fedfew_med.data.SiteData`, images ``(1, 28, 28)`` in [0, 1]) and passed to
``fedfew_med.simulation.run(config, sites=...)``; :func:`partition_summary` gives the
per-site label counts to record with the results.

Layer 3 (it builds data for the simulation; nothing below imports it).
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fedfew_med.data import SiteData
from fedfew_med.data.synthetic import TensorDictDataset
from fedfew_med.datasets.common import (
    PreparedFederation,
    ensure_empty_dir,
    site_toml,
    write_federation,
    write_json,
)

__all__ = [
    "APT_PACKAGE",
    "CLASS_NAMES",
    "DEFAULT_ROOT",
    "MIN_SITE_RECORDS",
    "fashion_mnist_sites",
    "load_fashion_mnist",
    "partition_labels",
    "partition_summary",
    "prepare_fashion_mnist",
    "read_idx",
]

APT_PACKAGE = "dataset-fashion-mnist"
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
MIN_SITE_RECORDS = 20
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_DTYPES: dict[int, np.dtype[Any]] = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (plain or ``.gz``) into an array of its declared shape and type.

    Raises
    ------
    ValueError
        If the magic number, type code or size does not match the IDX format.
    """
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: an IDX file must start with two zero bytes, got {raw[:4]!r}")
    code, ndim = raw[2], raw[3]
    if code not in _DTYPES:
        raise ValueError(f"{path}: IDX type code must be one of {sorted(hex(c) for c in _DTYPES)}, got {hex(code)}")
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _DTYPES[code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: IDX shape {shape} of {dtype} needs {expected} bytes, got {len(raw)}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] must be in {root}, but it is not; install the Debian package with "
        f"`apt-get install {APT_PACKAGE}` (it puts the IDX files in {DEFAULT_ROOT}) or pass root= to a folder holding them"
    )


def load_fashion_mnist(root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All records, train then test: images ``(N, 28, 28)`` uint8 and labels ``(N,)`` int64.

    Raises
    ------
    FileNotFoundError
        If an IDX file is missing; the message names the apt package to install.
    ValueError
        If the image and label counts of a file pair disagree.
    """
    folder = Path(root) if root is not None else DEFAULT_ROOT
    images, labels = [], []
    for split, (img_stem, lab_stem) in FILES.items():
        x = read_idx(_find(folder, img_stem))
        y = read_idx(_find(folder, lab_stem))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{folder}: {split} images {x.shape} and labels {y.shape} must be (N, H, W) and (N,)")
        images.append(x.astype(np.uint8))
        labels.append(y.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)


def partition_labels(
    labels: np.ndarray,
    *,
    num_sites: int,
    scheme: Literal["dirichlet", "pathological"],
    alpha: float = 0.1,
    classes_per_site: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """Record indices of each site (sorted), for a ``dirichlet`` or ``pathological`` partition.

    Raises
    ------
    ValueError
        For an unknown scheme, fewer than 1 site, a non-positive ``alpha``, or a
        Dirichlet partition that cannot give every site :data:`MIN_SITE_RECORDS` records in 100 draws.
    """
    if num_sites < 1:
        raise ValueError(f"num_sites must be at least 1, got {num_sites}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = {int(c): rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
    if scheme == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        minimum = min(MIN_SITE_RECORDS, len(labels) // num_sites)
        for _ in range(100):
            parts = [[] for _ in range(num_sites)]
            for idx in by_class.values():
                p = rng.dirichlet(np.full(num_sites, alpha))
                cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
                for site, chunk in enumerate(np.split(idx, cuts)):
                    parts[site].append(chunk)
            if min(sum(len(c) for c in site) for site in parts) >= minimum:
                break
        else:
            raise ValueError(f"no Dirichlet(alpha={alpha}) draw in 100 gave every one of {num_sites} sites {minimum} records")
    elif scheme == "pathological":
        if not 1 <= classes_per_site <= len(classes):
            raise ValueError(f"classes_per_site must be between 1 and {len(classes)}, got {classes_per_site}")
        holders: dict[int, list[int]] = {int(c): [] for c in classes}
        for site in range(num_sites):
            for j in range(classes_per_site):
                holders[int(classes[(site * classes_per_site + j) % len(classes)])].append(site)
        for c, sites in holders.items():
            if not sites:  # fewer sites than classes: this class is not used
                continue
            for site, chunk in zip(sites, np.array_split(by_class[c], len(sites)), strict=True):
                parts[site].append(chunk)
    else:
        raise ValueError(f"scheme must be 'dirichlet' or 'pathological', got {scheme!r}")
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


def _split_site(labels: np.ndarray, *, train_fraction: float, val_fraction: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Positions of a site's train / val / test records, stratified by class."""
    out: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train = int(round(train_fraction * len(idx)))
        n_val = int(round(val_fraction * n_train))
        out["val"].append(idx[:n_val])
        out["train"].append(idx[n_val:n_train])
        out["test"].append(idx[n_train:])
    return {k: np.sort(np.concatenate(v)) for k, v in out.items()}


def _layout(
    *, num_sites: int, scheme: Literal["dirichlet", "pathological"], alpha: float, classes_per_site: int, seed: int,
    train_fraction: float, val_fraction: float, max_records: int | None, root: str | Path | None,
) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, dict[str, np.ndarray]]]]:
    """Images (N, 28, 28) uint8, labels (N,), and per site its record indices and its split positions."""
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    images, labels = load_fashion_mnist(root)
    seq = np.random.SeedSequence(seed)
    sub_rng, part_seed, split_rng = (np.random.default_rng(s) for s in seq.spawn(3))
    if max_records is not None and max_records < len(labels):
        keep = np.sort(sub_rng.choice(len(labels), size=max_records, replace=False))
        images, labels = images[keep], labels[keep]
    parts = partition_labels(
        labels, num_sites=num_sites, scheme=scheme, alpha=alpha, classes_per_site=classes_per_site,
        seed=int(part_seed.integers(2**31)),
    )
    layout = [(idx, _split_site(labels[idx], train_fraction=train_fraction, val_fraction=val_fraction, rng=split_rng))
              for idx in parts]
    return images, labels, layout


def fashion_mnist_sites(
    *,
    num_sites: int = 20,
    scheme: Literal["dirichlet", "pathological"] = "dirichlet",
    alpha: float = 0.1,
    classes_per_site: int = 2,
    seed: int = 0,
    train_fraction: float = 0.75,
    val_fraction: float = 0.1,
    max_records: int | None = None,
    root: str | Path | None = None,
) -> list[SiteData]:
    """Fashion-MNIST split over ``num_sites`` in-memory sites (see the module docstring).

    Parameters
    ----------
    max_records
        Use a seeded random subset of this many records (for quick runs); all 70000 when None.
    root
        Folder holding the four IDX files (default: the Debian package's folder).
    """
    images, labels, layout = _layout(num_sites=num_sites, scheme=scheme, alpha=alpha, classes_per_site=classes_per_site,
                                     seed=seed, train_fraction=train_fraction, val_fraction=val_fraction,
                                     max_records=max_records, root=root)
    x_all = torch.from_numpy(images).float().div_(255.0).unsqueeze(1)  # (N, 1, 28, 28)
    y_all = torch.from_numpy(labels)
    sites = []
    for i, (idx, splits) in enumerate(layout):
        datasets = {k: TensorDictDataset(x_all[idx[pos]].clone(), y_all[idx[pos]].clone()) for k, pos in splits.items()}
        counts = {k: np.bincount(labels[idx[pos]], minlength=len(CLASS_NAMES)).tolist() for k, pos in splits.items()}
        sites.append(
            SiteData(
                name=f"site{i:02d}",
                task="classification",
                splits=datasets,
                in_channels=1,
                num_classes=len(CLASS_NAMES),
                spatial_dims=2,
                metadata={"source": "fashion-mnist", "scheme": scheme, "alpha": alpha, "classes_per_site": classes_per_site,
                          "seed": seed, "label_counts": counts},
            )
        )
    return sites


def partition_summary(sites: Sequence[SiteData]) -> dict[str, Any]:
    """Per-site record and label counts of :func:`fashion_mnist_sites` (JSON-able)."""
    return {s.name: {"records": {k: s.size(k) for k in ("train", "val", "test")},
                     "label_counts": s.metadata.get("label_counts")} for s in sites}


def prepare_fashion_mnist(
    out_dir: Path,
    *,
    num_sites: int = 20,
    scheme: Literal["dirichlet", "pathological"] = "dirichlet",
    alpha: float = 0.1,
    classes_per_site: int = 2,
    seed: int = 0,
    max_records: int | None = None,
    root: str | Path | None = None,
) -> PreparedFederation:
    """Write the federation of :func:`fashion_mnist_sites` as files: the same sites, records and splits.

    One folder per site with its images as PNG files and ``labels.csv`` (image, label, split:
    train / val / test as drawn by :func:`fashion_mnist_sites`), a site TOML per site, a
    ``federation.toml`` (FedFew K = 3 on ``pflcnn``, 20 rounds, lr 0.01, batch 32: the pFL papers'
    set-up) and ``partition.json`` (per-site label counts).

    Raises
    ------
    FileNotFoundError
        If the IDX files are not there (install the Debian package ``dataset-fashion-mnist``).
    FileExistsError
        If ``out_dir`` is not empty.
    ValueError
        For arguments out of range (see :func:`partition_labels`).
    """
    from PIL import Image

    images, labels, layout = _layout(num_sites=num_sites, scheme=scheme, alpha=alpha, classes_per_site=classes_per_site,
                                     seed=seed, train_fraction=0.75, val_fraction=0.1, max_records=max_records, root=root)
    out = ensure_empty_dir(Path(out_dir))
    site_docs, site_meta = [], {}
    for i, (idx, splits) in enumerate(layout):
        name = f"site{i:02d}"
        (out / name / "images").mkdir(parents=True)
        split_of = {int(pos): split for split, positions in splits.items() for pos in positions}
        rows = []
        for j, record in enumerate(idx):
            rel = f"images/{j:05d}.png"
            Image.fromarray(images[record]).save(out / name / rel, format="PNG")
            rows.append((rel, CLASS_NAMES[int(labels[record])], split_of[j]))
        with (out / name / "labels.csv").open("w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["image", "label", "split"])
            writer.writerows(rows)
        site_meta[name] = {"records": {k: int(v.size) for k, v in splits.items()},
                           "label_counts": np.bincount(labels[idx], minlength=len(CLASS_NAMES)).tolist()}
        site_docs.append(site_toml(name=name, task="classification", kind="images_csv", csv="labels.csv", image_column="image",
                                   label_names=CLASS_NAMES, spatial_size=(28, 28), split_seed=seed, val_fraction=0.1,
                                   test_fraction=0.25))
    metadata = {"dataset": "fashion-mnist", "source": f"Debian package {APT_PACKAGE}", "num_sites": num_sites,
                "scheme": scheme, "alpha": alpha, "classes_per_site": classes_per_site, "seed": seed,
                "records": int(sum(idx.size for idx, _ in layout)), "classes": list(CLASS_NAMES), "sites": site_meta}
    write_json(out / "partition.json", metadata)
    federation: dict[str, dict[str, Any]] = {
        "run": {"name": f"fashion-mnist-{scheme}", "seed": seed, "rounds": 20, "eval_every": 5},
        "algorithm": {"name": "fedfew", "params": {"k": min(3, num_sites)}},
        "training": {"local_epochs": 1, "lr": 0.01, "batch_size": 32},
        "model": {"name": "pflcnn", "params": {"hidden": 512}},
    }
    header = (f"Written by fedfew_med.datasets.prepare_fashion_mnist(num_sites={num_sites}, scheme={scheme!r}, alpha={alpha}, "
              f"classes_per_site={classes_per_site}, seed={seed}).\nSee partition.json for the partition.")
    federation_file, site_files = write_federation(out, site_docs=site_docs, federation=federation, header=header)
    return PreparedFederation(out_dir=out, federation_file=federation_file, site_files=site_files, metadata=metadata)

"""Fashion-MNIST sites: IDX reading against hand-written files, partitions, splits, missing-package error."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from fedfew_med.datasets.fashion_mnist import (
    APT_PACKAGE,
    DEFAULT_ROOT,
    fashion_mnist_sites,
    load_fashion_mnist,
    partition_labels,
    partition_summary,
    read_idx,
)


def write_idx(path: Path, array: np.ndarray, *, compress: bool) -> None:
    """An IDX file written by hand from the format description (magic 0 0 type ndim, big-endian sizes)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    """400 train + 100 test 28x28 images whose first pixel encodes the record number; labels cycle 0..9."""
    rng = np.random.default_rng(0)
    for stem_img, stem_lab, n, offset, gz in (
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 400, 0, True),
        ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 100, 400, False),
    ):
        images = rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8)
        images[:, 0, 0] = (np.arange(n) + offset) % 256
        write_idx(tmp_path / stem_img, images, compress=gz)
        write_idx(tmp_path / stem_lab, (np.arange(n) + offset) % 10, compress=gz)
    return tmp_path


def test_read_idx_matches_written_array(tmp_path: Path) -> None:
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a", a, compress=False)
    write_idx(tmp_path / "b", a, compress=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), a)
    np.testing.assert_array_equal(read_idx(tmp_path / "b.gz"), a)


def test_read_idx_rejects_truncated_file(tmp_path: Path) -> None:
    write_idx(tmp_path / "a", np.zeros((2, 3), dtype=np.uint8), compress=False)
    (tmp_path / "a").write_bytes((tmp_path / "a").read_bytes()[:-1])
    with pytest.raises(ValueError, match="needs 18 bytes, got 17"):
        read_idx(tmp_path / "a")


def test_load_merges_train_then_test(tiny_root: Path) -> None:
    images, labels = load_fashion_mnist(tiny_root)
    assert images.shape == (500, 28, 28) and labels.shape == (500,)
    np.testing.assert_array_equal(labels, np.arange(500) % 10)
    np.testing.assert_array_equal(images[:, 0, 0], np.arange(500) % 256)


def test_missing_files_name_the_apt_package(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"apt-get install {APT_PACKAGE}"):
        load_fashion_mnist(tmp_path)


def test_dirichlet_partition_is_a_seeded_partition_with_skew() -> None:
    labels = np.repeat(np.arange(10), 300)
    parts = partition_labels(labels, num_sites=20, scheme="dirichlet", alpha=0.1, seed=3)
    joined = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(labels)))  # every record once
    assert all(len(p) >= 20 for p in parts)
    again = partition_labels(labels, num_sites=20, scheme="dirichlet", alpha=0.1, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    # alpha = 0.1: a typical site is dominated by one or two classes
    top2 = [np.sort(np.bincount(labels[p], minlength=10))[-2:].sum() / len(p) for p in parts]
    assert np.median(top2) > 0.8


def test_pathological_partition_gives_each_site_its_classes() -> None:
    labels = np.repeat(np.arange(10), 100)
    parts = partition_labels(labels, num_sites=20, scheme="pathological", classes_per_site=2, seed=0)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(1000))
    for i, p in enumerate(parts):
        assert set(labels[p].tolist()) == {(2 * i) % 10, (2 * i + 1) % 10}
        assert len(p) == 50  # each class shared by 4 sites: 100 / 4 * 2


def test_sites_split_75_25_with_val_from_train(tiny_root: Path) -> None:
    sites = fashion_mnist_sites(num_sites=4, scheme="pathological", classes_per_site=5, root=tiny_root, val_fraction=0.2)
    assert [s.name for s in sites] == ["site00", "site01", "site02", "site03"]
    total = sum(s.size("train") + s.size("val") + s.size("test") for s in sites)
    assert total == 500
    for s in sites:
        n = s.size("train") + s.size("val") + s.size("test")
        assert abs(s.size("test") - 0.25 * n) <= 5  # rounding per class
        record = s.splits["train"][0]
        assert record["image"].shape == (1, 28, 28) and 0.0 <= float(record["image"].max()) <= 1.0
        assert s.num_classes == 10 and s.in_channels == 1
    summary = partition_summary(sites)
    assert set(summary) == {s.name for s in sites}


def test_max_records_subsamples(tiny_root: Path) -> None:
    sites = fashion_mnist_sites(num_sites=2, alpha=0.5, root=tiny_root, max_records=200)
    assert sum(s.size("train") + s.size("val") + s.size("test") for s in sites) == 200


@pytest.mark.skipif(not DEFAULT_ROOT.is_dir(), reason=f"Debian package {APT_PACKAGE} not installed")
def test_real_files_have_70000_records() -> None:
    images, labels = load_fashion_mnist()
    assert images.shape == (70000, 28, 28)
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, 7000))


def test_prepared_files_are_the_in_memory_sites(tiny_root: Path, tmp_path: Path) -> None:
    """`datasets prepare fashion-mnist` writes what fashion_mnist_sites builds: the same records, labels and splits,
    read back through the site-config path (PNG + CSV), and a federation the simulator runs."""
    import csv

    from PIL import Image

    from fedfew_med.cli import main
    from fedfew_med.config import load_federation
    from fedfew_med.data import build_sites

    out = tmp_path / "fm"
    args = ["datasets", "prepare", "fashion-mnist", "--sites", "4", "--scheme", "pathological", "--classes-per-site", "3",
            "--seed", "1", "--out", str(out)]
    assert main([*args, "--root", str(tmp_path / "nowhere")]) == 2  # missing files: a clear error, nothing written
    assert not out.exists() or not any(out.iterdir())
    assert main([*args, "--root", str(tiny_root)]) == 0
    memory = fashion_mnist_sites(num_sites=4, scheme="pathological", classes_per_site=3, seed=1, root=tiny_root)
    config = load_federation(out / "federation.toml")
    assert config.model.name == "pflcnn" and config.algorithm.params["k"] == 3
    files = build_sites(config.data, source=config.source)
    assert [s.name for s in files] == [s.name for s in memory]
    for f, m in zip(files, memory, strict=True):
        for split in ("train", "val", "test"):
            assert f.size(split) == m.size(split), (f.name, split)
            assert [int(f.splits[split][i]["label"]) for i in range(f.size(split))] == \
                   [int(m.splits[split][i]["label"]) for i in range(m.size(split))]
        # the PNG files hold the records' own pixels (the first encodes the record number), split as in memory
        rows = list(csv.DictReader((out / f.name / "labels.csv").open()))
        for split in ("train", "val", "test"):
            written = [np.asarray(Image.open(out / f.name / r["image"]))[0, 0] for r in rows if r["split"] == split]
            expected = [round(float(m.splits[split][i]["image"][0, 0, 0]) * 255) for i in range(m.size(split))]
            assert written == expected

"""Seeded stratified splits: exact totals, every class within one record of its share, reproducible."""

from __future__ import annotations

import math

import pytest

from fedfew_med.data.splits import stratified_split

CASES = [  # class sizes, val fraction, test fraction
    ([50, 50], 0.1, 0.2),
    ([90, 10], 0.1, 0.2),
    ([7, 3, 1], 0.2, 0.2),
    ([1, 1], 0.1, 0.2),
    ([33, 17, 5, 45], 0.15, 0.25),
    ([10], 0.0, 0.3),
    ([12, 8], 0.0, 0.0),
]


def _labels(sizes: list[int]) -> list[int]:
    # interleaved, so that index order says nothing about class
    out = [c for c, size in enumerate(sizes) for _ in range(size)]
    return out[::2] + out[1::2]


@pytest.mark.parametrize(("sizes", "val", "test"), CASES)
def test_split_is_exact_proportional_and_reproducible(sizes: list[int], val: float, test: float) -> None:
    labels = _labels(sizes)
    n = len(labels)
    split = stratified_split(labels, n=n, seed=5, val_fraction=val, test_fraction=test)
    assert sorted(split["train"] + split["val"] + split["test"]) == list(range(n))  # a partition
    assert len(split["test"]) == math.floor(n * test + 0.5)
    assert len(split["val"]) == min(math.floor(n * val + 0.5), n - len(split["test"]))
    for c, size in enumerate(sizes):  # the reference: each class's exact share
        got_test = sum(labels[i] == c for i in split["test"])
        got_val = sum(labels[i] == c for i in split["val"])
        assert abs(got_test - size * test) < 1 + 1e-9
        assert abs(got_val - size * val) < 1 + 1e-9 + val / max(1 - test, 1e-9)
    assert split == stratified_split(labels, n=n, seed=5, val_fraction=val, test_fraction=test)


def test_other_seed_other_split_and_unlabelled_records() -> None:
    labels = _labels([40, 40])
    a = stratified_split(labels, n=80, seed=0, val_fraction=0.1, test_fraction=0.2)
    b = stratified_split(labels, n=80, seed=1, val_fraction=0.1, test_fraction=0.2)
    assert a["test"] != b["test"]
    plain = stratified_split(None, n=10, seed=0, val_fraction=0.1, test_fraction=0.2)
    assert [len(plain[s]) for s in ("train", "val", "test")] == [7, 1, 2]

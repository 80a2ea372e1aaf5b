"""Seeded train/val/test splits: stratified by class, with exact totals.

Totals are ``round(n * test_fraction)`` test and ``round(n * val_fraction)`` val
records. Each class gets its proportional share, floored, and the records still
owed go to the classes with the largest remainders (Hamilton's method), so every
class is within one record of its exact share. Inside a class the records are
drawn by a ``numpy.random.Generator`` seeded with the split seed alone: the
same seed and records give the same split on every machine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

SPLITS = ("train", "val", "test")


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _apportion(sizes: Sequence[int], fraction: float, total: int) -> list[int]:
    """Split ``total`` over groups of ``sizes`` in proportion, each within one of its exact share."""
    exact = [s * fraction for s in sizes]
    shares = [min(s, math.floor(e)) for s, e in zip(sizes, exact, strict=True)]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - shares[i]), i))
    owed = total - sum(shares)
    for i in by_remainder:
        if owed <= 0:
            break
        if shares[i] < sizes[i]:
            shares[i] += 1
            owed -= 1
    for i in reversed(by_remainder):  # floors can overshoot `total` by one when fractions are rescaled
        if owed >= 0:
            break
        if shares[i] > 0:
            shares[i] -= 1
            owed += 1
    return shares


def stratified_split(
    labels: Sequence[int] | None, *, n: int, seed: int, val_fraction: float, test_fraction: float
) -> dict[str, list[int]]:
    """Indices ``0..n-1`` split into train/val/test.

    Parameters
    ----------
    labels
        One class per record for a stratified split, or ``None`` (segmentation) for a plain one.
    n
        Number of records.
    seed
        The split seed.
    val_fraction, test_fraction
        Shares of the records held out; the rest trains.

    Returns
    -------
    dict
        ``{"train": [...], "val": [...], "test": [...]}``, each sorted.
    """
    groups = [0] * n if labels is None else [int(v) for v in labels]
    if len(groups) != n:
        raise ValueError(f"{len(groups)} labels for {n} records")
    classes = sorted(set(groups))
    members = [[i for i in range(n) if groups[i] == c] for c in classes]
    sizes = [len(m) for m in members]
    n_test = _round_half_up(n * test_fraction)
    n_val = min(_round_half_up(n * val_fraction), n - n_test)
    test_shares = _apportion(sizes, test_fraction, n_test)
    left = [s - t for s, t in zip(sizes, test_shares, strict=True)]
    # val shares are proportional to the class sizes too, taken from what test left
    val_shares = _apportion(left, val_fraction / max(1.0 - test_fraction, 1e-12), n_val)
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for idx, t, v in zip(members, test_shares, val_shares, strict=True):
        order = [idx[int(j)] for j in rng.permutation(len(idx))]
        out["test"] += order[:t]
        out["val"] += order[t : t + v]
        out["train"] += order[t + v :]
    return {k: sorted(v) for k, v in out.items()}


def split_by_column(values: Sequence[str]) -> dict[str, list[int]]:
    """Indices grouped by a split column whose values are already checked to be train/val/test."""
    return {s: [i for i, v in enumerate(values) if v == s] for s in SPLITS}

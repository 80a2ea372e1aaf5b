"""Grid patches put back together: ``GridPatches.stitch`` inverts the tiling, averaging where tiles overlap.

The reference is numpy: the tiles are cut here by hand (steps of the patch size, the last one moved
back to end at the border) and the overlap counts are worked out per voxel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfew_med.data.patches import GridPatches


def by_hand_starts(n: int, p: int) -> list[int]:
    """Tile starts along one axis: every p voxels, the last tile ending at the border."""
    starts = list(range(0, n - p + 1, p))
    return starts if starts[-1] + p == n else [*starts, n - p]


CASES = [  # image shapes (C = 2 channels), patch size
    ([(8, 8)], (4, 4)),  # tiles exactly: no overlap
    ([(10, 7)], (4, 4)),  # the last tiles overlap on both axes
    ([(10, 10, 6), (9, 12, 4)], (8, 8, 4)),  # volumes of different shapes
]


@pytest.mark.parametrize(("shapes", "patch"), CASES, ids=["exact", "overlap 2-D", "volumes of two shapes"])
def test_stitch_inverts_the_tiling(shapes: list[tuple[int, ...]], patch: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand((2, *s), generator=gen) for s in shapes]
    grid = GridPatches([{"image": im, "label": 0} for im in images], patch, segmentation=False)
    tiles = torch.stack([grid[i]["image"] for i in range(len(grid))])  # (N, 2, *patch)
    expected_tiles = sum(int(np.prod([len(by_hand_starts(n, p)) for n, p in zip(s, patch, strict=True)])) for s in shapes)
    assert len(grid) == expected_tiles and grid.shapes == shapes
    for got, want in zip(grid.stitch(tiles), images, strict=True):
        torch.testing.assert_close(got, want)  # overlapping tiles hold the same voxels: their mean is the voxel


def test_overlapping_values_are_averaged() -> None:
    shape, patch = (10, 7), (4, 4)
    grid = GridPatches([{"image": torch.zeros((1, *shape)), "label": 0}], patch, segmentation=False)
    values = torch.stack([torch.full((1, *patch), float(k)) for k in range(len(grid))])  # tile k holds k everywhere
    total, count = np.zeros(shape), np.zeros(shape)
    k = 0
    for a in by_hand_starts(shape[0], patch[0]):
        for b in by_hand_starts(shape[1], patch[1]):
            total[a:a + patch[0], b:b + patch[1]] += k
            count[a:a + patch[0], b:b + patch[1]] += 1
            k += 1
    assert k == len(grid)
    np.testing.assert_allclose(grid.stitch(values)[0][0].numpy(), total / count, rtol=1e-6)


def test_stitch_wants_one_value_per_tile() -> None:
    grid = GridPatches([{"image": torch.zeros((1, 8, 8)), "label": 0}], (4, 4), segmentation=False)
    with pytest.raises(ValueError, match="expected 4 patches"):
        grid.stitch(torch.zeros((3, 1, 4, 4)))

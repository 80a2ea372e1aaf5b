"""Map-style views that turn whole images into patches, one record per index.

Training draws ``patches_per_image`` random patches per image and epoch
(:class:`RandomPatches`: index ``i`` is a fresh draw from image ``i // p``);
validation and testing tile every image with fixed, non-overlapping patches
(:class:`GridPatches`; the last patch on an axis is moved back to end at the
border), so that evaluation sees every voxel and is the same on every run;
:meth:`GridPatches.stitch` puts the tiles' predictions back into whole images, which
is what the test metrics score (a Dice over tiles would count every empty tile as found).
Every index gives one ``{"image", "label"}`` dict, as the default collate expects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.data import dense_patch_slices
from torch.utils.data import Dataset

Record = dict[str, torch.Tensor]


class RandomPatches(Dataset[Record]):
    """``times`` records per record of ``base``, whose random transforms crop one patch per call."""

    def __init__(self, base: Dataset[Any], times: int) -> None:
        if times < 1:
            raise ValueError(f"patches per image must be >= 1, got {times}")
        self.base = base
        self.times = times

    def __len__(self) -> int:
        return len(self.base) * self.times  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Record:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} patches")
        out = self.base[index // self.times]
        # MONAI's sampling crops return a list of num_samples (= 1) dicts
        return out[0] if isinstance(out, list) else out


class GridPatches(Dataset[Record]):
    """Every image of ``base`` tiled by ``patch_size`` patches (images at least that large).

    Segmentation labels are cut like the image; a class label stays with every patch.
    """

    def __init__(self, base: Dataset[Any], patch_size: Sequence[int], *, segmentation: bool) -> None:
        self.base = base
        self.patch_size = tuple(int(p) for p in patch_size)
        self.segmentation = segmentation
        self.index: list[tuple[int, tuple[slice, ...]]] = []
        self.shapes: list[tuple[int, ...]] = []  # each image's spatial shape
        for i in range(len(base)):  # type: ignore[arg-type]
            spatial = tuple(int(n) for n in base[i]["image"].shape[1:])
            self.shapes.append(spatial)
            for box in dense_patch_slices(spatial, self.patch_size, self.patch_size):
                self.index.append((i, tuple(slice(int(s.start), int(s.stop)) for s in box)))

    def __len__(self) -> int:
        return len(self.index)

    def stitch(self, patches: torch.Tensor) -> list[torch.Tensor]:
        """Values computed on this view's patches, put back together: one tensor per image.

        ``patches`` is (N, C, *patch) in this view's order (N = ``len(self)``); the result is a
        list of (C, *spatial) float tensors, the mean where tiles overlap (only the last tile on
        an axis overlaps, moved back to end at the border), so every voxel is covered once or more.
        Evaluation scores whole images this way, not their tiles.
        """
        if len(patches) != len(self.index):
            raise ValueError(f"expected {len(self.index)} patches (this view's), got {len(patches)}")
        channels = patches.shape[1]
        sums = [torch.zeros((channels, *shape), dtype=torch.float64) for shape in self.shapes]
        counts = [torch.zeros(shape, dtype=torch.float64) for shape in self.shapes]
        for (i, box), value in zip(self.index, patches, strict=True):
            sums[i][(slice(None), *box)] += value.double()
            counts[i][box] += 1
        return [(total / count).float() for total, count in zip(sums, counts, strict=True)]

    def volume_masks(self, probs: torch.Tensor, targets: torch.Tensor
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Segmentation outputs on the tiles as whole images: what the test metrics score.

        ``probs`` (N, C, *patch) class probabilities and ``targets`` (N, 1, *patch) reference masks,
        in this view's order. Returns per image the predicted mask (1, *spatial) (argmax of the
        stitched probabilities), the reference mask (1, *spatial) and the probabilities (C, *spatial).
        """
        volumes = self.stitch(probs)
        preds = [v.argmax(dim=0, keepdim=True) for v in volumes]
        refs = [t.round().long() for t in self.stitch(targets.float())]  # every tile holds the same labels
        return preds, refs, volumes

    def __getitem__(self, index: int) -> Record:
        item_index, box = self.index[index]
        item = self.base[item_index]
        where = (slice(None), *box)
        label = item["label"][where] if self.segmentation else item["label"]
        return {"image": item["image"][where], "label": label}

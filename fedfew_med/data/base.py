"""The ``SiteData`` contract: what training and evaluation need from a site's data.

A site exposes three splits (``train``, ``val``: a held-out slice of the training
data for model choice, ``test``: never trained or selected on) as map-style
datasets of MONAI-style dictionaries ``{"image": Tensor (C, *spatial), "label":
Tensor}``, plus the facts a model needs (task, channels, classes, spatial dims)
and JSON-able metadata recorded in the run directory. Real pipelines (NIfTI,
DICOM, 2D + CSV) fill the same contract.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

Split = Literal["train", "val", "test"]
Task = Literal["classification", "segmentation", "tabular"]


@dataclass(frozen=True)
class SiteData:
    """One site's data, split and ready to load.

    Attributes
    ----------
    name
        Site identifier (letters, digits, ``-``, ``_``, ``.``); used in logs and checkpoints.
    task
        ``classification`` (label: int class), ``segmentation`` (label: (1, *spatial) int mask)
        or ``tabular`` (image: (F,) float features, label: int class; ``in_channels`` = F,
        ``spatial_dims`` = 0).
    splits
        Map-style datasets by split name.
    in_channels, num_classes, spatial_dims
        What a network for this site must accept and produce.
    metadata
        JSON-able facts about the site (source, partition, acquisition profile...).
    """

    name: str
    task: Task
    splits: Mapping[str, Dataset[dict[str, torch.Tensor]]]
    in_channels: int
    num_classes: int
    spatial_dims: int
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
        if not self.name or set(self.name) - allowed:
            raise ValueError(f"site name must use only letters, digits, '-', '_' and '.', got {self.name!r}")
        missing = {"train", "val", "test"} - set(self.splits)
        if missing:
            raise ValueError(f"site {self.name!r}: splits {sorted(missing)} are missing")

    def size(self, split: Split) -> int:
        """Number of records in a split."""
        return len(self.splits[split])  # type: ignore[arg-type]

    def loader(
        self, split: Split, *, batch_size: int, generator: torch.Generator | None = None
    ) -> DataLoader[dict[str, torch.Tensor]]:
        """A loader over ``split``; shuffled (with ``generator``) iff a generator is given."""
        return DataLoader(
            self.splits[split],
            batch_size=batch_size,
            shuffle=generator is not None,
            generator=generator,
            num_workers=0,  # sites run one after another in one process; workers would only add start-up
            collate_fn=collate,
        )


def collate(batch: Any) -> Any:
    """Collate a list of records, or pass through a batch a dataset's ``__getitems__`` already stacked.

    In-memory datasets (``TensorDictDataset``) fetch a whole batch with one tensor index; every
    other dataset (MONAI's) returns a list of records, collated as PyTorch's default does.
    """
    if isinstance(batch, Mapping):
        return batch
    return default_collate(batch)

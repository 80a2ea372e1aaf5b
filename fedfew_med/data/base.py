"""The ``SiteData`` contract: what training and evaluation need from a site's data.

A site exposes three splits (``train``, ``val``: a held-out slice of the training
data for model choice, ``test``: never trained or selected on) as map-style
datasets of MONAI-style dictionaries ``{"image": Tensor (C, *spatial), "label":
Tensor}``, plus the facts a model needs (task, channels, classes, spatial dims)
and JSON-able metadata recorded in the run directory. Real pipelines (NIfTI,
DICOM, 2D + CSV) fill the same contract.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

Split = Literal["train", "val", "test"]
Progress = Callable[[str, int, int], None]  # (message, steps done, steps in all), for a progress bar
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

    def loader(self, split: Split, *, batch_size: int, generator: torch.Generator | None = None) -> Iterable[dict[str, torch.Tensor]]:
        """Batches of ``split``; shuffled (with ``generator``) iff a generator is given.

        An in-memory split (:class:`TensorDictDataset`) is served by :class:`TensorBatches` (one
        gather per batch, the same batches as a ``DataLoader``); any other dataset by a ``DataLoader``.
        """
        dataset = self.splits[split]
        if isinstance(dataset, TensorDictDataset):
            return TensorBatches(dataset, batch_size=batch_size, generator=generator)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=generator is not None,
            generator=generator,
            num_workers=0,  # sites run one after another in one process; workers would only add start-up
            collate_fn=collate,
        )


class TensorDictDataset(Dataset[dict[str, torch.Tensor]]):
    """In-memory ``{"image", "label"}`` records. Shapes: images (N, C, H, W), labels (N,) or (N, 1, H, W)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[index], "label": self.labels[index]}

    def __getitems__(self, indices: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """A whole batch by one tensor index; equal, bit for bit, to stacking ``self[i]`` over ``indices``."""
        idx = indices if isinstance(indices, torch.Tensor) else torch.as_tensor(indices, dtype=torch.long)
        return {"image": self.images[idx], "label": self.labels[idx]}


class TensorBatches:
    """The batches ``DataLoader(dataset, batch_size, shuffle=generator is not None, generator=generator)`` yields.

    Without the per-batch sampler and fetcher machinery, which costs about 5% of a local step
    on the small networks of the demo. The order is the DataLoader's, bit for bit, and so is the
    generator's state afterwards: per pass, one draw for the loader's (unused) worker base seed,
    the ``RandomSampler``'s permutation, and its second, empty remainder permutation. A test
    compares both over several epochs, so a change in PyTorch's internals shows up there.
    """

    def __init__(self, dataset: TensorDictDataset, *, batch_size: int, generator: torch.Generator | None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.generator = dataset, batch_size, generator

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        n, g = len(self.dataset), self.generator
        if g is None:
            order = torch.arange(n)
        else:
            torch.empty((), dtype=torch.int64).random_(generator=g)  # DataLoader's worker base seed
            order = torch.randperm(n, generator=g)
            torch.randperm(n, generator=g)  # RandomSampler's remainder draw (num_samples % n == 0 records)
        for start in range(0, n, self.batch_size):
            yield self.dataset.__getitems__(order[start : start + self.batch_size])


def collate(batch: Any) -> Any:
    """Collate a list of records, or pass through a batch a dataset's ``__getitems__`` already stacked."""
    if isinstance(batch, Mapping):
        return batch
    return default_collate(batch)

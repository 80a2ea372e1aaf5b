"""Segmentation as acquired: a network's mask on the source image's own voxel grid, and its scores there.

Training and the per-round metrics work on the preprocessed grid (reoriented, resampled, cropped,
resized or tiled into patches). A clinician's question is how the mask fits the scan as acquired, so
here the site's deterministic preprocessing (:func:`fedfew_med.data.transforms.deterministic_transforms`)
runs on the image alone with MONAI's metadata tracking on; the network runs on the whole preprocessed
image (MONAI's ``sliding_window_inference`` with the patch size when the site trains on patches); and
the class map is inverted back through every spatial transform (MONAI's ``Invertd``, nearest
neighbour) onto the source grid. Dice is then computed against the original label file, and HD95 in
millimetres from the source affine's voxel sizes. ``predict`` writes these masks; the simulation and
the Flower sites score their final round with them (``dice_native``, ``hd95_native_mm``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Compose, Invertd
from torch import nn

from fedfew_med.data.base import SiteData
from fedfew_med.data.patches import GridPatches
from fedfew_med.data.readers import ReaderSet
from fedfew_med.data.transforms import IMAGE, deterministic_transforms
from fedfew_med.metrics import segmentation_metrics
from fedfew_med.site_config import SiteConfig, load_site_config

_NIFTI = (".nii", ".nii.gz")


def image_pipeline(cfg: SiteConfig) -> Compose:
    """Training's deterministic preprocessing of the image alone (no label), keeping MONAI's metadata to invert it."""
    image_only = dataclasses.replace(cfg, site=dataclasses.replace(cfg.site, task="classification"))
    return Compose(deterministic_transforms(image_only, ReaderSet()))


def segment(network: nn.Module, cfg: SiteConfig, pipeline: Compose, image: MetaTensor) -> np.ndarray:
    """The class map of ``image`` (as ``pipeline`` made it) on the source's voxel grid: (X, Y[, Z]) uint8."""
    device = next(network.parameters()).device
    x = image.as_tensor().unsqueeze(0).float().to(device)  # (1, C, *spatial)
    logits: Any
    with torch.no_grad():
        if cfg.preprocessing.patches_per_image:  # trained on patches: slide a patch-sized window over the volume
            logits = sliding_window_inference(x, roi_size=cfg.preprocessing.spatial_size, sw_batch_size=4,
                                              predictor=network, overlap=0.25)
        else:
            logits = network(x)
    pred = MetaTensor(logits.argmax(dim=1).float().cpu(), meta=dict(image.meta),
                      applied_operations=list(image.applied_operations))
    inverted = Invertd("pred", transform=pipeline, orig_keys=IMAGE, nearest_interp=True)({IMAGE: image, "pred": pred})["pred"]
    return np.asarray(inverted[0].detach().cpu().numpy()).round().astype(np.uint8)


def is_nifti(path: Any) -> bool:
    """A NIfTI file path (the files whose affine a mask can be written back with)."""
    return isinstance(path, str | Path) and str(path).lower().endswith(_NIFTI)


def source_affine(path: str, fallback: np.ndarray) -> np.ndarray:
    """The source file's own affine when it is NIfTI (written back unchanged), else ``fallback`` (the reader's)."""
    if is_nifti(path):
        return np.asarray(nib.load(path).affine, dtype=np.float64)  # type: ignore[attr-defined]
    return fallback


def native_scores(mask: np.ndarray, label_path: str, affine: np.ndarray, num_classes: int) -> dict[str, float]:
    """Dice and HD95 (mm: the voxel sizes are the lengths of the affine's axis columns) against the original mask."""
    label = np.asarray(nib.load(label_path).dataobj)  # type: ignore[attr-defined]
    if label.shape != mask.shape:
        raise ValueError(f"label {label_path} has shape {label.shape}, the image {mask.shape}")
    spacing = np.linalg.norm(affine[: mask.ndim, : mask.ndim], axis=0)
    scores = segmentation_metrics(torch.from_numpy(mask.astype(np.int64))[None, None],
                                  torch.from_numpy(np.rint(label).astype(np.int64))[None, None], num_classes,
                                  spacing=spacing)
    return {"dice": scores["dice"], "hd95_mm": scores["hd95"]}


def stored_records(site: SiteData, split: str = "test") -> list[dict[str, Any]] | None:
    """A split's stored records (file paths), one per image (a patch site's tiles share their image's).

    None when the split is not built from records (the synthetic federation, in-memory tensors).
    """
    ds: Any = site.splits[split]
    if isinstance(ds, GridPatches):
        ds = ds.base
    records = getattr(ds, "data", None)
    if not isinstance(records, Sequence) or not all(isinstance(r, dict) and "image" in r for r in records):
        return None
    return list(records)


def native_metrics(network: nn.Module, site: SiteData) -> dict[str, float]:
    """Mean Dice and HD95 (mm) of ``network``'s masks on the site's test volumes as acquired.

    Only for segmentation sites read from NIfTI images and labels (their affines say where the
    voxels are); empty for any other site. HD95 is averaged over the cases where it is defined
    (both masks non-empty).
    """
    site_file = site.metadata.get("site_file")
    found = stored_records(site) if site.task == "segmentation" and site_file else None
    if not found or not all(is_nifti(r["image"]) and is_nifti(r.get("label")) for r in found):
        return {}
    cfg = load_site_config(site_file)  # type: ignore[arg-type]
    pipeline = image_pipeline(cfg)
    was_training = network.training
    network.eval()
    dice, hd = [], []
    for rec in found:
        image = pipeline({IMAGE: rec["image"]})[IMAGE]
        mask = segment(network, cfg, pipeline, image)
        scores = native_scores(mask, str(rec["label"]), source_affine(str(rec["image"]), np.eye(4)), site.num_classes)
        dice.append(scores["dice"])
        if not math.isnan(scores["hd95_mm"]):
            hd.append(scores["hd95_mm"])
    network.train(was_training)
    return {"dice_native": float(np.mean(dice)), "hd95_native_mm": float(np.mean(hd)) if hd else float("nan")}

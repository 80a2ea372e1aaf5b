"""A site that trains on patches is scored on whole test volumes, by the run and by the clinician report.

Reference: the deployed network run by hand on each preprocessed test volume, tile by tile (tiles
every patch size, the last one ending at the border), probabilities averaged where tiles overlap,
and Dice worked out with numpy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedfew_med.data.sites import load_site
from fedfew_med.evaluation.predict import served_model
from fedfew_med.evaluation.run import load_run
from tests.data import sitekit as kit
from tests.data.test_patches import by_hand_starts
from tests.evaluation.sitefed import federation, named

PATCH = (8, 8, 4)  # the volumes are (10, 10, 6): the last tile on every axis overlaps


@pytest.fixture(scope="module")
def patch_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("patch_volumes")
    extra = {"preprocessing": {"spatial_size": list(PATCH), "patches_per_image": 2}}
    files = [named(kit.nifti_seg_site(root / f"s{i}", n=10, **extra), f"site{i}") for i in range(2)]
    return federation(root, files, 'name = "unet"\nparams = {channels = [4, 8], strides = [2]}', rounds=2), files


def volume_dice_by_hand(network: torch.nn.Module, image: torch.Tensor, label: torch.Tensor) -> float:
    """Foreground Dice of ``network`` on one whole (C, *spatial) volume, tiled by hand."""
    spatial = image.shape[1:]
    total = np.zeros((2, *spatial))
    count = np.zeros(spatial)
    for a in by_hand_starts(spatial[0], PATCH[0]):
        for b in by_hand_starts(spatial[1], PATCH[1]):
            for c in by_hand_starts(spatial[2], PATCH[2]):
                box = (slice(a, a + PATCH[0]), slice(b, b + PATCH[1]), slice(c, c + PATCH[2]))
                with torch.no_grad():
                    probs = torch.softmax(network(image[(slice(None), *box)][None].float()), dim=1)[0]
                total[(slice(None), *box)] += probs.double().numpy()
                count[box] += 1
    pred = (total / count).argmax(axis=0) == 1
    ref = label[0].numpy() == 1
    return 1.0 if not pred.any() and not ref.any() else float(2 * (pred & ref).sum() / (pred.sum() + ref.sum()))


def test_the_runs_dice_is_the_mean_over_whole_test_volumes(patch_run: tuple[Path, list[Path]]) -> None:
    run_dir, files = patch_run
    site = load_site(files[0])
    test = site.splits["test"]
    volumes = [test.base[i] for i in range(len(test.base))]  # type: ignore[attr-defined]
    assert len(test) > len(volumes) > 0  # several tiles per volume
    network = served_model(run_dir, site).network
    want = np.mean([volume_dice_by_hand(network, v["image"], v["label"]) for v in volumes])
    summary = json.loads((run_dir / "summary.json").read_text())["per_site"]["site0"]
    assert summary["metrics"]["dice"] == pytest.approx(want, abs=1e-6)
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds[-1]["metrics"]["site0"]["dice"] == pytest.approx(want, abs=1e-6)


def test_the_clinician_report_scores_the_same_volumes(patch_run: tuple[Path, list[Path]]) -> None:
    run_dir, _ = patch_run
    run = load_run(run_dir)
    report = run.site_report("site0", n_resamples=50)
    summary = json.loads((run_dir / "summary.json").read_text())["per_site"]["site0"]
    n_volumes = len(run.site_data["site0"].splits["test"].base)  # type: ignore[attr-defined]
    assert len(report.per_case["dice"]) == len(report.targets) == n_volumes
    assert report.metrics["dice"].value == pytest.approx(summary["metrics"]["dice"], abs=1e-9)
    assert report.probs.shape[2:] == (10, 10, 6)  # whole volumes, not tiles
    assert f"over the {n_volumes} test cases" in report.metrics_table().notes[0]

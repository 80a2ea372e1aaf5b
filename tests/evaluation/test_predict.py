"""predict: a site's served model on new images, through its own preprocessing, back on the source grid."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from fedfew_med.cli import main
from fedfew_med.config import ConfigError, load_federation
from fedfew_med.data.sites import load_site
from fedfew_med.data.validate import inspect_site
from fedfew_med.evaluation.choose import choose_model, write_choice
from fedfew_med.evaluation.predict import predict, served_model
from fedfew_med.simulation import run as simulate
from fedfew_med.site_config import load_site_config
from tests.data import sitekit as kit
from tests.evaluation.sitefed import federation, named

CLASSIFIER = 'name = "classifier"\nparams = {channels = [4, 8], strides = [2, 2]}'


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    files = [named(kit.png_site(root / f"s{i}", n=16 + i, size=(8, 8)), f"site{i}") for i in range(3)]
    return federation(root, files[:2], CLASSIFIER), files


def _test_split_csv(site_file: Path, out: Path) -> tuple[Path, list[str]]:
    """The site's held-out test images as an unlabelled CSV, and their true class names."""
    cfg = load_site_config(site_file)
    items = inspect_site(cfg).splits["test"]
    names = cfg.labels.names
    truth = [names[int(i["label"])] if str(i["label"]).isdigit() else str(i["label"]) for i in items]
    kit.write_csv(out, [{"image": str(i["image"])} for i in items])
    return out, truth


def test_labels_in_the_input_are_scored(cls_run, tmp_path, capsys):
    run_dir, files = cls_run
    cfg = load_site_config(files[1])
    items = inspect_site(cfg).splits["test"]
    kit.write_csv(tmp_path / "labelled.csv", [{"image": str(i["image"]), "label": str(i["label"])} for i in items])
    assert main(["predict", str(run_dir), "--site-config", str(files[1]), "--input", str(tmp_path / "labelled.csv"),
                 "--output", str(tmp_path / "o")]) == 0
    rows = list(csv.DictReader((tmp_path / "o" / "predictions.csv").open()))
    assert all(r["correct"] == str(int(r["predicted"] == r["label"])) for r in rows)
    accuracy = json.loads((run_dir / "summary.json").read_text())["per_site"]["site1"]["metrics"]["accuracy"]
    assert f"accuracy on the {len(rows)} labelled image(s): {accuracy:.3f}" in capsys.readouterr().out


def test_predictions_on_held_out_images_match_the_sites_test_metrics(cls_run, tmp_path):
    run_dir, files = cls_run
    inputs, truth = _test_split_csv(files[1], tmp_path / "new.csv")
    result = predict(run_dir, files[1], inputs, tmp_path / "out")
    rows = list(csv.DictReader(result.table.open()))
    assert len(rows) == len(truth) and not result.skipped
    summary = json.loads((run_dir / "summary.json").read_text())["per_site"]["site1"]
    accuracy = np.mean([r["predicted"] == t for r, t in zip(rows, truth, strict=True)])
    assert accuracy == pytest.approx(summary["metrics"]["accuracy"])
    assert {r["model"] for r in rows} == {f"server model {summary['model']} (the run's deployment)"}
    for r in rows:  # class names, and probabilities that sum to 1
        assert r["predicted"] in kit.NAMES
        assert float(r["p_no_tumor"]) + float(r["p_tumor"]) == pytest.approx(1.0, abs=1e-5)


def test_bad_images_are_named_and_skipped_and_the_rest_is_predicted(cls_run, tmp_path, capsys):
    run_dir, files = cls_run
    folder = tmp_path / "new"
    for i in range(3):
        kit.write_png(folder / f"ok{i}.png", np.random.default_rng(i).integers(0, 255, size=(8, 8)))
    kit.write_png(folder / "blank.png", np.full((8, 8), 7))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code = main(["predict", str(run_dir), "--site-config", str(files[0]), "--input", str(folder), "--output", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert code == 1
    assert "3 image(s) predicted with server model" in out
    assert "skipped " + str(folder / "blank.png") + ": image is constant" in out
    assert "skipped " + str(folder / "broken.png") + ": cannot read" in out
    assert len(list(csv.DictReader((tmp_path / "o" / "predictions.csv").open()))) == 3


def test_a_new_site_predicts_with_the_model_it_chose(cls_run, tmp_path):
    run_dir, files = cls_run
    site = load_site(files[2])
    (run_dir / "choices" / "site2.json").unlink(missing_ok=True)
    with pytest.raises(ConfigError, match="site2 did not train .* choose-model"):
        served_model(run_dir, site)
    choice = choose_model(run_dir, files[2])
    write_choice(run_dir, choice)
    served = served_model(run_dir, site)
    assert served.model_index == choice.model and "chosen by choose-model" in served.how


@pytest.mark.parametrize("patches", [0, 1])
def test_segmentation_masks_are_written_on_the_source_grid(tmp_path, patches):
    extra = {"preprocessing": {"spatial_size": [8, 8, 4], "patches_per_image": patches}}
    files = [named(kit.nifti_seg_site(tmp_path / f"s{i}", **extra), f"site{i}") for i in range(2)]
    run_dir = federation(tmp_path, files, 'name = "unet"\nparams = {channels = [4, 8], strides = [2]}', rounds=1)
    images = tmp_path / "s0" / "imagesTr"
    result = predict(run_dir, files[0], images, tmp_path / "out")
    assert len(result.written) == 6 and not result.skipped
    network = served_model(run_dir, load_site(files[0])).network
    for source in sorted(images.iterdir()):
        src = nib.load(str(source))
        written = nib.load(str(tmp_path / "out" / source.name.replace(".nii.gz", "_seg.nii.gz")))
        np.testing.assert_array_equal(written.affine, src.affine)
        mask = np.asarray(written.dataobj)
        assert mask.shape == src.shape
        # by hand: LAS -> RAS is a flip of axis 0, min-max scaling, then resize (area) or sliding windows,
        # argmax, and back: nearest resize and the flip again
        x = np.flip(np.asarray(src.dataobj, dtype=np.float32), 0)
        x = (x - x.min()) / (x.max() - x.min())
        t = torch.from_numpy(x.copy())[None, None]
        with torch.no_grad():
            if patches:
                pred = sliding_window_inference(t, roi_size=(8, 8, 4), sw_batch_size=4, predictor=network, overlap=0.25).argmax(1)
            else:
                small = F.interpolate(t, size=(8, 8, 4), mode="area")
                pred = F.interpolate(network(small).argmax(1, keepdim=True).float(), size=src.shape, mode="nearest")[:, 0]
        np.testing.assert_array_equal(mask, np.flip(pred[0].numpy(), 0).astype(np.uint8))


def test_segmentation_with_labels_is_scored_on_the_source_grid_in_mm(tmp_path):
    extra = {"preprocessing": {"spatial_size": [8, 8, 4]}}
    files = [named(kit.nifti_seg_site(tmp_path / f"s{i}", **extra), f"site{i}") for i in range(2)]
    run_dir = federation(tmp_path, files, 'name = "unet"\nparams = {channels = [4, 8], strides = [2]}', rounds=1)
    folder = tmp_path / "s0"
    kit.write_csv(folder / "list.csv", [{"image": f"imagesTr/case{i}.nii.gz", "label": f"labelsTr/case{i}.nii.gz"}
                                        for i in range(3)])
    result = predict(run_dir, files[0], folder / "list.csv", tmp_path / "out")
    from monai.metrics import compute_hausdorff_distance

    for i, row in enumerate(result.rows):
        mask = np.asarray(nib.load(row["mask"]).dataobj).astype(bool)
        truth = np.asarray(nib.load(str(folder / "labelsTr" / f"case{i}.nii.gz")).dataobj).astype(bool)
        dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())  # by hand, on the source grid
        assert row["dice"] == pytest.approx(dice, abs=1e-6)
        # HD95 in mm: the sitekit affine's voxel sizes are 1.5, 1.5 and 2 mm
        onehot = [torch.from_numpy(np.stack([~m, m]))[None].float() for m in (mask, truth)]
        want = float(compute_hausdorff_distance(*onehot, percentile=95, spacing=[1.5, 1.5, 2.0])[0, 0])
        pixels = float(compute_hausdorff_distance(*onehot, percentile=95)[0, 0])
        assert row["hd95_mm"] == pytest.approx(want, abs=1e-4) and (want != pixels or want == 0)


@pytest.mark.slow  # a DP run of a ResNet: about 20 s on 2 cores
def test_a_dp_run_is_served_by_the_dp_ready_network_it_trained(tmp_path):
    files = [named(kit.png_site(tmp_path / f"s{i}", n=16, size=(8, 8)), f"site{i}") for i in range(2)]
    fed = tmp_path / "federation.toml"
    fed.write_text(
        "[run]\nrounds = 1\n[algorithm]\nname = \"fedfew\"\nparams = {k = 2}\n[training]\nbatch_size = 4\n"
        "[model]\nname = \"resnet18\"\n[privacy]\nepsilon = 8.0\ndelta = 1e-5\n"
        f"[data]\nname = \"sites\"\nparams = {{files = {json.dumps([str(f) for f in files])}}}\n"
    )
    simulate(load_federation(fed), run_dir=tmp_path / "run")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["dp_ready"] is True
    served = served_model(tmp_path / "run", load_site(files[0]))
    norms = {type(m).__name__ for m in served.network.modules() if "Norm" in type(m).__name__}
    # GroupNorm holds BatchNorm's weights under the same names and shapes: only the run's record can tell
    assert served.dp_ready and norms == {"GroupNorm"}
    csv_path, _ = _test_split_csv(files[0], tmp_path / "new.csv")
    assert not predict(tmp_path / "run", files[0], csv_path, tmp_path / "out").skipped


@pytest.mark.parametrize("patches", [0, 1])
def test_predicts_dice_on_the_test_scans_equals_the_simulations_native_dice(tmp_path, patches, capsys):
    from fedfew_med.rundir import summary_table

    extra = {"preprocessing": {"spatial_size": [8, 8, 4], "patches_per_image": patches}}
    files = [named(kit.nifti_seg_site(tmp_path / f"s{i}", n=10, **extra), f"site{i}") for i in range(2)]
    run_dir = federation(tmp_path, files, 'name = "unet"\nparams = {channels = [4, 8], strides = [2]}', rounds=1)
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = summary["per_site"]["site0"]["metrics"]
    assert {"dice_native", "hd95_native_mm"} <= set(metrics)
    assert "as acquired (each test scan's own grid, 2 site(s)): mean Dice" in summary_table(summary)
    items = inspect_site(load_site_config(files[0])).splits["test"]
    kit.write_csv(tmp_path / "test.csv", [{"image": str(i["image"]), "label": str(i["label"])} for i in items])
    rows = predict(run_dir, files[0], tmp_path / "test.csv", tmp_path / "out").rows
    assert len(rows) == len(items) > 0
    assert np.mean([r["dice"] for r in rows]) == pytest.approx(metrics["dice_native"], abs=1e-12)
    finite = [r["hd95_mm"] for r in rows if r["hd95_mm"] == r["hd95_mm"]]
    assert np.mean(finite) == pytest.approx(metrics["hd95_native_mm"], abs=1e-9)


def test_the_notebooks_new_scan_is_one_of_the_sites_test_scans(tmp_path):
    from fedfew_med.evaluation import plots
    from fedfew_med.evaluation.predict import NewScan, predict_new_scan

    extra = {"preprocessing": {"spatial_size": [8, 8, 4]}}
    files = [named(kit.nifti_seg_site(tmp_path / f"s{i}", n=8, **extra), f"site{i}") for i in range(2)]
    run_dir = federation(tmp_path, files, 'name = "unet"\nparams = {channels = [4, 8], strides = [2]}', rounds=1)
    site = load_site(files[0])
    new = predict_new_scan(run_dir, site, tmp_path / "out")
    assert isinstance(new, NewScan) and new.class_names == tuple(kit.NAMES)
    assert new.scan == str(inspect_site(load_site_config(files[0])).splits["test"][0]["image"])
    assert nib.load(new.row["mask"]).shape == nib.load(new.scan).shape
    fig = plots.new_scan(new)
    assert len(fig.axes) == 1 and "mask by server model" in fig.axes[0].get_title()

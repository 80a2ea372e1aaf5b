"""export: a site's served model as a MONAI bundle that MONAI runs (in a subprocess) with predict's results."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import monai
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, verify_net_in_out
from safetensors.torch import load_file

from fedfew_med.cli import main
from fedfew_med.config import ConfigError
from fedfew_med.data.native import image_pipeline
from fedfew_med.data.sites import load_site
from fedfew_med.dp.networks import make_dp_ready
from fedfew_med.evaluation.choose import choose_model, write_choice
from fedfew_med.evaluation.export import (
    PIL_EXACT_PNG,
    export_bundle,
    network_config,
    png_reader_for,
    preprocessing_config,
)
from fedfew_med.evaluation.predict import predict, served_model
from fedfew_med.models import build_model
from fedfew_med.runtime import ModelFacts
from fedfew_med.site_config import load_site_config
from tests.data import sitekit as kit
from tests.evaluation.sitefed import federation, named

# Probabilities: predict writes them rounded to 6 decimals (error <= 5e-7) and the bundle runs in another
# process, where another thread count may sum float32 products in another order (~1e-7): 1e-5 holds both
# with margin, and is far below any difference that could change a class.
PROB_ATOL = 1e-5

def bundle_run(bundle: Path, images: list[str], out: Path) -> list[dict[str, str]]:
    """``python -m monai.bundle run`` (MONAI's own command line) on ``images`` in a subprocess; its ``predictions.csv``."""
    config, datalist = str(bundle / "configs" / "inference.json"), json.dumps(images)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config, "--bundle_root", str(bundle),
           "--datalist", datalist, "--output_dir", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=out.parent,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    with (out / "predictions.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))




@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    """Two PNG sites trained (FedFew, K = 2) and a third that did not; 6 × 9 images (not square: a
    transposed read would change every prediction) resized to 8 × 8."""
    root = tmp_path_factory.mktemp("export")
    files = [named(kit.png_site(root / f"s{i}", n=16 + i, size=(6, 9)), f"site{i}") for i in range(3)]
    run_dir = federation(root, files[:2], 'name = "classifier"\nparams = {channels = [4, 8], strides = [2, 2]}')
    return run_dir, files


def test_the_bundle_predicts_the_classes_and_probabilities_predict_does(cls_run, tmp_path):
    run_dir, files = cls_run
    bundle = tmp_path / "bundle"
    assert main(["export", str(run_dir), "--site-config", str(files[1]), "-o", str(bundle)]) == 0
    images = files[1].parent / "img"
    ours = predict(run_dir, files[1], images, tmp_path / "predict").rows
    theirs = bundle_run(bundle, [r["image"] for r in ours], tmp_path / "out")
    assert [r["image"] for r in theirs] == [r["image"] for r in ours] and len(ours) == 17
    for a, b in zip(ours, theirs, strict=True):
        assert b["predicted"] == a["predicted"] and b["model"] == a["model"] and b["site"] == "site1"
        for name in kit.NAMES:
            assert float(b[f"p_{name}"]) == pytest.approx(float(a[f"p_{name}"]), abs=PROB_ATOL)
    # a second export into the same folder needs --force
    assert main(["export", str(run_dir), "--site-config", str(files[1]), "-o", str(bundle)]) == 2
    assert main(["export", str(run_dir), "--site-config", str(files[1]), "-o", str(bundle), "--force"]) == 0


def test_metadata_names_the_run_site_model_and_weights(cls_run, tmp_path):
    run_dir, files = cls_run
    bundle = export_bundle(run_dir, files[0], tmp_path / "b")
    meta = json.loads((bundle.root / "configs" / "metadata.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    weights = bundle.root / "models" / "model.safetensors"
    assert sorted(p.relative_to(bundle.root).as_posix() for p in bundle.root.rglob("*") if p.is_file()) == [
        "README.md", "configs/inference.json", "configs/logging.conf", "configs/metadata.json", "models/model.safetensors"]
    for key in ("version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version", "task",
                "description", "authors", "copyright", "network_data_format"):
        assert meta[key], key
    assert meta["monai_version"] == monai.__version__ and "pillow" in meta["required_packages_version"]
    assert "fedfew-med" not in meta["required_packages_version"] and bundle.targets == ()  # MONAI alone runs it
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["num_channels"] == 1 and fmt["inputs"]["image"]["spatial_shape"] == [8, 8]
    assert fmt["outputs"]["pred"]["channel_def"] == {"0": "no_tumor", "1": "tumor"}
    prov = meta["fedfew_med"]
    assert prov["site"] == "site0" and prov["server_model"] == summary["per_site"]["site0"]["model"]
    assert prov["config_digest"] == summary["config_digest"] and prov["run_models_sha256"] == summary["models_sha256"]
    assert prov["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest() == bundle.weights_sha256
    assert meta["eval_metrics"]["test_accuracy"] == summary["per_site"]["site0"]["metrics"]["accuracy"]
    # the weights are the served network's state dict, read without unpickling anything
    served = served_model(run_dir, load_site(files[0])).network.state_dict()
    saved = load_file(str(weights))
    assert saved.keys() == served.keys() and all(torch.equal(saved[k], served[k]) for k in saved)
    # MONAI's own check of network_data_format against the network
    verify_net_in_out(net_id="network_def", meta_file=str(bundle.root / "configs" / "metadata.json"),
                      config_file=str(bundle.inference), device="cpu", bundle_root=str(bundle.root))


def _without_scaling(cfg, **kwargs):
    return [t for t in preprocessing_config(cfg, **kwargs) if t["_target_"] != "ScaleIntensityd"]


def _wider(name, params, facts, **kwargs):
    return network_config(name, {**params, "channels": [4, 16]}, facts, **kwargs)


@pytest.mark.parametrize("part, sabotage, message", [
    ("preprocessing_config", _without_scaling, "preprocessing of .* differs from predict's"),
    ("network_config", _wider, "network_def does not reproduce the served network .*size mismatch"),
])
def test_a_bundle_that_would_not_reproduce_predict_is_not_written(cls_run, tmp_path, monkeypatch, part, sabotage, message):
    run_dir, files = cls_run
    monkeypatch.setattr(f"fedfew_med.evaluation.export.{part}", sabotage)
    with pytest.raises(ConfigError, match=message):
        export_bundle(run_dir, files[0], tmp_path / "b")
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its staging folder


def test_a_new_site_exports_the_model_it_chose(cls_run, tmp_path):
    run_dir, files = cls_run
    (run_dir / "choices" / "site2.json").unlink(missing_ok=True)
    with pytest.raises(ConfigError, match="site2 did not train .* choose-model"):
        export_bundle(run_dir, files[2], tmp_path / "b")
    assert not (tmp_path / "b").exists()
    choice = choose_model(run_dir, files[2])
    write_choice(run_dir, choice)
    bundle = export_bundle(run_dir, files[2], tmp_path / "b")
    prov = json.loads((bundle.root / "configs" / "metadata.json").read_text())["fedfew_med"]
    assert bundle.model_index == prov["server_model"] == choice.model
    assert "chosen by choose-model" in prov["served_by"]


# --------------------------------------------------------------------------- PNG: PIL against fedfew-med's reader

_RNG = np.random.default_rng(3)
PNG_KINDS = {  # name: (samples (H, W[, C]), colour type, bit depth)
    "grey1": (_RNG.integers(0, 2, (5, 7)), 0, 1),
    "grey8": (_RNG.integers(0, 256, (5, 7)), 0, 8),
    "grey16": (_RNG.integers(0, 65536, (5, 7)), 0, 16),
    "rgb8": (_RNG.integers(0, 256, (5, 7, 3)), 2, 8),
    "grey_alpha8": (_RNG.integers(0, 256, (5, 7, 2)), 4, 8),
    "rgba8": (_RNG.integers(0, 256, (5, 7, 4)), 6, 8),
    "palette1": (_RNG.integers(0, 2, (5, 7)), 3, 1),
    "palette2": (_RNG.integers(0, 4, (5, 7)), 3, 2),
    "palette4": (_RNG.integers(0, 16, (5, 7)), 3, 4),
    "palette8": (_RNG.integers(0, 256, (5, 7)), 3, 8),
}


def _png(path: Path, kind: str) -> Path:
    samples, colour, depth = PNG_KINDS[kind]
    palette = _RNG.integers(0, 256, (2**depth, 3)) if colour == 3 else None
    path.write_bytes(kit.encode_png(samples, colour_type=colour, bit_depth=depth, palette=palette))
    return path


def _site_cfg(tmp_path: Path, **pre):
    cfg = load_site_config(kit.png_site(tmp_path / "site", n=3, size=(5, 7)))
    return dataclasses.replace(cfg, preprocessing=dataclasses.replace(cfg.preprocessing, **pre))


def _bundle_pipeline(cfg, png: str = "pil"):
    return ConfigParser({"pre": {"_target_": "Compose", "transforms": preprocessing_config(cfg, png=png)}}).get_parsed_content("pre")


@pytest.mark.parametrize("kind", sorted(PNG_KINDS))
@pytest.mark.parametrize("channels", [0, 1, 3])
def test_the_bundles_png_reading_gives_predicts_tensors(tmp_path, kind, channels):
    samples, colour, depth = PNG_KINDS[kind]
    assert (colour, depth) in PIL_EXACT_PNG
    path = _png(tmp_path / "x.png", kind)
    cfg = _site_cfg(tmp_path, spatial_size=(9, 4), channels=channels)
    ours = image_pipeline(cfg)({"image": str(path)})["image"]
    theirs = _bundle_pipeline(cfg)({"image": str(path)})["image"]
    assert theirs.dtype == ours.dtype == torch.float32 and theirs.shape == ours.shape
    assert torch.equal(theirs.as_tensor(), ours.as_tensor())


def test_the_bundles_png_axes_are_width_then_height(tmp_path):
    path = _png(tmp_path / "x.png", "grey8")
    cfg = _site_cfg(tmp_path, spatial_size=(7, 5), intensity="none")  # (W, H): the resize changes nothing
    image = _bundle_pipeline(cfg)({"image": str(path)})["image"]
    np.testing.assert_array_equal(image[0].numpy(), PNG_KINDS["grey8"][0].T.astype(np.float32))


def test_png_kinds_pil_reads_inexactly_get_fedfew_meds_reader(tmp_path):
    cfg = _site_cfg(tmp_path, spatial_size=(8, 8))
    assert png_reader_for(cfg) == "pil"
    rgb16 = _RNG.integers(0, 65536, (5, 7, 3))
    path = cfg.paths.root / "img" / "im01.png"
    path.write_bytes(kit.encode_png(rgb16, colour_type=2, bit_depth=16))
    assert png_reader_for(cfg) == "fedfew"
    ours = image_pipeline(cfg)({"image": str(path)})["image"]
    assert torch.equal(_bundle_pipeline(cfg, png="fedfew")({"image": str(path)})["image"].as_tensor(), ours.as_tensor())
    # why: PIL reads 16-bit colour at 8 bits
    assert not torch.equal(_bundle_pipeline(cfg, png="pil")({"image": str(path)})["image"].as_tensor(), ours.as_tensor())


def test_every_png_kind_read_by_pil_is_checked_above():
    assert {(colour, depth) for _, colour, depth in PNG_KINDS.values()} == PIL_EXACT_PNG


# --------------------------------------------------------------------------- volumes: NIfTI and DICOM


@pytest.mark.parametrize("pre, volumes", [
    ({"intensity": "zscore", "spacing": (2.0, 2.5, 3.0), "crop_foreground": True}, 1),
    ({"intensity": "window", "a_min": -1.0, "a_max": 1.0, "orientation": "", "patches_per_image": 1}, 1),
    ({"volume_4d": "first"}, 3),
    ({"volume_4d": "channels", "channels": 1}, 3),
], ids=["zscore-spacing-crop", "window-native-pad", "4d-first", "4d-channels-averaged"])
def test_the_bundles_volume_preprocessing_gives_predicts_tensors(tmp_path, pre, volumes):
    cfg = load_site_config(kit.nifti_seg_site(tmp_path / "site", n=2))
    cfg = dataclasses.replace(cfg, preprocessing=dataclasses.replace(cfg.preprocessing, spatial_size=(6, 5, 4), **pre))
    data = np.random.default_rng(5).normal(size=(9, 7, 5, volumes)).astype(np.float32)
    data[:2] = data.min() - 1  # a dark border for CropForegroundd
    path = kit.write_nifti(tmp_path / "x.nii.gz", data if volumes > 1 else data[..., 0])
    ours = image_pipeline(cfg)({"image": str(path)})["image"]
    theirs = _bundle_pipeline(cfg)({"image": str(path)})["image"]
    assert theirs.shape == ours.shape and torch.equal(theirs.as_tensor(), ours.as_tensor())
    np.testing.assert_array_equal(theirs.affine.numpy(), ours.affine.numpy())


def test_a_dicom_sites_bundle_stacks_series_as_fedfew_med_does(tmp_path):
    cfg = load_site_config(kit.dicom_site(tmp_path / "site", n=2))
    readers = preprocessing_config(cfg)[0]["reader"]
    assert readers[-1] == {"_target_": "fedfew_med.data.dicom.SeriesDicomReader"}  # tried first
    series = str(cfg.paths.images / "pat1")
    ours, theirs = image_pipeline(cfg)({"image": series})["image"], _bundle_pipeline(cfg)({"image": series})["image"]
    assert theirs.shape == ours.shape and torch.equal(theirs.as_tensor(), ours.as_tensor())


# --------------------------------------------------------------------------- networks


@pytest.mark.parametrize("name, params, dims, task", [
    ("classifier", {"channels": [4, 8], "strides": [2, 2]}, 2, "classification"),
    ("smallcnn", {"hidden": 16}, 2, "classification"),
    ("pflcnn", {"hidden": 16}, 2, "classification"),
    ("densenet121", {}, 2, "classification"),
    ("resnet18", {}, 2, "classification"),
    ("unet", {"channels": [4, 8], "strides": [2]}, 3, "segmentation"),
    ("basicunet", {"features": [4, 4, 8, 8, 16, 4]}, 3, "segmentation"),
])
@pytest.mark.parametrize("dp", [False, True])
def test_the_bundles_network_is_the_one_fedfew_med_builds(name, params, dims, task, dp):
    size = 32  # DenseNet121 and BasicUNet halve their input 5 and 4 times
    facts = ModelFacts(task, in_channels=2, num_classes=3, spatial_dims=dims, image_size=size)
    spec = network_config(name, params, facts, dp_ready=dp)
    assert spec["_target_"] == ("fedfew_med.dp.networks.make_dp_ready" if dp else spec["_target_"])
    inner = spec["module"] if dp else spec
    assert inner["_target_"].startswith("fedfew_med.models." if name in ("smallcnn", "pflcnn") else "monai.networks.nets.")
    want = build_model(name, params, task=task, in_channels=2, num_classes=3, spatial_dims=dims, image_size=size, seed=1)
    want = (make_dp_ready(want) if dp else want).eval()
    got = ConfigParser({"net": spec}).get_parsed_content("net").eval()
    got.load_state_dict(want.state_dict(), strict=True)
    x = torch.rand((1, 2, *([size] * dims)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(got(x), want(x))


# --------------------------------------------------------------------------- segmentation


@pytest.mark.parametrize("extra", [
    {"spacing": [2.0, 2.0, 3.0], "crop_foreground": True},  # resampled, cropped, resized: all inverted
    {"patches_per_image": 1},  # trained on patches: a sliding window over the padded volume
], ids=["resized", "patches"])
def test_the_bundle_writes_predicts_masks_on_the_source_grid(tmp_path, extra):
    pre = {"preprocessing": {"spatial_size": [8, 8, 4], **extra}}
    files = [named(kit.nifti_seg_site(tmp_path / f"s{i}", **pre), f"site{i}") for i in range(2)]
    run_dir = federation(tmp_path, files, 'name = "unet"\nparams = {channels = [4, 8], strides = [2]}', rounds=1)
    bundle = export_bundle(run_dir, files[0], tmp_path / "bundle")
    inferer = json.loads(bundle.inference.read_text())["inferer"]
    if extra.get("patches_per_image"):
        assert inferer == {"_target_": "SlidingWindowInferer", "roi_size": [8, 8, 4], "sw_batch_size": 4, "overlap": 0.25}
    else:
        assert inferer == {"_target_": "SimpleInferer"}
    images = sorted((tmp_path / "s0" / "imagesTr").iterdir())
    ours = predict(run_dir, files[0], images[0].parent, tmp_path / "predict")
    theirs = bundle_run(bundle.root, [str(p) for p in images], tmp_path / "out")
    assert len(theirs) == len(ours.rows) == 6
    for a, b, source in zip(ours.rows, theirs, images, strict=True):
        assert a["image"] == b["image"] == str(source)
        assert [b[f"voxels_{n}"] for n in kit.NAMES] == [str(a[f"voxels_{n}"]) for n in kit.NAMES]
        mine, bundled, src = nib.load(a["mask"]), nib.load(b["mask"]), nib.load(str(source))
        assert Path(b["mask"]).name == Path(a["mask"]).name == source.name.replace(".nii.gz", "_seg.nii.gz")
        assert bundled.shape == src.shape and bundled.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(bundled.affine, src.affine)
        np.testing.assert_array_equal(np.asarray(bundled.dataobj), np.asarray(mine.dataobj))  # exact, not a Dice
    assert {int(b["voxels_tumor"]) > 0 for b in theirs} != {False}  # not a blank map: the comparison means something

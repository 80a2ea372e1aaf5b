"""A site's deployed model on images it has never seen (``fedfew-med predict``).

Which model: the one the run deploys for the site (its own K losses, personal model or
fine-tuning, exactly as the run's evaluation, from the latest checkpoint), or, for a site that
did not train, the one it picked with ``choose-model`` (``RUN_DIR/choices/<site>.json``).
What it reads: a file, a folder (every image in it; a folder of ``.dcm`` files is one DICOM
series), a CSV with the site's image column, or an MSD-style datalist (JSON), through the
site's own preprocessing (the deterministic part of training's pipeline, :mod:`fedfew_med.data.transforms`).
A tabular site reads a CSV of rows with its feature columns (:mod:`fedfew_med.evaluation.predict_rows`).

Classification writes ``predictions.csv``: one row per image with the class *name*, the class
probabilities and the model used. Segmentation runs MONAI's ``sliding_window_inference`` when
the site trained on patches (``[preprocessing].patches_per_image``), else the network on the
resized image, inverts the spatial preprocessing (MONAI's ``Invertd``, nearest-neighbour) back
to the source's voxel grid and writes ``<name>_seg.nii.gz`` with the source's affine, listed in
``predictions.csv``. An image that ``validate-site`` would refuse is skipped with the same
message and listed; nothing else is lost.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from fedfew_med import checkpoint
from fedfew_med.config import ConfigError
from fedfew_med.data import SiteData
from fedfew_med.data.native import image_pipeline, native_scores, segment, source_affine, stored_records
from fedfew_med.data.readers import ReaderSet
from fedfew_med.data.sites import load_site
from fedfew_med.data.tables import class_index
from fedfew_med.data.transforms import IMAGE
from fedfew_med.data.validate import check_image
from fedfew_med.deployment import chooser, load_released
from fedfew_med.dp.federation import site_privacy_options
from fedfew_med.evaluation.choose import read_choice, read_summary, run_config, run_dp_ready, site_preparer
from fedfew_med.evaluation.predict_rows import predict_rows, scored_row
from fedfew_med.runtime import ModelFacts, local_runtimes, make_algorithm
from fedfew_med.site_config import SiteConfig, load_site_config
from fedfew_med.training import SiteState

_IMAGE_SUFFIXES = (".nii", ".nii.gz", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".npy", ".dcm")


@dataclass(frozen=True)
class Served:
    """The model that serves a site, and how it was decided (said in every output row)."""

    network: torch.nn.Module
    model_index: int | None  # the server model's index; None for a site-local (personal) model
    how: str  # e.g. "server model 1 (the run's deployment)"
    dp_ready: bool = False  # the network is the DP-ready rewrite (GroupNorm for BatchNorm)


@dataclass
class Prediction:
    """What ``predict`` wrote and what it skipped."""

    table: Path
    written: list[Path] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (input, why)
    unit: str = "image"  # what a row of predictions.csv is: an image, or a tabular site's CSV row


def served_model(run_dir: str | Path, site: SiteData) -> Served:
    """The model the run deploys for ``site``, or the one the site chose with ``choose-model``.

    Raises
    ------
    ConfigError
        The site neither trained in the run nor chose a model.
    fedfew_med.checkpoint.CheckpointError
        The checkpoint is missing, corrupt or was made with another config.
    """
    run_dir = Path(run_dir)
    config = run_config(run_dir)
    ckpt = checkpoint.load(run_dir)
    if ckpt is None:
        raise checkpoint.CheckpointError(f"{run_dir}: no completed round (checkpoints/LATEST is missing)")
    if ckpt.state.get("config_digest") != config.digest():
        raise checkpoint.CheckpointError(f"{run_dir}: the latest checkpoint was made with a different config than config.json")
    facts = ModelFacts.common([site])
    choice = read_choice(run_dir, site.name)
    summary = read_summary(run_dir)
    trained = site.name in ckpt.sites or site.name in summary.get("per_site", {})
    if choice is None and not trained:
        raise ConfigError(f"site {site.name} did not train in {run_dir} and has chosen no model: run "
                          f"`fedfew-med choose-model {run_dir} --site-config <its site file>` first")
    state = ckpt.sites.get(site.name, SiteState())
    reference = ckpt.server_models[0] if ckpt.server_models else next(iter(state.models.values()))
    prepare = site_preparer(config, facts, reference, run_dp_ready(summary))
    algorithm, _ = make_algorithm(config, facts, prepare)
    runtime = local_runtimes(config, [site], algorithm, prepare=prepare)[site.name]
    work = runtime.work(ckpt.round, state.copy())
    if trained:  # exactly the run's evaluation (SiteRuntime.evaluate): its K losses, personal model, fine-tuning
        private = site_privacy_options(config, site) is not None  # by its released losses, as in the run
        released = load_released(ckpt.state.get("released_losses")).get(site.name)
        dep = algorithm.deploy(site.name, ckpt.server_models, chooser(work, site=site.name, private=private, released=released))
        kind = "site-local model" if dep.model_index is None else f"server model {dep.model_index}"
        how = f"{kind} (the run's deployment{', fine-tuned' if dep.slot == 'finetune' else ''})"
        return Served(work.deployed_network(dep.params, slot=dep.slot), dep.model_index, how, prepare is not None)
    assert choice is not None
    k = choice.model
    return Served(work.deployed_network(ckpt.server_models[k], slot=f"server/{k}"), k,
                  f"server model {k} (chosen by choose-model, margin {choice.margin:.4f})", prepare is not None)


Labelled = tuple[str, str | None]  # an image, and its label (a class name or index, or a mask path) when given


def list_inputs(path: str | Path, cfg: SiteConfig) -> list[Labelled]:
    """The images under ``path``, each with its label when the input gives one.

    A file; a folder (recursively; a folder of .dcm files is one series); a CSV with the site's
    image column (and its label column, if present); or a datalist (JSON list, or MSD
    ``dataset.json`` sections, entries with ``"label"`` when labelled).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--input {p}: no such file or folder")
    if p.is_dir():
        if any(f.suffix.lower() == ".dcm" for f in p.iterdir() if f.is_file()):
            return [(str(p), None)]
        out: list[Labelled] = []
        for child in sorted(p.iterdir()):
            if child.is_dir():
                out += list_inputs(child, cfg)
            elif any(child.name.lower().endswith(s) for s in _IMAGE_SUFFIXES):
                out.append((str(child), None))
        return out
    if p.suffix.lower() == ".csv":
        with p.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            column = cfg.source.image_column
            if column not in (reader.fieldnames or []):
                raise ValueError(f"--input {p}: no column {column!r} (the site's [source].image_column); "
                                 f"it has {', '.join(reader.fieldnames or [])}")
            labelled = cfg.source.label_column in (reader.fieldnames or [])
            return [(str(p.parent / row[column]), _label(row[cfg.source.label_column], p.parent, cfg) if labelled else None)
                    for row in reader if row[column]]
    if p.suffix.lower() == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        entries = data if isinstance(data, list) else data.get("test", data.get(cfg.source.datalist_key, []))
        return [(str(p.parent / e["image"]), _label(e["label"], p.parent, cfg) if "label" in e else None)
                if isinstance(e, dict) else (str(p.parent / e), None) for e in entries]
    return [(str(p), None)]


def _label(value: Any, base: Path, cfg: SiteConfig) -> str | None:
    """A label cell: a mask path (segmentation, relative to the list's folder) or a class; empty: none."""
    text = str(value).strip()
    if not text:
        return None
    return str(base / text) if cfg.site.task == "segmentation" else text


def predict(run_dir: str | Path, site_config: str | Path, inputs: str | Path, output: str | Path, *,
            on_image: Callable[[int, int, str], None] | None = None) -> Prediction:
    """Run the site's served model on ``inputs`` and write the results into ``output``.

    Parameters
    ----------
    run_dir
        The run directory.
    site_config
        The site's TOML file: its data decide the deployment (as in the run) and its
        ``[preprocessing]`` and ``[labels]`` are applied to the inputs.
    inputs
        See :func:`list_inputs`; for a tabular site, a CSV of rows (:func:`~fedfew_med.evaluation.predict_rows.predict_rows`).
    output
        Folder for ``predictions.csv`` (and the segmentation masks).
    on_image
        Called with (done, total, input) after each image, for a progress bar.
    """
    cfg = load_site_config(site_config)
    site = load_site(site_config, feature_order=read_summary(Path(run_dir)).get("features"))  # tabular: the run's order
    served = served_model(run_dir, site)
    out_dir = Path(output)
    if cfg.site.task == "tabular":
        rows = predict_rows(cfg, site, served.network, served.how, inputs, on_row=on_image)
        out_dir.mkdir(parents=True, exist_ok=True)
        result = Prediction(table=out_dir / "predictions.csv", rows=rows.rows, skipped=rows.skipped, unit="row")
        _write_table(result.table, result.rows)
        return result
    items = list_inputs(inputs, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = Prediction(table=out_dir / "predictions.csv")
    pipeline = image_pipeline(cfg)
    readers = ReaderSet()
    names = list(cfg.labels.names)
    for i, (item, label) in enumerate(items):
        problems = check_image(cfg, item, readers)
        if problems:
            result.skipped.append((item, problems[0].message))
        else:
            try:
                image = pipeline({IMAGE: item})[IMAGE]
                if image.shape[0] != site.in_channels:
                    raise ValueError(f"{image.shape[0]} channels after preprocessing, the model takes {site.in_channels}")
                row: dict[str, Any] = {"image": item, "site": site.name, "model": served.how}
                if cfg.site.task == "segmentation":
                    mask = segment(served.network, cfg, pipeline, image)
                    stem = Path(item).name.split(".")[0] or f"image{i}"
                    path = out_dir / f"{stem}_seg.nii.gz"
                    fallback = np.asarray(image.meta.get("original_affine", np.eye(4)), dtype=np.float64)
                    nib.save(nib.Nifti1Image(mask, source_affine(item, fallback)), str(path))
                    result.written.append(path)
                    row.update({"mask": str(path), **{f"voxels_{n}": int((mask == c).sum()) for c, n in enumerate(names)}})
                    if label is not None:  # scored as acquired: on the source grid, HD95 in mm
                        row.update(native_scores(mask, label, source_affine(item, fallback), len(names)))
                else:
                    with torch.no_grad():
                        probs = torch.softmax(served.network(image.as_tensor().unsqueeze(0).float()), dim=1)[0]
                    row = scored_row(row, probs, None if label is None else class_index(label, names), names)
                result.rows.append(row)
            except Exception as exc:  # one unreadable or unusable image must not lose the others
                result.skipped.append((item, f"{type(exc).__name__}: {exc}"))
        if on_image:
            on_image(i + 1, len(items), item)
    _write_table(result.table, result.rows)
    return result


def _write_table(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields or ["image"])
    writer.writeheader()
    writer.writerows(rows)
    checkpoint.atomic_write_text(path, buffer.getvalue())


@dataclass(frozen=True)
class NewScan:
    """One prediction on a scan the site's model never trained on, for the clinician notebook."""

    scan: str  # the input image (one of the site's test scans)
    row: dict[str, Any]  # its row of predictions.csv: the class and probabilities, or the mask; the model
    class_names: tuple[str, ...]


def predict_new_scan(run_dir: str | Path, site: SiteData, output: str | Path) -> NewScan | str:
    """``predict`` on the first scan of ``site``'s test split (never trained on, as a new patient's would be).

    Returns the prediction, or a sentence saying why there is none (the site is not read from
    site files, as in the synthetic federation, is tabular, or the scan was skipped).
    """
    site_file = site.metadata.get("site_file")
    if site.task == "tabular":
        return (f"{site.name}: a tabular site has rows, not scans: `fedfew-med predict RUN_DIR --site-config {site_file} "
                "--input new_rows.csv --output OUT` scores new rows")
    found = stored_records(site, "test") if site_file else None
    if not site_file or not found:
        return f"{site.name}: its data are not read from a site file (synthetic data), so there is no scan to predict on"
    scan = found[0]["image"]
    scan = scan[0] if isinstance(scan, list) else str(scan)
    result = predict(run_dir, str(site_file), scan, output)
    if not result.rows:
        return f"{scan} was skipped: {result.skipped[0][1] if result.skipped else 'no output'}"
    return NewScan(scan=scan, row=result.rows[0], class_names=tuple(load_site_config(str(site_file)).labels.names))

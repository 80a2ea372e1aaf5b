"""A site's served model as a MONAI bundle (``fedfew-med export``).

The bundle holds the model that serves the site (the run's deployment, or the model the site
picked with ``choose-model``; :func:`~fedfew_med.evaluation.predict.served_model`), the site's
preprocessing written as MONAI transforms, and a ``run`` workflow that writes what ``predict``
writes. Layout::

    DIR/configs/metadata.json     MONAI's bundle metadata (versions, task, network_data_format...)
                                  and "fedfew_med": run, site, server model, config digest, SHA-256
    DIR/configs/inference.json    LoadImaged ... Resized | SpatialPadd, the network, the inferer,
                                  postprocessing, and "run" over "datalist"
    DIR/configs/logging.conf      the model zoo's console logging
    DIR/models/model.safetensors  the network's state dict (loaded with safetensors: no pickle)
    DIR/README.md                 how to run it, what it writes, what it does not check

and it runs with MONAI alone where MONAI has the network (every network of
:mod:`fedfew_med.models` but ``smallcnn`` / ``pflcnn``) and the site's images are NIfTI, NumPy
or PNG kinds that PIL reads exactly; otherwise the few ``_target_`` s from fedfew-med are
listed in the metadata's ``required_packages_version`` and ``fedfew_med.targets``::

    python -m monai.bundle run --config_file DIR/configs/inference.json --bundle_root DIR \\
        --datalist "['scan1.png', 'scan2.png']" --output_dir out

Classification writes ``out/predictions.csv`` (image, site, model, predicted class name, one
probability per class, as ``predict``); segmentation writes ``<name>_seg.nii.gz`` on the source's
voxel grid (MONAI's ``Invertd``, nearest neighbour; ``SaveImaged``) and ``predictions.csv`` with
the voxels per class. Before anything is written the export checks its own bundle: the network
built from ``inference.json`` with the saved weights gives the served network's outputs, and the
bundle's preprocessing gives ``predict``'s tensors on the site's first images, bit for bit.

PNG files: fedfew-med decodes PNG itself (:mod:`fedfew_med.data.png`, (W, H) like MONAI's
``PILReader`` with ``reverse_indexing``, alpha dropped, palettes expanded). MONAI's ``PILReader``
with the converter written into the bundle (grey + alpha to grey, RGBA and palettes to RGB) reads
grey PNGs of 1, 8 and 16 bits, 8-bit colour, grey + alpha, RGBA and palette PNGs to the same
array; PIL rescales 2- and 4-bit grey and reads 16-bit colour at 8 bits, so a site with such
files gets fedfew-med's ``PNGReader`` in its bundle instead.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import monai
import numpy as np
import torch
from monai.bundle import ConfigParser
from safetensors.torch import load_file, save_file
from torch import nn

from fedfew_med import checkpoint
from fedfew_med.config import ConfigError, FederationConfig
from fedfew_med.data.native import image_pipeline
from fedfew_med.data.sites import load_site
from fedfew_med.data.sources import list_items
from fedfew_med.data.transforms import IMAGE
from fedfew_med.evaluation.choose import run_config
from fedfew_med.evaluation.predict import Served, served_model
from fedfew_med.runtime import ModelFacts
from fedfew_med.site_config import SiteConfig, load_site_config

log = logging.getLogger(__name__)

BUNDLE_VERSION = "0.1.0"
META_SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
WEIGHTS = "models/model.safetensors"
VERIFY_IMAGES = 2  # site images whose bundle preprocessing is compared with predict's at export
NETWORK_ATOL = 1e-6  # same architecture, same weights, same input, same process: equal outputs

# (colour type, bit depth) of the PNG kinds that PIL plus the bundle's converter reads exactly as
# fedfew_med.data.png does (tests/evaluation/test_export.py checks each against predict's pipeline)
PIL_EXACT_PNG = frozenset({(0, 1), (0, 8), (0, 16), (2, 8), (4, 8), (6, 8), (3, 1), (3, 2), (3, 4), (3, 8)})
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PIL opens lazily: convert a PNG's mode (before its pixels are read) to the channels fedfew-med decodes
PIL_CONVERTER = ("$lambda im: im.convert('L') if im.format == 'PNG' and im.mode == 'LA' else "
                 "(im.convert('RGB') if im.format == 'PNG' and im.mode in ('RGBA', 'P', 'PA') else im)")
PngReader = Literal["pil", "fedfew"]

LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


@dataclass(frozen=True)
class Bundle:
    """What :func:`export_bundle` wrote.

    Attributes
    ----------
    root
        The bundle folder.
    site, model_index, how
        The site, the server model that serves it (None: a site-local model) and how it was decided.
    weights_sha256
        SHA-256 of ``models/model.safetensors``.
    targets
        ``_target_`` s of ``inference.json`` that come from fedfew-med (empty: MONAI alone runs it).
    """

    root: Path
    site: str
    model_index: int | None
    how: str
    weights_sha256: str
    targets: tuple[str, ...]

    @property
    def inference(self) -> Path:
        """``configs/inference.json``."""
        return self.root / "configs" / "inference.json"


# --------------------------------------------------------------------------- the network


def network_config(name: str, params: Mapping[str, Any], facts: ModelFacts, *, dp_ready: bool) -> dict[str, Any]:
    """Network ``name`` (``[model]``) as a bundle component: its MONAI class and the arguments :mod:`fedfew_med.models` gives it.

    ``smallcnn`` and ``pflcnn`` have no MONAI class (``fedfew_med.models.SmallCNN``); a DP-ready
    network (GroupNorm for BatchNorm, as the run trained it) is wrapped in
    ``fedfew_med.dp.networks.make_dp_ready``.

    Raises
    ------
    ConfigError
        For a tabular network (bundles read images).
    """
    p, c, k = params, facts.in_channels, facts.num_classes
    d, s = facts.spatial_dims, facts.image_size
    spec: dict[str, Any]
    if name == "classifier":
        channels = [int(v) for v in p.get("channels", (8, 16, 32))]
        spec = {"_target_": "monai.networks.nets.Classifier", "in_shape": [c, *([s] * d)], "classes": k,
                "channels": channels, "strides": [int(v) for v in p.get("strides", [2] * len(channels))],
                "num_res_units": int(p.get("num_res_units", 1)), "norm": p.get("norm", "INSTANCE")}
    elif name in ("smallcnn", "pflcnn"):
        spec = {"_target_": "fedfew_med.models.SmallCNN", "in_channels": c, "num_classes": k, "image_size": s,
                "hidden": int(p.get("hidden", 512)), "padding": 2 if name == "smallcnn" else 0}
    elif name == "densenet121":
        spec = {"_target_": "monai.networks.nets.DenseNet121", "spatial_dims": d, "in_channels": c, "out_channels": k}
    elif name == "resnet18":
        spec = {"_target_": "monai.networks.nets.resnet18", "spatial_dims": d, "n_input_channels": c, "num_classes": k}
    elif name == "unet":
        spec = {"_target_": "monai.networks.nets.UNet", "spatial_dims": d, "in_channels": c, "out_channels": k,
                "channels": [int(v) for v in p.get("channels", (8, 16, 32))],
                "strides": [int(v) for v in p.get("strides", (2, 2))],
                "num_res_units": int(p.get("num_res_units", 1)), "norm": p.get("norm", "INSTANCE")}
    elif name == "basicunet":
        spec = {"_target_": "monai.networks.nets.BasicUNet", "spatial_dims": d, "in_channels": c, "out_channels": k,
                "features": [int(v) for v in p.get("features", (8, 8, 16, 32, 64, 8))]}
    else:
        raise ConfigError(f"[model].name {name!r} is not an image network; a MONAI bundle reads images")
    if dp_ready:
        spec = {"_target_": "fedfew_med.dp.networks.make_dp_ready", "module": spec}
    return spec


# --------------------------------------------------------------------------- the preprocessing


def _png_kind(path: Path) -> tuple[int, int] | None:
    """(colour type, bit depth) from a PNG's IHDR chunk; None when the file is not a readable PNG."""
    try:
        with path.open("rb") as fh:
            head = fh.read(26)  # signature (8), IHDR length and type (8), width, height, depth, colour
    except OSError:
        return None
    if len(head) < 26 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    return head[25], head[24]


def png_reader_for(cfg: SiteConfig) -> PngReader:
    """``"pil"`` (MONAI's ``PILReader``) when every PNG of the site is a kind PIL reads exactly, else ``"fedfew"``."""
    for item in list_items(cfg).items:
        images = item.get(IMAGE)
        for image in images if isinstance(images, list) else [images]:
            if str(image).lower().endswith(".png"):
                kind = _png_kind(Path(str(image)))
                if kind is not None and kind not in PIL_EXACT_PNG:
                    log.info("%s: PNG colour type %d, bit depth %d is not read exactly by PIL; the bundle "
                             "reads PNG with fedfew_med.data.png.PNGReader", image, *kind)
                    return "fedfew"
    return "pil"


def _readers(cfg: SiteConfig, png: PngReader) -> list[dict[str, Any]]:
    # LoadImage tries the readers given last first (and MONAI's defaults after them): the likeliest last
    readers: list[dict[str, Any]] = [{"_target_": "NumpyReader", "allow_pickle": False}, {"_target_": "NibabelReader"}]
    if len(cfg.preprocessing.spatial_size) == 2:
        readers.append({"_target_": "PILReader", "converter": PIL_CONVERTER, "reverse_indexing": True} if png == "pil"
                       else {"_target_": "fedfew_med.data.png.PNGReader"})
    if cfg.source.kind == "dicom_series":  # MONAI's PydicomReader stacks by InstanceNumber: see fedfew_med.data.dicom
        readers.append({"_target_": "fedfew_med.data.dicom.SeriesDicomReader"})
    return readers


def preprocessing_config(cfg: SiteConfig, *, png: PngReader = "pil") -> list[dict[str, Any]]:
    """The site's deterministic preprocessing of an image (``predict``'s) as MONAI dictionary transforms.

    ``LoadImaged`` (float32, channel first) → volume / channel handling → ``Orientationd`` →
    ``Spacingd`` → intensity → ``CropForegroundd`` → ``SpatialPadd`` (trained on patches) or
    ``Resized`` (area), each only where ``[preprocessing]`` asks for it, on the key ``"image"``.
    """
    pre = cfg.preprocessing
    ndim = len(pre.spatial_size)
    out: list[dict[str, Any]] = [{"_target_": "LoadImaged", "keys": IMAGE, "reader": _readers(cfg, png),
                                  "image_only": True, "ensure_channel_first": True, "dtype": "$numpy.float32"}]
    if pre.volume_4d == "first":  # a 4-D NIfTI's volumes are its channels once read: keep the first
        out.append({"_target_": "Lambdad", "keys": IMAGE, "func": "$lambda x: x[:1]"})
    if pre.channels == 1:  # colour averaged to grey (fedfew_med.data.transforms.ToChannelsd)
        out.append({"_target_": "Lambdad", "keys": IMAGE,
                    "func": "$lambda x: x if x.shape[0] == 1 else x.mean(dim=0, keepdim=True)"})
    elif pre.channels == 3:  # grey repeated to 3 channels
        out.append({"_target_": "Lambdad", "keys": IMAGE,
                    "func": "$lambda x: x.repeat(3, *([1] * (x.ndim - 1))) if x.shape[0] == 1 else x"})
    if pre.orientation:
        out.append({"_target_": "Orientationd", "keys": IMAGE, "axcodes": pre.orientation.upper()[:ndim], "labels": None})
    if pre.spacing:
        out.append({"_target_": "Spacingd", "keys": IMAGE, "pixdim": list(pre.spacing), "mode": "bilinear"})
    if pre.intensity == "minmax":
        out.append({"_target_": "ScaleIntensityd", "keys": IMAGE, "minv": 0.0, "maxv": 1.0})
    elif pre.intensity == "zscore":
        out.append({"_target_": "NormalizeIntensityd", "keys": IMAGE, "channel_wise": True})
    elif pre.intensity == "window":
        out.append({"_target_": "ScaleIntensityRanged", "keys": IMAGE, "a_min": pre.a_min, "a_max": pre.a_max,
                    "b_min": 0.0, "b_max": 1.0, "clip": True})
    if pre.crop_foreground:  # everything brighter than the darkest value, as in training
        out.append({"_target_": "CropForegroundd", "keys": IMAGE, "source_key": IMAGE,
                    "select_fn": "$lambda x: x > x.min()", "allow_smaller": True})
    if pre.patches_per_image:
        out.append({"_target_": "SpatialPadd", "keys": IMAGE, "spatial_size": list(pre.spatial_size)})
    else:
        out.append({"_target_": "Resized", "keys": IMAGE, "spatial_size": list(pre.spatial_size), "mode": "area"})
    return out


# --------------------------------------------------------------------------- inference.json and metadata.json


def inference_config(cfg: SiteConfig, network: dict[str, Any], served: Served, *, png: PngReader) -> dict[str, Any]:
    """The whole ``inference.json``: preprocessing, network, inferer, postprocessing and the ``run`` workflow."""
    seg = cfg.site.task == "segmentation"
    pre = cfg.preprocessing
    inferer: dict[str, Any] = (
        {"_target_": "SlidingWindowInferer", "roi_size": list(pre.spatial_size), "sw_batch_size": 4, "overlap": 0.25}
        if seg and pre.patches_per_image else {"_target_": "SimpleInferer"}
    )
    post: list[dict[str, Any]]
    if seg:
        post = [
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": IMAGE,
             "nearest_interp": True, "to_tensor": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "output_ext": ".nii.gz", "output_dtype": "$numpy.uint8", "resample": False, "separate_folder": False,
             "print_log": False, "savepath_in_metadict": True,
             "output_name_formatter": "$lambda meta, saver: {'subject': pathlib.Path(str(meta['filename_or_obj'])).name.split('.')[0]}"},
        ]
        row = ("$lambda d: {'image': d['image'].meta['filename_or_obj'], 'site': @site, 'model': @served_by, "
               "'mask': d['pred'].meta['saved_to'], "
               "**{'voxels_' + n: int((d['pred'] == c).sum()) for c, n in enumerate(@class_names)}}")
    else:
        post = [{"_target_": "Activationsd", "keys": "pred", "softmax": True}]
        row = ("$lambda d: {'image': d['image'].meta['filename_or_obj'], 'site': @site, 'model': @served_by, "
               "'predicted': @class_names[int(d['pred'].argmax())], "
               "**{'p_' + n: float(p) for n, p in zip(@class_names, d['pred'].tolist())}}")
    return {
        "imports": ["$import csv", "$import io", "$import pathlib",
                    "$from safetensors.torch import load_file as load_safetensors"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "datalist": [],
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "site": cfg.site.name,
        "served_by": served.how,
        "class_names": list(cfg.labels.names),
        "weights": f"$@bundle_root + '/{WEIGHTS}'",
        "network_def": network,
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing_config(cfg, png=png)},
        "dataset": {"_target_": "Dataset", "transform": "@preprocessing",
                    "data": "$[d if isinstance(d, dict) else {'image': d} for d in "
                            "([@datalist] if isinstance(@datalist, str) else @datalist)]"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": inferer,
        "predict": "$torch.no_grad()(lambda batch: monai.data.decollate_batch({'image': batch['image'], "
                   "'pred': @inferer(batch['image'].to(@device), @network).cpu()}))",
        "postprocessing": {"_target_": "Compose", "transforms": post},
        "row": row,
        "csv_line": "$lambda values: (lambda buf: (csv.writer(buf).writerow(values), buf.getvalue())[1])(io.StringIO())",
        "write_table": "$lambda rows: pathlib.Path(@output_dir, 'predictions.csv').write_text(''.join(@csv_line(v) "
                       "for v in [list(rows[0]) if rows else ['image']] + [list(r.values()) for r in rows]))",
        "run": [
            "$@network.load_state_dict(load_safetensors(@weights), strict=True)",
            "$@network.eval()",
            "$pathlib.Path(@output_dir).mkdir(parents=True, exist_ok=True)",
            "$@write_table([@row(@postprocessing(item)) for batch in @dataloader for item in @predict(batch)])",
        ],
    }


def _data_type(cfg: SiteConfig) -> str:
    """The format of the site's images, as the model zoo names it (nibabel, dicom, png, numpy...)."""
    if cfg.source.kind == "dicom_series":
        return "dicom"
    items = list_items(cfg).items
    first = items[0][IMAGE] if items else ""
    name = str(first[0] if isinstance(first, list) else first).lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nibabel"
    return name.rsplit(".", 1)[-1].replace("npy", "numpy").replace("npz", "numpy") if "." in name else "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _targets(node: Any) -> list[str]:
    """Every ``_target_`` (and reader named by a string) in a config tree."""
    if isinstance(node, dict):
        found = [str(node["_target_"])] if "_target_" in node else []
        return found + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


def _packages(cfg: SiteConfig, targets: list[str], inference: dict[str, Any]) -> dict[str, str]:
    names = ["safetensors", "nibabel"]
    readers = _targets(inference["preprocessing"])
    if "PILReader" in readers:
        names.append("pillow")
    if any(t.startswith("fedfew_med.") for t in targets):
        names.append("fedfew-med")
        if cfg.source.kind == "dicom_series":
            names.append("pydicom")
        if any(t.startswith("fedfew_med.dp.") for t in targets):
            names.append("opacus")
    return {n: _version(n) for n in names}


def metadata(cfg: SiteConfig, config: FederationConfig, facts: ModelFacts, served: Served, *,
             inference: dict[str, Any], provenance: dict[str, Any], eval_metrics: dict[str, float]) -> dict[str, Any]:
    """``metadata.json``: MONAI's bundle metadata fields and fedfew-med's provenance under ``"fedfew_med"``."""
    seg = cfg.site.task == "segmentation"
    pre = cfg.preprocessing
    names = list(cfg.labels.names)
    ranged = pre.intensity in ("minmax", "window")
    image: dict[str, Any] = {
        "type": "image", "format": "magnitude", "modality": "unknown (the site's images)",
        "num_channels": facts.in_channels, "spatial_shape": list(pre.spatial_size), "dtype": "float32",
        "value_range": [0, 1] if ranged else [], "is_patch_data": bool(seg and pre.patches_per_image),
        "channel_def": {str(i): f"channel {i}" for i in range(facts.in_channels)},
    }
    pred: dict[str, Any] = {
        "type": "image" if seg else "probabilities", "format": "segmentation" if seg else "classes",
        "num_channels": facts.num_classes, "spatial_shape": list(pre.spatial_size) if seg else [facts.num_classes],
        "dtype": "float32", "value_range": [], "is_patch_data": image["is_patch_data"],
        "channel_def": {str(i): n for i, n in enumerate(names)},
    }
    how = served.how
    task = f"{cfg.site.task} ({', '.join(names)})"
    packages = _packages(cfg, provenance["targets"], inference)
    return {
        "schema": META_SCHEMA,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by fedfew-med {_version('fedfew-med')} from run "
                                      f"{config.run.name!r}, round {provenance['round']}, for site {cfg.site.name}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": packages,
        "supported_apps": {},
        "name": f"{config.run.name} {cfg.site.name} {cfg.site.task}",
        "task": task,
        "description": (f"The model that serves site {cfg.site.name} in the federated run {config.run.name!r} "
                        f"({config.algorithm.name}, {config.model.name}): {how}. Preprocessing is the site's "
                        "[preprocessing] as in training; outputs as fedfew-med predict."),
        "authors": f"fedfew-med federation {config.run.name!r}",
        "copyright": "the sites of the federation; trained without moving their data",
        "data_source": f"site {cfg.site.name}'s data and the other sites' updates (federated; no data left a site)",
        "data_type": _data_type(cfg),
        "image_classes": f"{facts.in_channels} channel(s), intensity {pre.intensity}",
        "label_classes": ", ".join(f"{i}: {n}" for i, n in enumerate(names)),
        "pred_classes": (f"one mask of class indices ({', '.join(f'{i} = {n}' for i, n in enumerate(names))})" if seg
                         else f"{facts.num_classes} softmax probabilities in the order {', '.join(names)}"),
        "eval_metrics": eval_metrics,
        "intended_use": "research; not validated for clinical use",
        "references": [],
        "network_data_format": {"inputs": {IMAGE: image}, "outputs": {"pred": pred}},
        "fedfew_med": provenance,
    }


def _readme(meta: dict[str, Any], cfg: SiteConfig, inference: dict[str, Any]) -> str:
    prov = meta["fedfew_med"]
    targets = _targets(inference)
    inferer = inference["inferer"]["_target_"]
    seg = cfg.site.task == "segmentation"
    post = "argmax, `Invertd` (nearest neighbour) back to the source grid and `SaveImaged`" if seg else "softmax"
    example = "case.nii.gz" if len(cfg.preprocessing.spatial_size) == 3 else "scan.png"
    outputs = ("`<name>_seg.nii.gz` per image (class indices, uint8, on the image's own voxel grid with its affine) "
               "and `predictions.csv` (image, site, model, mask, voxels per class)" if seg else
               "`predictions.csv`: image, site, model, predicted class name, one `p_<class>` probability per class")
    outside = [t for t in targets if not t.startswith("monai.") and "." in t]
    needs = (f"It needs fedfew-med installed for: {', '.join(sorted(set(outside)))}." if outside
             else "It needs MONAI and the packages in `required_packages_version` only, not fedfew-med.")
    return f"""# {meta['name']}

{meta['description']}

| | |
|---|---|
| run | `{prov['run_name']}` (`{prov['run_dir']}`), round {prov['round']}, config digest `{prov['config_digest']}` |
| site | `{prov['site']}` (`{prov['site_config']}`) |
| model | {prov['served_by']} |
| weights | `{WEIGHTS}`, SHA-256 `{prov['weights_sha256']}` (safetensors: nothing is unpickled) |
| classes | {meta['label_classes']} |

## Run

```bash
python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\
    --datalist "['{example}']" --output_dir out
```

(`python -m monai.bundle` parses its arguments with the `fire` package.) `--datalist` is a list of image
paths (or of `{{"image": path}}` entries; a list of paths per entry stacks them as channels). It writes
{outputs}. {needs}

## What it does

The site's deterministic preprocessing as in training (`preprocessing` in `configs/inference.json`),
the network (`network_def`) through `{inferer}`, then {post}. At export the bundle was checked against
`fedfew-med predict`: the same network outputs, and the same preprocessed tensors on the site's
first images. Unlike `predict`, the bundle does not run
`validate-site`'s checks on the images (constant, NaN, 4-D volumes, truncated files): check new
images with `fedfew-med validate-site` or your own QA first.
"""


# --------------------------------------------------------------------------- export


def _state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    """The network's parameters and buffers, as separate contiguous CPU tensors (what safetensors stores)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in network.state_dict().items()}


def _check(root: Path, cfg: SiteConfig, served: Served, facts: ModelFacts, *, shown: Path) -> None:
    """Raise ConfigError (naming ``shown``) unless the bundle in ``root`` gives ``predict``'s network outputs and preprocessed images."""
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    parser["bundle_root"] = str(root)
    net = parser.get_parsed_content("network_def", instantiate=True)
    x = torch.rand((1, facts.in_channels, *cfg.preprocessing.spatial_size), generator=torch.Generator().manual_seed(0))
    try:
        net.load_state_dict(load_file(str(root / WEIGHTS)), strict=True)
        with torch.no_grad():
            device = next(served.network.parameters()).device  # the run's device; the bundle's check runs on CPU
            want, got = served.network(x.to(device)).cpu(), net.eval()(x)
        same = want.shape == got.shape and torch.allclose(want, got, rtol=0.0, atol=NETWORK_ATOL)
    except RuntimeError as exc:  # other parameter names or shapes
        same, why = False, f": {' '.join(str(exc).split())[:300]}"
    else:
        why = f" (largest output difference {float((want - got).abs().max()):.3g})" if want.shape == got.shape else ""
    if not same:
        raise ConfigError(f"{shown}: the bundle's network_def does not reproduce the served network "
                          f"({served.network.__class__.__name__}){why}; not exported")
    ours, theirs = image_pipeline(cfg), parser.get_parsed_content("preprocessing", instantiate=True)
    for item in list_items(cfg).items[:VERIFY_IMAGES]:
        a = ours({IMAGE: item[IMAGE]})[IMAGE]
        b = theirs({IMAGE: item[IMAGE]})[IMAGE]
        if a.shape != b.shape or not torch.equal(a.as_tensor(), b.as_tensor()):
            raise ConfigError(f"{shown}: the bundle's preprocessing of {item[IMAGE]} differs from predict's "
                              f"(shape {tuple(b.shape)} vs {tuple(a.shape)}); not exported")


def export_bundle(run_dir: str | Path, site_config: str | Path, output: str | Path, *, overwrite: bool = False) -> Bundle:
    """Write the model that serves a site, with the site's preprocessing, as a MONAI bundle in ``output``.

    Parameters
    ----------
    run_dir
        The run directory (its latest checkpoint decides the model, as in ``predict``).
    site_config
        The site's TOML file: a site of the run, or one that chose a model with ``choose-model``.
    output
        The bundle folder; it must be empty or absent unless ``overwrite``.
    overwrite
        Replace a non-empty ``output``.

    Raises
    ------
    ConfigError
        A tabular site, a site that neither trained nor chose a model, a non-empty ``output``, or a
        bundle that would not reproduce ``predict`` (nothing is left in ``output`` then).
    fedfew_med.checkpoint.CheckpointError
        The run's checkpoint is missing, corrupt or was made with another config.
    """
    run_dir, out = Path(run_dir), Path(output)
    cfg = load_site_config(site_config)
    if cfg.site.task == "tabular":
        raise ConfigError(f"{site_config}: a MONAI bundle reads images; tabular site {cfg.site.name} cannot be exported")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"--output {out} is not empty; pass --force (overwrite=True) to replace it")
    config = run_config(run_dir)
    site = load_site(site_config)
    served = served_model(run_dir, site)
    facts = ModelFacts.common([site])
    state = _state_dict(served.network)
    dp_ready = served.dp_ready
    png = png_reader_for(cfg) if len(cfg.preprocessing.spatial_size) == 2 else "pil"
    inference = inference_config(cfg, network_config(config.model.name, config.model.params, facts, dp_ready=dp_ready), served, png=png)
    targets = sorted({t for t in _targets(inference) if t.startswith("fedfew_med.")})

    staging = out.with_name(f".{out.name}.export-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / "configs").mkdir(parents=True)
        (staging / "models").mkdir()
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        provenance: dict[str, Any] = {
            "run_name": config.run.name, "run_dir": str(run_dir.resolve()),
            "round": checkpoint.latest_round(run_dir), "config_digest": config.digest(),
            "run_models_sha256": summary.get("models_sha256"), "algorithm": config.algorithm.name,
            "model": config.model.name, "site": cfg.site.name, "site_config": str(Path(site_config).resolve()),
            "server_model": served.model_index, "served_by": served.how, "dp_ready_network": dp_ready,
            "weights": WEIGHTS, "targets": targets,
        }
        save_file(state, str(staging / WEIGHTS), metadata={"format": "pt", "site": cfg.site.name,
                                                          "config_digest": config.digest()})
        provenance["weights_sha256"] = checkpoint.sha256_file(staging / WEIGHTS)
        # the run's test metrics of this deployment (a site that only chose a model has none in the run)
        metrics = summary.get("per_site", {}).get(cfg.site.name, {}).get("metrics", {})
        eval_metrics = {f"test_{k}": float(v) for k, v in metrics.items()}
        meta = metadata(cfg, config, facts, served, inference=inference, provenance=provenance, eval_metrics=eval_metrics)
        (staging / "configs" / "inference.json").write_text(json.dumps(inference, indent=2) + "\n", encoding="utf-8")
        (staging / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        (staging / "configs" / "logging.conf").write_text(LOGGING_CONF, encoding="utf-8")
        (staging / "README.md").write_text(_readme(meta, cfg, inference), encoding="utf-8")
        _check(staging, cfg, served, facts, shown=out)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote MONAI bundle %s for site %s (%s)", out, cfg.site.name, served.how)
    return Bundle(root=out, site=cfg.site.name, model_index=served.model_index, how=served.how,
                  weights_sha256=provenance["weights_sha256"], targets=tuple(targets))

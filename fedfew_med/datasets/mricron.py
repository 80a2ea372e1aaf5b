"""A SINGLE-SUBJECT SMOKE TEST on real MRI: one T1 head and its atlas, re-acquired per site.

**Not a benchmark.** Every volume of every site is a view of the same person, so train
and test volumes overlap in anatomy and a Dice here measures nothing about how a model
generalises to new patients. It shows that the 3-D path runs on a real scan with real
anatomy (intensities, head shape, labels drawn by anatomists) rather than on the
synthetic blobs of :mod:`fedfew_med.datasets.volumes3d`.

Source
------
The Debian package ``mricron-data`` (MRIcron's templates; ``apt-get install
mricron-data``), folder ``/usr/share/mricron/templates``; nothing is downloaded:

* ``ch2.nii.gz``: "Colin 27", the MNI single-subject T1 (27 averaged scans of one
  man, Holmes et al. 1998), 181 × 217 × 181 voxels of 1 mm, RAS, uint8;
* ``aal.nii.gz``: the AAL atlas (Tzourio-Mazoyer et al. 2002), which was drawn on that
  same single subject, on the same grid (the affines are checked to be equal); its 116
  regions are named in ``aal.nii.txt`` (``<value> <name> <code>``).

Labels: the 116 AAL regions are collapsed to 0 background (outside every region,
including the white matter the atlas leaves unlabelled), 1 ``cerebrum`` (every region
whose name does not start with ``Cerebelum_`` or ``Vermis_``: 90 regions) and
2 ``cerebellum`` (the other 26). The collapse is read from the names file.

Sites and volumes (all seeded)
------------------------------
Site ``i`` uses acquisition ``ACQUISITIONS[i % 4]`` (grid, intensity scale, noise,
linear bias ramp; the site's gain and noise jittered by ±10-20 %), with the axis order and
voxel size in each volume's affine:

====  ===========  ===============  ==========================
site  orientation  voxel size (mm)  stored intensity
====  ===========  ===============  ==========================
A     RAS          2.0 × 2.0 × 2.0  T1 / 255, noise 0.03
B     LAS          2.5 × 2.5 × 2.5  800 · T1 / 255 + 50, 0.05, bias 20 %
C     RAS          1.5 × 1.5 × 4.0  T1 / 255, noise 0.04, bias 10 % (thick slices)
D     LPS          3.0 × 3.0 × 3.0  3000 · T1 / 255, noise 0.06, bias 30 %
====  ===========  ===============  ==========================

A volume is a box of ``field_of_view_mm`` (default 96 × 96 × 72 mm) centred at a random
point of the brain's bounding box, with the head turned by a random angle (up to
``max_rotation_deg`` about each axis, as a patient lies differently in the scanner):
the T1 is resampled trilinearly and the labels by nearest neighbour
(``scipy.ndimage.map_coordinates``) at the voxel centres of the site's grid.

Output: the layout of :mod:`fedfew_med.datasets.volumes3d` (``imagesTr/``,
``labelsTr/``, site TOMLs at ``target_spacing_mm`` with patch sampling, a FedFew K = 2
3-D UNet federation, ``partition.json``, ``README.md``), every file marked as a
single-subject smoke test.
"""

from __future__ import annotations

import logging
import math
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.spatialimages import SpatialImage
from scipy.ndimage import map_coordinates

from fedfew_med.datasets.common import PreparedFederation, ensure_empty_dir, write_federation, write_json
from fedfew_med.datasets.volumes3d import (
    Acquisition,
    acquire,
    grid_affine,
    site_document,
    unet_federation,
    voxel_centres,
    write_nifti_pair,
)

__all__ = [
    "ACQUISITIONS",
    "APT_PACKAGE",
    "DEFAULT_ROOT",
    "LABEL_NAMES",
    "collapse_aal",
    "load_colin27",
    "prepare_mricron_smoke",
    "resample",
]

logger = logging.getLogger(__name__)

APT_PACKAGE = "mricron-data"
DEFAULT_ROOT = Path("/usr/share/mricron/templates")
T1_FILE, ATLAS_FILE, NAMES_FILE = "ch2.nii.gz", "aal.nii.gz", "aal.nii.txt"
LABEL_NAMES = ("background", "cerebrum", "cerebellum")
CEREBELLUM_PREFIXES = ("Cerebelum_", "Vermis_")  # AAL's spelling

ACQUISITIONS = (
    Acquisition("A", "RAS", (2.0, 2.0, 2.0), scale=1.0, offset=0.0, noise_std=0.03, bias=0.0),
    Acquisition("B", "LAS", (2.5, 2.5, 2.5), scale=800.0, offset=50.0, noise_std=0.05, bias=0.2),
    Acquisition("C", "RAS", (1.5, 1.5, 4.0), scale=1.0, offset=0.0, noise_std=0.04, bias=0.1),
    Acquisition("D", "LPS", (3.0, 3.0, 3.0), scale=3000.0, offset=0.0, noise_std=0.06, bias=0.3),
)


def _install_hint(root: Path) -> str:
    return (f"install the Debian package with `apt-get install {APT_PACKAGE}` (it puts MRIcron's templates in "
            f"{DEFAULT_ROOT}), or pass root= (--root) to a folder holding {T1_FILE}, {ATLAS_FILE} and {NAMES_FILE}; "
            f"looked in {root}")


def collapse_aal(names_text: str) -> tuple[np.ndarray, dict[str, list[str]]]:
    """The AAL value -> class lookup table from the names file (``<value> <name> <code>`` lines).

    Returns
    -------
    tuple
        ``(lut (max value + 1,) uint8, region names per class)``; values not listed map to 0.

    Raises
    ------
    ValueError
        If a line cannot be read or no region is listed.
    """
    regions: list[tuple[int, str]] = []
    for number, line in enumerate(names_text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2 or not parts[0].isdigit() or int(parts[0]) < 1:
            raise ValueError(f"{NAMES_FILE} line {number} must be '<value> <name> [code]' with a value >= 1, got {line!r}")
        regions.append((int(parts[0]), parts[1]))
    if not regions:
        raise ValueError(f"{NAMES_FILE} must list the atlas regions, but it lists none")
    lut = np.zeros(max(v for v, _ in regions) + 1, dtype=np.uint8)
    members: dict[str, list[str]] = {LABEL_NAMES[1]: [], LABEL_NAMES[2]: []}
    for value, name in regions:
        cls = 2 if name.startswith(CEREBELLUM_PREFIXES) else 1
        lut[value] = cls
        members[LABEL_NAMES[cls]].append(name)
    return lut, members


def load_colin27(root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, list[str]]]:
    """The T1 (float64, 0-1), the collapsed labels (uint8), their shared affine and the class members.

    Raises
    ------
    FileNotFoundError
        If a file is missing; the message says how to install ``mricron-data``.
    ValueError
        If the T1 and the atlas are not on one grid, or the atlas holds values the names file lacks.
    """
    folder = Path(root) if root is not None else DEFAULT_ROOT
    for name in (T1_FILE, ATLAS_FILE, NAMES_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} must exist (MRIcron's {name}); {_install_hint(folder)}")
    t1_img, atlas_img = (nib.load(folder / name) for name in (T1_FILE, ATLAS_FILE))
    if not isinstance(t1_img, SpatialImage) or not isinstance(atlas_img, SpatialImage):
        raise ValueError(f"{T1_FILE} and {ATLAS_FILE} must be images with an affine (NIfTI)")
    if t1_img.shape != atlas_img.shape or not np.allclose(t1_img.affine, atlas_img.affine, atol=1e-4):
        raise ValueError(
            f"{ATLAS_FILE} must lie on the grid of {T1_FILE} (same shape and affine), got shapes "
            f"{atlas_img.shape} and {t1_img.shape}"
        )
    lut, members = collapse_aal((folder / NAMES_FILE).read_text(encoding="utf-8", errors="replace"))
    atlas = np.asarray(atlas_img.dataobj).astype(np.int64)
    if atlas.min() < 0 or atlas.max() >= lut.size or not np.isin(np.unique(atlas[atlas > 0]), np.flatnonzero(lut)).all():
        raise ValueError(f"{ATLAS_FILE} holds values that {NAMES_FILE} does not name (0-{lut.size - 1} expected)")
    t1 = np.asarray(t1_img.dataobj, dtype=np.float64)
    return t1 / 255.0, lut[atlas], np.asarray(t1_img.affine, dtype=np.float64), members


def resample(volume: np.ndarray, source_affine: np.ndarray, points: np.ndarray, *, order: int) -> np.ndarray:
    """``volume`` (on ``source_affine``) at world points ``(..., 3)``: trilinear (1) or nearest (0); 0 outside."""
    inverse = np.linalg.inv(source_affine)
    idx = points @ inverse[:3, :3].T + inverse[:3, 3]  # (..., 3) source voxel coordinates
    coords = np.moveaxis(idx, -1, 0)  # (3, ...)
    return map_coordinates(volume, coords, order=order, mode="constant", cval=0.0, prefilter=False)


def _rotation(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation about x, then y, then z (degrees)."""
    ax, ay, az = (math.radians(a) for a in angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _source_version() -> str:
    try:  # provenance only: the Debian package's version, when dpkg can say
        done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", APT_PACKAGE], capture_output=True, text=True,
                              timeout=10, check=False)
        return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def prepare_mricron_smoke(
    out_dir: Path,
    *,
    num_sites: int = 4,
    volumes_per_site: int = 12,
    seed: int = 0,
    root: str | Path | None = None,
    field_of_view_mm: Sequence[float] = (96.0, 96.0, 72.0),
    max_rotation_deg: float = 10.0,
    target_spacing_mm: Sequence[float] = (3.0, 3.0, 3.0),
    patch_size: Sequence[int] = (16, 16, 16),
    patches_per_image: int = 4,
    rounds: int = 5,
) -> PreparedFederation:
    """Write the single-subject smoke-test federation of the module docstring.

    Parameters
    ----------
    out_dir
        Folder to write; must be missing or empty.
    num_sites
        M sites; site ``i`` uses ``ACQUISITIONS[i % 4]``.
    volumes_per_site
        Boxes (views of the one head) per site.
    root
        Folder of ``ch2.nii.gz``, ``aal.nii.gz`` and ``aal.nii.txt`` (default: the Debian package's).

    Raises
    ------
    FileNotFoundError
        If the MRIcron templates are not installed (``apt-get install mricron-data``).
    FileExistsError
        If ``out_dir`` is not empty.
    ValueError
        For arguments out of range or source files that are not the ones described.
    """
    if num_sites < 1:
        raise ValueError(f"num_sites must be an integer >= 1, got {num_sites}")
    if volumes_per_site < 3:
        raise ValueError(f"volumes_per_site must be an integer >= 3 (train, val and test), got {volumes_per_site}")
    if not 0.0 <= max_rotation_deg <= 45.0:
        raise ValueError(f"max_rotation_deg must be from 0 to 45, got {max_rotation_deg}")
    t1, labels, source_affine, members = load_colin27(root)
    out = ensure_empty_dir(Path(out_dir))
    brain = np.argwhere(labels > 0)  # (N, 3) voxel indices
    low, high = (source_affine[:3, :3] @ brain.min(axis=0) + source_affine[:3, 3],
                 source_affine[:3, :3] @ brain.max(axis=0) + source_affine[:3, 3])
    lo, hi = np.minimum(low, high), np.maximum(low, high)  # the brain's bounding box in world mm
    fov = np.asarray(field_of_view_mm, dtype=np.float64)
    slack = np.maximum((hi - lo - fov) / 2.0, 0.0)  # how far a box centre may move and stay in the brain box
    middle = (lo + hi) / 2.0
    half_extent = float(fov.max()) / 2.0
    site_docs, site_meta = [], {}
    for i, site_seq in enumerate(np.random.SeedSequence(seed).spawn(num_sites)):
        jitter_rng, view_rng, noise_rng = (np.random.default_rng(s) for s in site_seq.spawn(3))
        base = ACQUISITIONS[i % len(ACQUISITIONS)]
        acq = replace(base, scale=round(base.scale * float(jitter_rng.uniform(0.9, 1.1)), 4),
                      noise_std=round(base.noise_std * float(jitter_rng.uniform(0.8, 1.2)), 4), lesion_contrast=0.0)
        direction = jitter_rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        name = f"site{i}"
        views = []
        for n in range(volumes_per_site):
            centre = middle + view_rng.uniform(-1.0, 1.0, size=3) * slack
            angles = view_rng.uniform(-max_rotation_deg, max_rotation_deg, size=3)
            affine, shape = grid_affine(orientation=acq.orientation, spacing=acq.spacing,
                                        field_of_view_mm=fov.tolist(), centre_mm=centre.tolist())
            points = voxel_centres(affine, shape)  # scanner world mm
            rot = _rotation(angles.tolist())
            subject = (points - centre) @ rot.T + centre  # where in the head each voxel lies
            image = acquire(resample(t1, source_affine, subject, order=1), points, acq,
                            bias_direction=direction, half_extent_mm=half_extent, rng=noise_rng)
            label = resample(labels, source_affine, subject, order=0).astype(np.uint8)
            case = f"view_{n:03d}"
            write_nifti_pair(out / name, case, image, label, affine)
            views.append({"case": case, "centre_mm": [round(float(v), 3) for v in centre],
                          "rotation_deg": [round(float(v), 3) for v in angles],
                          "class_share": [round(float((label == c).mean()), 6) for c in range(len(LABEL_NAMES))]})
        site_meta[name] = {"acquisition": asdict(acq), "bias_direction": [round(float(v), 6) for v in direction],
                           "shape": list(shape), "views": views}
        site_docs.append(site_document(name=name, label_names=LABEL_NAMES, patch_size=patch_size,
                                       target_spacing_mm=target_spacing_mm, patches_per_image=patches_per_image,
                                       split_seed=seed, val_fraction=0.1, test_fraction=0.25))
        logger.info("%s: acquisition %s, %d views of %s voxels", name, acq.name, volumes_per_site, shape)
    metadata: dict[str, Any] = {
        "dataset": "volumes3d-mricron",
        "warning": "SINGLE-SUBJECT SMOKE TEST, not a benchmark: every volume of every site is the same person "
                   "(train and test overlap in anatomy)",
        "source": {"package": f"Debian {APT_PACKAGE}=={_source_version()}",
                   "files": [str((Path(root) if root is not None else DEFAULT_ROOT) / f)
                             for f in (T1_FILE, ATLAS_FILE, NAMES_FILE)],
                   "subject": "Colin 27 (MNI single-subject T1, Holmes et al. 1998)",
                   "atlas": "AAL (Tzourio-Mazoyer et al. 2002), drawn on the same subject"},
        "labels": list(LABEL_NAMES),
        "label_members": members,
        "seed": seed,
        "num_sites": num_sites,
        "volumes_per_site": volumes_per_site,
        "field_of_view_mm": fov.tolist(),
        "max_rotation_deg": max_rotation_deg,
        "target_spacing_mm": [float(v) for v in target_spacing_mm],
        "patch_size": [int(v) for v in patch_size],
        "patches_per_image": patches_per_image,
        "sites": site_meta,
    }
    write_json(out / "partition.json", metadata)
    (out / "README.md").write_text(_readme(metadata))
    header = (f"Written by fedfew_med.datasets.prepare_mricron_smoke(num_sites={num_sites}, "
              f"volumes_per_site={volumes_per_site}, seed={seed}).\n"
              "SINGLE-SUBJECT SMOKE TEST, not a benchmark: one real T1 head (Colin 27, Debian mricron-data)\n"
              "re-acquired per site; see README.md and partition.json.")
    federation_file, site_files = write_federation(
        out, site_docs=site_docs,
        federation=unet_federation(name="volumes3d-mricron-smoke", seed=seed, num_sites=num_sites, rounds=rounds),
        header=header,
    )
    return PreparedFederation(out_dir=out, federation_file=federation_file, site_files=site_files, metadata=metadata)


def _readme(meta: Mapping[str, Any]) -> str:
    rows = "\n".join(
        f"| {name} | {s['acquisition']['name']} | {s['acquisition']['orientation']} | "
        f"{' × '.join(f'{v:g}' for v in s['acquisition']['spacing'])} | {' × '.join(str(v) for v in s['shape'])} |"
        for name, s in meta["sites"].items()
    )
    return (
        "# volumes3d-mricron: a SINGLE-SUBJECT SMOKE TEST (not a benchmark)\n\n"
        "Every volume of every site is a view of **one** real head: Colin 27, the MNI single-subject T1, "
        "with the AAL atlas drawn on it, from the Debian package `mricron-data`. Train and test volumes overlap "
        "in anatomy, so the Dice of a run says only that the 3-D pipeline works on a real scan, not how a "
        "model would do on new patients.\n\n"
        f"Labels: {', '.join(meta['labels'])} (AAL's 116 regions collapsed: {len(meta['label_members']['cerebrum'])} "
        f"cerebral, {len(meta['label_members']['cerebellum'])} cerebellar). {meta['volumes_per_site']} views per "
        f"site, boxes of {' × '.join(f'{v:g}' for v in meta['field_of_view_mm'])} mm at random positions and head "
        f"rotations (up to {meta['max_rotation_deg']:g}°), seed {meta['seed']}.\n\n"
        "| site | acquisition | orientation | voxel size (mm) | stored shape |\n"
        "|---|---|---|---|---|\n"
        f"{rows}\n\n"
        "Written by `fedfew-med datasets prepare volumes3d --source mricron` "
        "(`fedfew_med/datasets/mricron.py`). Run it: `fedfew-med simulate federation.toml`.\n"
    )

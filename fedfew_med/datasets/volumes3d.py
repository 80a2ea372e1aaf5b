"""A synthetic 3-D segmentation federation: NIfTI volumes whose sites differ in grid and scanner.

No data package is needed: every volume is drawn from a seeded generator. It exists so
that the 3-D path (NIfTI folders, reorientation, resampling, patch sampling, a 3-D UNet,
evaluation on patches) runs end to end on a laptop; its Dice says nothing about any
real lesion.

The scene (world coordinates, millimetres, RAS+)
------------------------------------------------
Each volume covers a field of view of ``field_of_view_mm`` (default 48 × 48 × 36 mm)
centred on the world origin:

* **tissue**: an ellipsoid filling ~90 % of the field of view, signal 0.5, with a smooth
  texture (8 random plane waves, wavelengths 5-16 mm, amplitude 0.05 each); air 0.05;
* **lesions** (label 1): 1-3 randomly rotated ellipsoids, semi-axes 3-7 mm, centred
  inside the tissue; signal ``lesion_contrast`` added with a soft edge (half of it on the
  label boundary);
* **mimics** (label 0): 0-2 thin elongated ellipsoids (vessel-like, semi-axes 1.5-2.5 and
  8-12 mm) of the **opposite** contrast, placed away from the lesions.

Sites: one acquisition protocol each (cycled when there are more than four sites)
-------------------------------------------------------------------------------
The scene is sampled at the voxel centres of the site's own grid, whose affine carries
the protocol's axis order and voxel size, so sites meet on one grid only after the site
files' ``orientation = "RAS"`` and ``spacing`` (``target_spacing_mm``) are applied:

====  ===========  ===============  =================  ==========  =====  =========
site  orientation  voxel size (mm)  stored intensity   lesions     noise  bias field
====  ===========  ===============  =================  ==========  =====  =========
A     RAS          1.5 × 1.5 × 1.5  signal             bright      0.04   none
B     LAS          1.5 × 1.5 × 1.5  800 · signal + 100 bright      0.06   25 %
C     RAS          1.0 × 1.0 × 3.0  signal             dark        0.05   10 %
D     LPS          2.0 × 2.0 × 1.5  4000 · signal      dark        0.08   30 %
====  ===========  ===============  =================  ==========  =====  =========

Bright-lesion (T2-like) and dark-lesion (T1-like) protocols, each with mimics of the other
sign, give a federation in which one model cannot serve every site: the K = 2 of the
federation file. Each site's gain, contrast and noise are jittered (seeded, ±10-20 %);
the bias field is a linear gain ramp of the given strength along a random direction.
Stored images are float32, labels uint8, both ``.nii.gz`` with the same affine
(sform and qform code 1, millimetres).

Randomness: one :class:`numpy.random.SeedSequence` (``seed``) spawns one stream per
site, which spawns the site's jitter, its scenes and its noise; no global RNG is used,
and the same seed writes the same bytes (nibabel writes gzip with mtime 0).

Output
------
``<out_dir>/site<i>/imagesTr/case_<n>.nii.gz`` and ``labelsTr/case_<n>.nii.gz``
(the ``nifti_folder`` layout), ``<out_dir>/site<i>.toml`` (segmentation, patches of
``patch_size`` for training, RAS at ``target_spacing_mm``, z-score intensities),
``<out_dir>/federation.toml`` (FedFew, K = min(2, M), a small 3-D UNet),
``<out_dir>/partition.json`` (seed, every site's protocol and drawn parameters, shapes,
lesion counts and voxel shares) and ``<out_dir>/README.md``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from fedfew_med.datasets.common import PreparedFederation, ensure_empty_dir, write_federation, write_json

__all__ = [
    "LABEL_NAMES",
    "PROTOCOLS",
    "Acquisition",
    "grid_affine",
    "prepare_volumes3d",
    "sample_scene",
    "site_document",
    "voxel_centres",
    "write_nifti_pair",
]

logger = logging.getLogger(__name__)

LABEL_NAMES = ("background", "lesion")
AIR, TISSUE = 0.05, 0.5  # signal outside / inside the tissue ellipsoid
TISSUE_FILL = 0.45  # tissue semi-axes as a share of the field of view
TEXTURE_WAVES, TEXTURE_AMPLITUDE, TEXTURE_WAVELENGTH_MM = 8, 0.05, (5.0, 16.0)
LESIONS_PER_VOLUME = (1, 3)
LESION_SEMI_AXES_MM = (3.0, 7.0)
MIMICS_PER_VOLUME = (0, 2)
MIMIC_WIDTH_MM, MIMIC_LENGTH_MM = (1.5, 2.5), (8.0, 12.0)
EDGE = 0.25  # width of the soft lesion edge, in units of the ellipsoid radius
_AXIS = {"L": (0, -1.0), "R": (0, 1.0), "P": (1, -1.0), "A": (1, 1.0), "I": (2, -1.0), "S": (2, 1.0)}


@dataclass(frozen=True)
class Acquisition:
    """How one site stores a volume: its grid and its intensity scale.

    Attributes
    ----------
    name
        The protocol's name (A, B...), recorded in ``partition.json``.
    orientation
        Axis codes of the stored voxel axes (``"LAS"``: the first axis runs to the left).
    spacing
        Voxel size in mm along the stored axes.
    scale, offset
        Stored value = ``scale · signal + offset`` (signal: air 0.05, tissue 0.5).
    noise_std
        Gaussian noise, in signal units (before ``scale``).
    bias
        Strength of a linear gain ramp (0.25: ±25 % across the field of view).
    lesion_contrast
        Signal added inside a lesion (negative: dark lesions); synthetic scenes only.
    """

    name: str
    orientation: str
    spacing: tuple[float, float, float]
    scale: float = 1.0
    offset: float = 0.0
    noise_std: float = 0.05
    bias: float = 0.0
    lesion_contrast: float = 0.3


PROTOCOLS = (
    Acquisition("A", "RAS", (1.5, 1.5, 1.5), scale=1.0, offset=0.0, noise_std=0.04, bias=0.0, lesion_contrast=0.35),
    Acquisition("B", "LAS", (1.5, 1.5, 1.5), scale=800.0, offset=100.0, noise_std=0.06, bias=0.25, lesion_contrast=0.25),
    Acquisition("C", "RAS", (1.0, 1.0, 3.0), scale=1.0, offset=0.0, noise_std=0.05, bias=0.1, lesion_contrast=-0.3),
    Acquisition("D", "LPS", (2.0, 2.0, 1.5), scale=4000.0, offset=0.0, noise_std=0.08, bias=0.3, lesion_contrast=-0.25),
)


# ---------------------------------------------------------------------------- grids


def _axes(orientation: str) -> list[tuple[int, float]]:
    """(world axis, sign) of each stored axis; ``orientation`` like ``"LPS"``."""
    codes = orientation.upper()
    axes = [_AXIS[c] for c in codes] if len(codes) == 3 and all(c in _AXIS for c in codes) else []
    if sorted(a for a, _ in axes) != [0, 1, 2]:
        raise ValueError(f"orientation must be 3 axis codes naming each of L/R, A/P, S/I once, got {orientation!r}")
    return axes


def grid_affine(
    *, orientation: str, spacing: Sequence[float], field_of_view_mm: Sequence[float], centre_mm: Sequence[float] = (0, 0, 0)
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The affine and shape of a grid covering a world box, stored in ``orientation`` at ``spacing``.

    The grid's centre lies at ``centre_mm``; along each stored axis there are
    ``round(fov / spacing)`` voxels (at least 1) of the world axis it runs along.

    Returns
    -------
    tuple
        ``(affine (4, 4) float64 voxel -> world mm (RAS+), shape of the stored axes)``.

    Raises
    ------
    ValueError
        For invalid axis codes or non-positive sizes.
    """
    if any(not (s > 0 and math.isfinite(s)) for s in spacing) or len(spacing) != 3:
        raise ValueError(f"spacing must be 3 finite voxel sizes > 0 (mm), got {list(spacing)}")
    if any(not (f > 0 and math.isfinite(f)) for f in field_of_view_mm) or len(field_of_view_mm) != 3:
        raise ValueError(f"field_of_view_mm must be 3 finite sizes > 0 (mm), got {list(field_of_view_mm)}")
    axes = _axes(orientation)
    shape = tuple(max(1, int(round(field_of_view_mm[w] / s))) for (w, _), s in zip(axes, spacing, strict=True))
    affine = np.eye(4)
    for i, ((w, sign), s) in enumerate(zip(axes, spacing, strict=True)):
        affine[:3, i] = 0.0
        affine[w, i] = sign * float(s)
    half = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    affine[:3, 3] = np.asarray(centre_mm, dtype=np.float64) - affine[:3, :3] @ half
    return affine, (int(shape[0]), int(shape[1]), int(shape[2]))


def voxel_centres(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """World coordinates (mm) of every voxel centre, ``(*shape, 3)``."""
    idx = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij"), axis=-1)
    return idx @ affine[:3, :3].T + affine[:3, 3]


# ---------------------------------------------------------------------------- scenes


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3-D rotation (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _in_ball(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random point of the unit ball (rejection from the cube)."""
    while True:
        u = rng.uniform(-1.0, 1.0, size=3)
        if float(u @ u) <= 1.0:
            return u


def _radius(points: np.ndarray, centre: np.ndarray, rotation: np.ndarray, semi_axes: np.ndarray) -> np.ndarray:
    """Ellipsoidal radius of world points ``(..., 3)``: 1 on the surface, < 1 inside."""
    local = (points - centre) @ rotation  # coordinates along the ellipsoid's own axes
    return np.sqrt(((local / semi_axes) ** 2).sum(axis=-1))


def draw_scene(field_of_view_mm: Sequence[float], rng: np.random.Generator) -> dict[str, Any]:
    """One random scene in world mm: texture waves, lesions and mimics (JSON-able lists)."""
    fov = np.asarray(field_of_view_mm, dtype=np.float64)
    tissue = TISSUE_FILL * fov
    waves = []
    for _ in range(TEXTURE_WAVES):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        wavelength = rng.uniform(*TEXTURE_WAVELENGTH_MM)
        waves.append({"k": (2 * math.pi / wavelength * direction).tolist(), "phase": float(rng.uniform(0, 2 * math.pi))})
    lesions: list[dict[str, Any]] = []
    for _ in range(int(rng.integers(LESIONS_PER_VOLUME[0], LESIONS_PER_VOLUME[1] + 1))):
        semi = rng.uniform(*LESION_SEMI_AXES_MM, size=3)
        centre = _in_ball(rng) * np.maximum(tissue - semi.max() - 2.0, 0.0)  # the whole lesion in the tissue
        lesions.append({"centre": centre.tolist(), "semi_axes": semi.tolist(), "rotation": _rotation(rng).tolist()})
    mimics: list[dict[str, Any]] = []
    for _ in range(int(rng.integers(MIMICS_PER_VOLUME[0], MIMICS_PER_VOLUME[1] + 1))):
        semi = np.array([rng.uniform(*MIMIC_WIDTH_MM), rng.uniform(*MIMIC_WIDTH_MM), rng.uniform(*MIMIC_LENGTH_MM)])
        for _try in range(20):  # away from every lesion, so that no lesion voxel is covered
            centre = _in_ball(rng) * np.maximum(tissue - 2.0, 0.0)
            clear = all(
                np.linalg.norm(centre - np.asarray(les["centre"])) > max(les["semi_axes"]) + semi.max() + 1.0
                for les in lesions
            )
            if clear:
                mimics.append({"centre": centre.tolist(), "semi_axes": semi.tolist(), "rotation": _rotation(rng).tolist()})
                break
    return {"tissue_semi_axes": tissue.tolist(), "waves": waves, "lesions": lesions, "mimics": mimics}


def _soft_inside(radius: np.ndarray) -> np.ndarray:
    # 1 inside, 0 outside, 0.5 on the surface, linear over EDGE
    return np.clip((1.0 - radius) / EDGE + 0.5, 0.0, 1.0)


def sample_scene(scene: Mapping[str, Any], points: np.ndarray, *, lesion_contrast: float) -> tuple[np.ndarray, np.ndarray]:
    """Signal (float64) and label (uint8, 1 = lesion) of a scene at world points ``(..., 3)``."""
    zero = np.zeros(3)
    inside = _soft_inside(_radius(points, zero, np.eye(3), np.asarray(scene["tissue_semi_axes"])))
    texture = sum(
        TEXTURE_AMPLITUDE * np.cos(points @ np.asarray(w["k"]) + w["phase"]) for w in scene["waves"]
    )
    signal = AIR + inside * (TISSUE - AIR + texture)
    label = np.zeros(points.shape[:-1], dtype=np.uint8)
    for blob, sign in [(b, 1.0) for b in scene["lesions"]] + [(b, -1.0) for b in scene["mimics"]]:
        r = _radius(points, np.asarray(blob["centre"]), np.asarray(blob["rotation"]), np.asarray(blob["semi_axes"]))
        # lesions lie inside the tissue by construction; mimics (vessels) end where the tissue ends
        signal = signal + sign * lesion_contrast * _soft_inside(r) * (inside if sign < 0 else 1.0)
        if sign > 0:
            label[r <= 1.0] = 1
    return np.maximum(signal, 0.0), label  # magnitude images: no negative signal before noise


def acquire(
    signal: np.ndarray, points: np.ndarray, acq: Acquisition, *, bias_direction: np.ndarray, half_extent_mm: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Stored float32 intensities of a signal sampled at world ``points``: bias ramp, noise, scale, offset."""
    gain = 1.0 + acq.bias * (points @ bias_direction) / half_extent_mm
    noisy = signal * gain + rng.normal(0.0, acq.noise_std, size=signal.shape)
    return np.asarray(acq.scale * noisy + acq.offset, dtype=np.float32)


# ---------------------------------------------------------------------------- files


def write_nifti_pair(folder: Path, case: str, image: np.ndarray, label: np.ndarray, affine: np.ndarray) -> None:
    """``folder/imagesTr/<case>.nii.gz`` and ``folder/labelsTr/<case>.nii.gz`` on one affine (mm, codes 1)."""
    for sub, data in (("imagesTr", image), ("labelsTr", label)):
        img = nib.Nifti1Image(data, affine)
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
        img.header.set_xyzt_units("mm")
        (folder / sub).mkdir(parents=True, exist_ok=True)
        nib.save(img, folder / sub / f"{case}.nii.gz")


def site_document(
    *,
    name: str,
    label_names: Sequence[str],
    patch_size: Sequence[int],
    target_spacing_mm: Sequence[float],
    patches_per_image: int,
    split_seed: int,
    val_fraction: float,
    test_fraction: float,
) -> dict[str, dict[str, Any]]:
    """A ``nifti_folder`` segmentation site TOML: RAS at one spacing, z-scored, trained on patches."""
    return {
        "site": {"name": name, "task": "segmentation"},
        "source": {"kind": "nifti_folder", "root": name, "images": "imagesTr", "labels": "labelsTr"},
        "labels": {"names": list(label_names)},
        "preprocessing": {
            "spatial_size": [int(s) for s in patch_size],  # the patch size, since patches_per_image > 0
            "spacing": [float(s) for s in target_spacing_mm],
            "orientation": "RAS",
            "intensity": "zscore",
            "patches_per_image": int(patches_per_image),
        },
        "split": {"seed": int(split_seed), "val_fraction": float(val_fraction), "test_fraction": float(test_fraction)},
    }


def unet_federation(*, name: str, seed: int, num_sites: int, rounds: int) -> dict[str, dict[str, Any]]:
    """``[run]`` ``[algorithm]`` ``[training]`` ``[model]``: FedFew K = min(2, M) on a small 3-D UNet.

    The UNet's dimensionality comes from the sites (3 sizes in ``spatial_size``).
    """
    return {
        # evaluating K 3-D models on every site costs about as much as a round of training on 2 CPU cores
        "run": {"name": name, "seed": int(seed), "rounds": int(rounds), "participation": 1.0,
                "eval_every": max(1, min(5, int(rounds) // 2))},
        "algorithm": {"name": "fedfew", "params": {"k": min(2, num_sites)}},
        "training": {"local_epochs": 1, "lr": 0.05, "momentum": 0.9, "batch_size": 4},  # more steps: 8 learns slower
        "model": {"name": "unet", "params": {"channels": [8, 16, 32], "strides": [2, 2]}},
    }


def _check(num_sites: int, volumes_per_site: int, patches_per_image: int, patch_size: Sequence[int]) -> None:
    if num_sites < 1:
        raise ValueError(f"num_sites must be an integer >= 1, got {num_sites}")
    if volumes_per_site < 3:
        raise ValueError(f"volumes_per_site must be an integer >= 3 (train, val and test), got {volumes_per_site}")
    if patches_per_image < 1:
        raise ValueError(f"patches_per_image must be an integer >= 1, got {patches_per_image}")
    if len(patch_size) != 3 or any(p < 1 for p in patch_size):
        raise ValueError(f"patch_size must be 3 integers >= 1, got {list(patch_size)}")


def _jitter(acq: Acquisition, rng: np.random.Generator) -> Acquisition:
    """A site's own version of its protocol: gain ±10 %, contrast ±15 %, noise ±20 %."""
    return replace(
        acq,
        scale=round(acq.scale * float(rng.uniform(0.9, 1.1)), 4),
        lesion_contrast=round(acq.lesion_contrast * float(rng.uniform(0.85, 1.15)), 4),
        noise_std=round(acq.noise_std * float(rng.uniform(0.8, 1.2)), 4),
    )


def prepare_volumes3d(
    out_dir: Path,
    *,
    num_sites: int = 4,
    volumes_per_site: int = 16,
    seed: int = 0,
    field_of_view_mm: Sequence[float] = (48.0, 48.0, 36.0),
    target_spacing_mm: Sequence[float] = (1.5, 1.5, 1.5),
    patch_size: Sequence[int] = (16, 16, 16),
    patches_per_image: int = 4,
    test_fraction: float = 0.25,
    val_fraction: float = 0.1,
    rounds: int = 10,
) -> PreparedFederation:
    """Write the synthetic 3-D segmentation federation of the module docstring.

    Parameters
    ----------
    out_dir
        Folder to write; must be missing or empty.
    num_sites
        M sites; site ``i`` uses protocol ``PROTOCOLS[i % 4]``.
    volumes_per_site
        Volumes (image + label) per site, split by each site file's ``[split]``.
    field_of_view_mm
        World box every volume covers (x, y, z).
    target_spacing_mm
        The site files' ``[preprocessing].spacing``: the grid the sites meet on.
    patch_size, patches_per_image
        The site files' patch sampling for training (test volumes are predicted tile by tile on grid patches and scored whole).
    rounds
        ``[run].rounds`` of the federation file.

    Raises
    ------
    FileExistsError
        If ``out_dir`` is not empty.
    ValueError
        For arguments out of range.
    """
    _check(num_sites, volumes_per_site, patches_per_image, patch_size)
    out = ensure_empty_dir(Path(out_dir))
    half_extent = float(max(field_of_view_mm)) / 2.0
    site_docs, site_meta = [], {}
    for i, site_seq in enumerate(np.random.SeedSequence(seed).spawn(num_sites)):
        jitter_rng, scene_rng, noise_rng = (np.random.default_rng(s) for s in site_seq.spawn(3))
        acq = _jitter(PROTOCOLS[i % len(PROTOCOLS)], jitter_rng)
        direction = jitter_rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        name = f"site{i}"
        affine, shape = grid_affine(orientation=acq.orientation, spacing=acq.spacing, field_of_view_mm=field_of_view_mm)
        points = voxel_centres(affine, shape)  # (*shape, 3) world mm
        cases = []
        for n in range(volumes_per_site):
            scene = draw_scene(field_of_view_mm, scene_rng)
            signal, label = sample_scene(scene, points, lesion_contrast=acq.lesion_contrast)
            image = acquire(signal, points, acq, bias_direction=direction, half_extent_mm=half_extent, rng=noise_rng)
            case = f"case_{n:03d}"
            write_nifti_pair(out / name, case, image, label, affine)
            cases.append({"case": case, "lesions": len(scene["lesions"]), "mimics": len(scene["mimics"]),
                          "lesion_voxel_share": round(float(label.mean()), 6)})
        site_meta[name] = {
            "protocol": asdict(acq),
            "bias_direction": [round(float(v), 6) for v in direction],
            "shape": list(shape),
            "affine": affine.tolist(),
            "volumes": cases,
        }
        site_docs.append(site_document(name=name, label_names=LABEL_NAMES, patch_size=patch_size,
                                       target_spacing_mm=target_spacing_mm, patches_per_image=patches_per_image,
                                       split_seed=seed, val_fraction=val_fraction, test_fraction=test_fraction))
        logger.info("%s: protocol %s, %d volumes of %s voxels at %s mm (%s)", name, acq.name, volumes_per_site,
                    shape, acq.spacing, acq.orientation)
    metadata: dict[str, Any] = {
        "dataset": "volumes3d",
        "source": "synthetic (fedfew_med.datasets.volumes3d); no real data",
        "seed": seed,
        "num_sites": num_sites,
        "volumes_per_site": volumes_per_site,
        "field_of_view_mm": [float(v) for v in field_of_view_mm],
        "target_spacing_mm": [float(v) for v in target_spacing_mm],
        "patch_size": [int(v) for v in patch_size],
        "patches_per_image": patches_per_image,
        "labels": list(LABEL_NAMES),
        "sites": site_meta,
    }
    write_json(out / "partition.json", metadata)
    (out / "README.md").write_text(_readme(metadata))
    header = (f"Written by fedfew_med.datasets.prepare_volumes3d(num_sites={num_sites}, "
              f"volumes_per_site={volumes_per_site}, seed={seed}).\n"
              "SYNTHETIC 3-D volumes (no real data); see README.md and partition.json.")
    federation_file, site_files = write_federation(
        out, site_docs=site_docs, federation=unet_federation(name="volumes3d", seed=seed, num_sites=num_sites, rounds=rounds),
        header=header,
    )
    return PreparedFederation(out_dir=out, federation_file=federation_file, site_files=site_files, metadata=metadata)


def _readme(meta: Mapping[str, Any]) -> str:
    rows = "\n".join(
        f"| {name} | {s['protocol']['name']} | {s['protocol']['orientation']} | "
        f"{' × '.join(f'{v:g}' for v in s['protocol']['spacing'])} | {' × '.join(str(v) for v in s['shape'])} | "
        f"{'bright' if s['protocol']['lesion_contrast'] > 0 else 'dark'} |"
        for name, s in meta["sites"].items()
    )
    return (
        "# volumes3d: a synthetic 3-D segmentation federation\n\n"
        "**Synthetic data, not a benchmark.** Written by `fedfew-med datasets prepare volumes3d` "
        f"(seed {meta['seed']}); every volume is drawn from a seeded generator "
        "(`fedfew_med/datasets/volumes3d.py` describes the scene and the protocols).\n\n"
        f"{meta['volumes_per_site']} volumes per site (`imagesTr/`, `labelsTr/`, NIfTI), labels "
        f"{', '.join(meta['labels'])}. The site files resample every site to RAS at "
        f"{' × '.join(f'{v:g}' for v in meta['target_spacing_mm'])} mm and train on "
        f"{meta['patches_per_image']} random patches of {' × '.join(str(v) for v in meta['patch_size'])} voxels "
        "per volume and epoch.\n\n"
        "| site | protocol | orientation | voxel size (mm) | stored shape | lesions |\n"
        "|---|---|---|---|---|---|\n"
        f"{rows}\n\n"
        "Run it: `fedfew-med simulate federation.toml`. `partition.json` records every drawn parameter.\n"
    )

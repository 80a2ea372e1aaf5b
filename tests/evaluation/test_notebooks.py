"""The clinician notebooks: stored without outputs, and they run top to bottom on tiny runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = ["01_evaluate_my_site.ipynb", "02_compare_sites.ipynb"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebooks_have_no_outputs_and_a_parameter_cell_first(name):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), f"{name}: clear the outputs before committing"
    first = nb.cells[0]
    assert first.cell_type == "code" and "parameters" in first.metadata.get("tags", [])
    assert "RUN_DIR = os.environ.get(\"FEDFEW_RUN_DIR\"" in first.source and "BASELINE_RUNS" in first.source
    assert all("RUN_DIR =" not in c.source for c in code[1:]), "the run directory is set in the parameter cell only"


def _execute(name: str) -> list[dict]:
    """Run a notebook in a fresh kernel (cwd notebooks/, environment inherited); its outputs, cell by cell."""
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK_DIR)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, f"{name}: {errors[0]['ename']}: {errors[0]['evalue']}"
    return outputs


def _images(outputs: list[dict]) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs)


def _text(outputs: list[dict]) -> str:
    return "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


@pytest.mark.slow
def test_notebooks_run_on_a_classification_run_with_baselines(cls_dirs, tmp_path, monkeypatch):
    pytest.importorskip("nbclient")
    monkeypatch.setenv("FEDFEW_RUN_DIR", str(cls_dirs["fedfew"]))
    monkeypatch.setenv("FEDFEW_BASELINE_RUNS", json.dumps(
        {"FedAvg": str(cls_dirs["fedavg"]), "Local only": str(cls_dirs["local"]), "not made": str(tmp_path / "nope")}))
    monkeypatch.setenv("FEDFEW_SITE", "site01-dark")
    monkeypatch.setenv("FEDFEW_BOOTSTRAP", "200")
    site = _execute(NOTEBOOKS[0])
    # deployment, CIs, ROC + confusion + calibration, examples, comparison CIs, comparison ROC + calibration
    assert _images(site) == 9
    assert "baseline runs found: FedAvg, Local only" in _text(site)
    federation = _execute(NOTEBOOKS[1])
    assert _images(federation) == 3  # model use, per-site bars, histories
    assert "No run here records differential privacy" in _text(federation)


@pytest.mark.slow
def test_notebooks_run_on_a_segmentation_run_without_baselines(seg_dp_dir, tmp_path, monkeypatch):
    pytest.importorskip("nbclient")
    monkeypatch.setenv("FEDFEW_RUN_DIR", str(seg_dp_dir))
    monkeypatch.setenv("FEDFEW_BASELINE_RUNS", json.dumps({"FedAvg": str(tmp_path / "nope")}))
    monkeypatch.setenv("FEDFEW_SITE", "site00-bright")
    monkeypatch.setenv("FEDFEW_BOOTSTRAP", "200")
    site = _execute(NOTEBOOKS[0])
    assert _images(site) == 4  # deployment, CIs, per-case, overlays
    assert "No baseline run found" in _text(site)
    federation = _execute(NOTEBOOKS[1])
    assert _images(federation) == 4  # model use, per-site bars, histories, privacy

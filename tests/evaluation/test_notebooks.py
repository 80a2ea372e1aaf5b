"""The clinician notebooks: stored without outputs, and they run top to bottom on tiny runs."""

from __future__ import annotations

import html
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


def test_the_default_site_comes_from_the_run():
    first = nbformat.read(NOTEBOOK_DIR / NOTEBOOKS[0], as_version=4).cells[0].source
    assert 'SITE = os.environ.get("FEDFEW_SITE", "")' in first  # "" = the run's first site, whatever the run


def _execute(name: str, *, allow_errors: bool = False) -> list[dict]:
    """Run a notebook in a fresh kernel (cwd notebooks/, environment inherited); its outputs, cell by cell."""
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=allow_errors,
                   resources={"metadata": {"path": str(NOTEBOOK_DIR)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert allow_errors or not errors, f"{name}: {errors[0]['ename']}: {errors[0]['evalue']}"
    return outputs


def _images(outputs: list[dict]) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs)


def _text(outputs: list[dict]) -> str:
    """Printed text, and the text of displayed tables (HTML, as a notebook shows them)."""
    parts = []
    for o in outputs:
        if o.output_type == "stream":
            parts.append(o.get("text", ""))
        else:
            data = o.get("data", {})
            parts.append(html.unescape(data.get("text/html") or data.get("text/plain", "")))
    return "\n".join(parts)


def _flags(run_dir: Path, site: str) -> list[str]:
    return json.loads((run_dir / "summary.json").read_text())["per_site"][site]["flags"]


@pytest.mark.slow
def test_notebooks_run_on_a_classification_run_with_baselines(collapsed_dir, cls_dirs, tmp_path, monkeypatch):
    pytest.importorskip("nbclient")
    monkeypatch.setenv("FEDFEW_RUN_DIR", str(collapsed_dir))  # the FedFew run, its summary saying the K models collapsed
    monkeypatch.setenv("FEDFEW_BASELINE_RUNS", json.dumps(
        {"FedAvg": str(cls_dirs["fedavg"]), "Local only": str(cls_dirs["local"]), "not made": str(tmp_path / "nope")}))
    monkeypatch.setenv("FEDFEW_SITE", "site01-dark")
    monkeypatch.setenv("FEDFEW_BOOTSTRAP", "200")
    site = _execute(NOTEBOOKS[0])
    # deployment, CIs, ROC + confusion + calibration, examples, comparison CIs, comparison ROC + calibration
    assert _images(site) == 9
    text = _text(site)
    assert "baseline runs found: FedAvg, Local only" in text and "site: site01-dark\n" in text
    assert "site01-dark: its data are not read from a site file (synthetic data)" in text  # no scan to predict on
    assert "COLLAPSE: the 2 shared models collapsed into one" in text
    assert "PPV (positive predictive value)" in text and "NPV (negative predictive value)" in text
    assert "operating point: the model calls 'class 1' when p(class 1) > 0.5" in text
    assert "site01-dark: trained WITHOUT differential privacy; the run is not a DP run" in text
    flags = _flags(collapsed_dir, "site01-dark")
    assert all(f"WARNING: site01-dark (fedfew (K=2)) {flag}" in text for flag in flags)
    assert flags or "No warning for site01-dark" in text
    federation = _execute(NOTEBOOKS[1])
    assert _images(federation) == 3  # model use, per-site bars, histories
    text = _text(federation)
    assert "COLLAPSE: the 2 shared models collapsed into one" in text
    assert "No run here records differential privacy" in text and "warnings about single results" in text


@pytest.mark.slow
def test_notebooks_run_on_a_segmentation_run_without_baselines(seg_dp_dir, cls_dirs, tmp_path, monkeypatch):
    pytest.importorskip("nbclient")
    monkeypatch.setenv("FEDFEW_RUN_DIR", str(seg_dp_dir))
    # a run that does not exist, and one of another federation (other data: its test cases are not these)
    monkeypatch.setenv("FEDFEW_BASELINE_RUNS", json.dumps({"FedAvg": str(tmp_path / "nope"), "Other": str(cls_dirs["fedavg"])}))
    monkeypatch.setenv("FEDFEW_SITE", "site00-bright")
    monkeypatch.setenv("FEDFEW_BOOTSTRAP", "200")
    site = _execute(NOTEBOOKS[0])
    assert _images(site) == 4  # deployment, CIs, per-case, overlays
    text = _text(site)
    assert "No baseline run found on this run's data" in text
    assert f"baseline FedAvg left out: no run at {tmp_path / 'nope'} (no config.json)" in text
    assert f"baseline Other left out: {cls_dirs['fedavg']} trained on other data" in text
    assert "HD95: distances are in pixels" in text and "HD95 (pixels)" in text  # synthetic images: no mm
    assert "site00-bright: trained with differential privacy (DP-SGD): ε = 1 spent" in text
    federation = _execute(NOTEBOOKS[1])
    assert _images(federation) == 4  # model use, per-site bars, histories, privacy


@pytest.mark.slow
def test_notebooks_run_on_a_dp_run_of_site_files_without_a_site_given(png_dp_dir, monkeypatch):
    pytest.importorskip("nbclient")
    monkeypatch.setenv("FEDFEW_RUN_DIR", str(png_dp_dir))
    monkeypatch.setenv("FEDFEW_BASELINE_RUNS", "{}")
    monkeypatch.delenv("FEDFEW_SITE", raising=False)  # as `make notebooks`: the site comes from the run
    monkeypatch.setenv("FEDFEW_BOOTSTRAP", "100")
    summary = json.loads((png_dp_dir / "summary.json").read_text())
    site = _execute(NOTEBOOKS[0])
    assert _images(site) == 7  # deployment, CIs, ROC + confusion + calibration, examples, a new scan's prediction
    text = _text(site)
    assert "predicted by server model" in text and "(the run's deployment)" in text
    assert "site: site0 (the run's first site" in text and "classes: 0 = no_tumor, 1 = tumor" in text
    assert "p(tumor) > 0.5" in text and "'tumor' as positive" in text
    assert all(f"WARNING: site0 (fedfew (K=2)) {flag}" in text for flag in summary["per_site"]["site0"]["flags"])
    eps = summary["privacy"]["site0"]["epsilon"]
    assert f"site0: trained with differential privacy (DP-SGD): ε = {eps:.3g} spent over the whole run at δ = 1e-05" in text
    assert "privacy policy (fedfew-med example policy) allows at most ε = 8 here" in text
    if summary["model_use"]["in_use"] == 1:
        assert "COLLAPSE: all 3 sites deploy model" in text
    federation = _execute(NOTEBOOKS[1])
    assert _images(federation) == 4  # model use, per-site bars, histories, privacy
    text = _text(federation)
    assert "privacy budget per site at the end of the run" in text and "fedfew-med example policy" in text
    for s, entry in summary["per_site"].items():
        assert all(flag in text for flag in entry["flags"]), s


@pytest.mark.slow
def test_a_site_that_is_not_in_the_run_is_named_with_the_runs_sites(png_dp_dir, monkeypatch):
    pytest.importorskip("nbclient")
    monkeypatch.setenv("FEDFEW_RUN_DIR", str(png_dp_dir))
    monkeypatch.setenv("FEDFEW_BASELINE_RUNS", "{}")
    monkeypatch.setenv("FEDFEW_SITE", "site02-noisy")
    from nbclient.exceptions import CellExecutionError

    with pytest.raises(CellExecutionError, match=r"UnknownSiteError.*has no site 'site02-noisy'; its sites are site0, site1, site2"):
        _execute(NOTEBOOKS[0])


@pytest.mark.slow
def test_notebook_01_on_nifti_segmentation_shows_the_scores_as_acquired_and_a_new_scans_mask(nifti_seg_dir, monkeypatch):
    pytest.importorskip("nbclient")
    monkeypatch.setenv("FEDFEW_RUN_DIR", str(nifti_seg_dir))
    monkeypatch.setenv("FEDFEW_BASELINE_RUNS", "{}")
    monkeypatch.delenv("FEDFEW_SITE", raising=False)
    monkeypatch.setenv("FEDFEW_BOOTSTRAP", "50")
    native = json.loads((nifti_seg_dir / "summary.json").read_text())["per_site"]["site0"]["metrics"]
    text = _text(_execute(NOTEBOOKS[0]))
    assert (f"As acquired (each test scan's own grid, against the original label files): Dice "
            f"{native['dice_native']:.3f}, HD95 {native['hd95_native_mm']:.2f} mm") in text
    assert "predicted by server model 0 (the run's deployment)" in text

"""choose-model: a site that did not train scores the run's K models on its own records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedfew_med.checkpoint import CheckpointError
from fedfew_med.cli import main
from fedfew_med.config import ConfigError, load_federation
from fedfew_med.evaluation import load_run
from fedfew_med.evaluation.choose import choose_model, read_choice
from fedfew_med.simulation import run as simulate
from tests.data import sitekit as kit


def _site(folder: Path, name: str, seed_shift: int, size: tuple[int, int] = (8, 8)) -> Path:
    site = kit.png_site(folder, n=16 + seed_shift, size=size)
    site.write_text(site.read_text().replace('name = "site0"', f'name = "{name}"'))
    return site


def _run(tmp_path: Path, algorithm: str = 'name = "fedfew"\nparams = {k = 2}') -> tuple[Path, list[Path]]:
    files = [_site(tmp_path / f"s{i}", f"site{i}", i) for i in range(3)]
    fed = tmp_path / "federation.toml"
    fed.write_text(
        f"[run]\nrounds = 2\n[algorithm]\n{algorithm}\n[training]\nbatch_size = 4\n"
        "[model]\nname = \"classifier\"\nparams = {channels = [4, 8], strides = [2, 2]}\n"
        f"[data]\nname = \"sites\"\nparams = {{files = {json.dumps([str(f) for f in files[:2]])}}}\n"
    )
    run_dir = tmp_path / "run"
    simulate(load_federation(fed), run_dir=run_dir)
    return run_dir, files


@pytest.fixture(scope="module")
def fedfew_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("choose"))


def test_a_trained_site_choosing_again_gets_the_runs_deployment(fedfew_run):
    run_dir, files = fedfew_run
    deployed = load_run(run_dir).site_report("site1", n_resamples=10).deployed
    choice = choose_model(run_dir, files[1], score_test=True)
    assert choice.site == "site1" and choice.split == "train"
    assert choice.model == deployed.model_index and choice.losses == pytest.approx(deployed.scores, abs=1e-12)
    assert choice.model == min(range(2), key=lambda k: choice.losses[k])
    ranked = sorted(choice.losses)
    assert choice.margin == pytest.approx(ranked[1] - ranked[0])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert choice.test_metrics[choice.model]["accuracy"] == summary["per_site"]["site1"]["metrics"]["accuracy"]


def test_a_new_site_chooses_and_predict_finds_its_choice(fedfew_run, capsys):
    run_dir, files = fedfew_run
    assert main(["choose-model", str(run_dir), "--site-config", str(files[2])]) == 0
    out = capsys.readouterr().out
    assert "model 0: loss" in out and "model 1: loss" in out and "<- chosen" in out and "margin" in out
    stored = read_choice(run_dir, "site2")
    assert stored is not None and stored == choose_model(run_dir, files[2])
    assert stored.n_records > 0 and len(stored.losses) == 2


def test_a_site_whose_images_do_not_fit_is_told_why(fedfew_run, tmp_path):
    run_dir, _ = fedfew_run
    other = _site(tmp_path / "big", "big", 0)
    other.write_text(other.read_text().replace("spatial_size = [8, 8]", "spatial_size = [16, 16]"))
    with pytest.raises(ConfigError, match=r"does not fit the run's models \(classifier\): parameter .* size 16"):
        choose_model(run_dir, other)


def test_a_changed_model_file_is_refused(tmp_path):
    run_dir, files = _run(tmp_path)
    with (run_dir / "models.safetensors").open("ab") as fh:
        fh.write(b"x")
    with pytest.raises(CheckpointError, match="SHA-256"):
        choose_model(run_dir, files[2])


def test_a_run_without_shared_models_has_nothing_to_choose(tmp_path):
    run_dir, files = _run(tmp_path, 'name = "local"')
    with pytest.raises(ConfigError, match="local keeps no shared models"):
        choose_model(run_dir, files[2])

"""The CLI on site files: validate-site, and a federation of site TOMLs run end to end."""

from __future__ import annotations

import json
from pathlib import Path

from fedfew_med.cli import main
from fedfew_med.config import load_federation
from tests.data import sitekit as kit


def _federation(tmp_path: Path, n_sites: int = 2) -> Path:
    files = []
    for i in range(n_sites):
        site = kit.png_site(tmp_path / f"s{i}", n=16, size=(8, 8))
        text = site.read_text().replace('name = "site0"', f'name = "site{i}"')
        site.write_text(text)
        files.append(str(site.relative_to(tmp_path)))
    fed = tmp_path / "federation.toml"
    fed.write_text(
        "[run]\nrounds = 2\n[algorithm]\nname = \"fedfew\"\nparams = {k = 2}\n[training]\nbatch_size = 4\n"
        "[model]\nname = \"classifier\"\nparams = {channels = [4, 8], strides = [2, 2]}\n"
        f"[data]\nname = \"sites\"\nparams = {{files = {json.dumps(files)}}}\n"
    )
    return fed


def test_validate_site_ok_and_problems(tmp_path, capsys):
    site = kit.png_site(tmp_path / "ok", n=12)
    assert main(["validate-site", str(site)]) == 0
    assert "site0" in capsys.readouterr().out
    next((tmp_path / "ok").rglob("*.png")).write_bytes(b"not a png")
    assert main(["validate-site", str(site)]) == 1
    out = capsys.readouterr().out
    assert ".png" in out and "problem" in out
    assert main(["validate-site", str(site), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["problems"][0]["file"].endswith(".png")


def test_validate_site_bad_config_exit_2(tmp_path, capsys):
    assert main(["validate-site", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml" in capsys.readouterr().err


def test_federation_of_site_files_runs_and_paths_become_absolute(tmp_path, capsys):
    fed = _federation(tmp_path)
    cfg = load_federation(fed)
    assert all(Path(f).is_absolute() for f in cfg.data.params["files"])
    out_dir = tmp_path / "run"
    assert main(["simulate", str(fed), "-o", str(out_dir), "-q"]) == 0
    assert "fedfew (K=2), 2 rounds" in capsys.readouterr().out
    resolved = json.loads((out_dir / "config.json").read_text())
    assert all(Path(f).is_absolute() for f in resolved["data"]["params"]["files"])


def test_training_refuses_a_site_that_fails_validation(tmp_path, capsys):
    fed = _federation(tmp_path)
    bad = next((tmp_path / "s1").rglob("*.png"))
    bad.write_bytes(b"\x89PNG truncated")
    assert main(["simulate", str(fed), "-o", str(tmp_path / "run"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "site1" in err and bad.name in err


def test_loading_site_files_shows_progress(tmp_path):
    import os
    import subprocess
    import sys

    fed = _federation(tmp_path, n_sites=2)
    proc = subprocess.run([sys.executable, "-m", "fedfew_med.cli", "simulate", str(fed), "--output", str(tmp_path / "r"),
                           "--progress", "--set", "run.rounds=1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    # two steps per site: its files checked, then preprocessed
    assert "loading sites" in proc.stdout and "4/4" in proc.stdout and "site1: preprocessed" in proc.stdout

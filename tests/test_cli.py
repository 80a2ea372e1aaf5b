"""The command line: help texts, exit codes, one-line errors naming file and key."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedfew_med.cli import build_parser, main


def test_help_explains_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "simulate" in out and "FedFew" in out
    sub = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name in sub:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        assert "usage: fedfew-med " + name in capsys.readouterr().out


def test_bad_config_path_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["simulate", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fedfew-med: error: {tmp_path / 'missing.toml'}: config file not found"]


def test_bad_key_names_file_and_key(tmp_path, capsys):
    cfg = tmp_path / "fed.toml"
    cfg.write_text('[run]\nrounds = 2\nlearning_rate = 1\n[algorithm]\nname = "fedfew"\n[model]\nname = "classifier"\n[data]\nname = "synthetic"\n')
    assert main(["simulate", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{cfg}: [run]: unknown key 'learning_rate'" in err[0]


def test_bad_algorithm_option(tmp_path, capsys):
    cfg = tmp_path / "fed.toml"
    cfg.write_text('[algorithm]\nname = "fedfew"\nparams = {k = 0}\n[model]\nname = "classifier"\n[data]\nname = "synthetic"\n')
    assert main(["simulate", str(cfg), "-o", str(tmp_path / "r")]) == 2
    assert f"{cfg}: [algorithm].params.k must be an integer >= 1, got 0" in capsys.readouterr().err


def test_simulate_prints_table_and_resumes(tmp_path, capsys):
    from tests.conftest import TINY

    cfg = tmp_path / "fed.toml"
    cfg.write_text(_toml(TINY))
    out_dir = tmp_path / "run"
    assert main(["simulate", str(cfg), "-o", str(out_dir), "--stop-after", "2", "-q"]) == 0
    assert main(["simulate", str(cfg), "-o", str(out_dir), "-q"]) == 2  # refuses to clobber
    assert "--resume" in capsys.readouterr().err
    assert main(["simulate", str(cfg), "-o", str(out_dir), "--resume", "-q"]) == 0
    out = capsys.readouterr().out
    assert "fedfew (K=2), 4 rounds" in out and "site00-bright" in out and "Jain" in out
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["finished"] is True
    use = summary["model_use"]  # how many models the sites deploy, and why: one line under the table
    assert f"models: {use['note']}" in out and use["of"] == 2 and 1 <= use["in_use"] <= 2


def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "fedfew_med.cli", "--help"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "usage: fedfew-med" in proc.stdout


HEAVY = ("torch", "monai", "flwr", "opacus", "numpy", "matplotlib")

HELP_PROBE = """
import argparse, contextlib, io, sys
from fedfew_med.cli import build_parser, main
def walk(p, prefix):
    yield prefix
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield from walk(sp, prefix + [name])
commands = list(walk(build_parser(), []))
for command in commands:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main([*command, "--help"])
print(len(commands), " ".join(sorted(m for m in sys.argv[1:] if m in sys.modules)))
"""


def test_help_of_every_command_loads_no_heavy_library():
    """`--help` of the CLI and of every (nested) subcommand imports none of torch, MONAI, Flower, Opacus, numpy:
    that is what makes it answer within a second of a bare interpreter (issue 17; the import rule, not a timing)."""
    proc = subprocess.run([sys.executable, "-c", HELP_PROBE, *HEAVY], capture_output=True, text=True, check=True)
    count, *loaded = proc.stdout.split()
    assert int(count) >= 13  # the root, simulate, privacy-report, validate-site, datasets (prepare), flower (6 steps)
    assert loaded == [], f"--help imported {loaded}"


def _toml(data: dict) -> str:
    lines: list[str] = []

    def value(v):
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    def table(prefix: str, d: dict) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
        lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        for k, v in d.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}", v)

    for name, section in data.items():
        table(name, section)
    return "\n".join(lines) + "\n"


def test_progress_covers_evaluation_and_the_table_starts_on_its_own_line(tmp_path):
    import tomli_w

    from tests.conftest import tiny_dict

    cfg = tmp_path / "fed.toml"
    cfg.write_bytes(tomli_w.dumps(tiny_dict(run={"rounds": 2})).encode())
    # stdout and stderr in one pipe, as a terminal shows them; the table is printed after the bars close
    proc = subprocess.run([sys.executable, "-m", "fedfew_med.cli", "simulate", str(cfg), "--output", str(tmp_path / "r"),
                           "--progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=True,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    bars, table = proc.stdout.split("site               protocol", 1)
    assert "round 1 evaluation" in bars and "rounds: 100%" in bars
    assert bars.endswith("\n"), repr(bars[-80:])  # not after a cursor-up left by the inner bar
    assert table.splitlines()[0].split()[:3] == ["n_train", "model", "accuracy"]


def test_a_bad_set_argument_is_blamed_on_the_set_argument(tmp_path, capsys):
    import tomli_w

    from tests.conftest import tiny_dict

    cfg = tmp_path / "fed.toml"
    cfg.write_bytes(tomli_w.dumps(tiny_dict()).encode())
    assert main(["simulate", str(cfg), "--set", "run.rounds=three"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedfew-med: error: --set run.rounds=three: [run]") and "fed.toml" not in err[0]

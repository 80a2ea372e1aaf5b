"""Config loading: frozen dataclasses, and errors that name file, key, expectation and value."""

from __future__ import annotations

import dataclasses

import pytest
import tomli_w

from fedfew_med.config import (
    ConfigError,
    apply_overrides,
    federation_from_dict,
    load_federation,
    parse_override,
)
from tests.conftest import TINY, tiny_dict


def test_valid_config_loads_into_frozen_dataclasses(tiny_config):
    assert tiny_config.run.rounds == 4
    assert tiny_config.training.lr == 0.05
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny_config.run.rounds = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"run": {"rounds": 0}}, "tiny.toml: [run].rounds must be an integer >= 1, got 0"),
        ({"run": {"rounds": "ten"}}, "tiny.toml: [run].rounds must be an integer, got 'ten'"),
        ({"run": {"participation": 1.5}}, "tiny.toml: [run].participation must be in (0, 1]"),
        ({"run": {"roundz": 3}}, "tiny.toml: [run]: unknown key 'roundz'"),
        ({"training": {"lr": -1}}, "tiny.toml: [training].lr must be > 0, got -1.0"),
        ({"training": {"batch_size": 2.5}}, "tiny.toml: [training].batch_size must be an integer, got 2.5"),
        ({"run": {"seed": True}}, "tiny.toml: [run].seed must be an integer, got True"),
    ],
)
def test_bad_values_name_file_key_and_value(sections, expected):
    with pytest.raises(ConfigError) as err:
        federation_from_dict(tiny_dict(**sections), source="tiny.toml")
    assert expected in str(err.value)


def test_unknown_and_missing_sections():
    bad = dict(TINY, extra={"a": 1})
    with pytest.raises(ConfigError, match=r"tiny.toml: unknown section \[extra\]"):
        federation_from_dict(bad, source="tiny.toml")
    missing = {k: v for k, v in TINY.items() if k != "model"}
    with pytest.raises(ConfigError, match=r"tiny.toml: section \[model\] is required"):
        federation_from_dict(missing, source="tiny.toml")


def test_digest_changes_with_any_value(tiny_config):
    other = federation_from_dict(tiny_dict(run={"seed": 4}), source="tiny.toml")
    assert tiny_config.digest() != other.digest()
    assert tiny_config.digest() == federation_from_dict(tiny_dict(), source="elsewhere.toml").digest()


@pytest.mark.parametrize(
    ("text", "path", "value"),
    [
        ("run.rounds=5", ["run", "rounds"], 5),
        ("algorithm.params.mu=0.1", ["algorithm", "params", "mu"], 0.1),
        ('algorithm.name="ifca"', ["algorithm", "name"], "ifca"),
        ("algorithm.name=ifca", ["algorithm", "name"], "ifca"),
        ("run.participation = 0.5", ["run", "participation"], 0.5),
    ],
)
def test_parse_override(text, path, value):
    assert parse_override(text) == (path, value)


def test_overrides_do_not_mutate_the_input():
    raw = tiny_dict()
    out = apply_overrides(raw, ["run.rounds=9"])
    assert out["run"]["rounds"] == 9 and raw["run"]["rounds"] == 4


def test_load_federation_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_federation(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nrounds = 1\n")
    with pytest.raises(ConfigError, match=r"bad.toml: not valid TOML"):
        load_federation(bad)
    typo = tmp_path / "typo.toml"
    typo.write_text('[run]\nrunds = 2\n[algorithm]\nname = "fedavg"\n[model]\nname = "classifier"\n[data]\nname = "synthetic"\n')
    with pytest.raises(ConfigError, match=r"typo.toml: \[run\]: unknown key 'runds'"):
        load_federation(typo)


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"run": {"roundz": 3}}, "unknown key 'roundz' (did you mean 'rounds'?); allowed keys are"),
        ({"training": {"learning_rate": 0.1}}, "unknown key 'learning_rate'; allowed keys are"),  # nothing close
        ({"algorithm": {"params": {"kk": 2}}}, "unknown key 'kk' (did you mean 'k'?)"),
        ({"trainig": {"lr": 0.1}}, "unknown section [trainig] (did you mean 'training'?)"),
    ],
)
def test_unknown_keys_suggest_the_closest_allowed_one(sections, expected, tmp_path):
    from fedfew_med.algorithms import build_algorithm

    with pytest.raises(ConfigError) as err:
        cfg = federation_from_dict(tiny_dict(**sections), source="tiny.toml")
        build_algorithm(cfg.algorithm.name, cfg.algorithm.params, seed=0, where="tiny.toml: [algorithm]")
    assert expected in str(err.value)


def _write_tiny(path):
    path.write_bytes(tomli_w.dumps(TINY).encode())
    return path


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["run.rounds=three"], "--set run.rounds=three: [run]"),
        (["run.seed=1", "run.roundz=3"], "--set run.roundz=3: [run]: unknown key 'roundz' (did you mean 'rounds'?)"),
        (["training.lr=-1"], "--set training.lr=-1: [training]"),
    ],
)
def test_a_bad_set_argument_is_named_not_the_file(overrides, expected, tmp_path):
    path = _write_tiny(tmp_path / "ok.toml")
    with pytest.raises(ConfigError) as err:
        load_federation(path, overrides)
    assert str(err.value).startswith(expected) and "ok.toml" not in str(err.value)


def test_a_bad_file_is_still_blamed_on_the_file_whatever_the_set_arguments(tmp_path):
    bad = dict(TINY, run={**TINY["run"], "rounds": 0})
    path = tmp_path / "bad.toml"
    path.write_bytes(tomli_w.dumps(bad).encode())
    with pytest.raises(ConfigError, match=r"^.*bad.toml: \[run\]"):
        load_federation(path, ["run.seed=1"])

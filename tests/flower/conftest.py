"""Fixtures of the Flower tests: the ``integration`` marker, config files, Flower's task identity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tomli_w

from fedfew_med.config import FederationConfig, load_federation
from tests.conftest import tiny_dict


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "integration: starts real Flower processes (SuperLink, SuperNodes) on loopback; minutes, not seconds",
    )


def write_config(path: Path, **sections: dict[str, Any]) -> FederationConfig:
    """Write the tiny federation config (with section updates) as TOML and load it back."""
    path.write_text(tomli_w.dumps(tiny_dict(**sections)), encoding="utf-8")
    return load_federation(path)


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps every new Message with the identity of the process's task; give the test one."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)

"""Shared fixtures: a tiny synthetic federation config that runs in about a second."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from fedfew_med.config import FederationConfig, federation_from_dict

TINY: dict[str, Any] = {
    "run": {"name": "tiny", "seed": 3, "rounds": 4},
    "algorithm": {"name": "fedfew", "params": {"k": 2, "mu": 0.01}},
    "training": {"local_epochs": 1, "lr": 0.05, "batch_size": 16},
    "model": {"name": "classifier", "params": {"channels": [4, 8], "strides": [2, 2]}},
    "data": {
        "name": "synthetic",
        "params": {"num_sites": 3, "image_size": 16, "train_min": 24, "train_max": 40, "test_per_site": 20, "seed": 1},
    },
}


def tiny_dict(**sections: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of the tiny config with sections updated key by key."""
    out = copy.deepcopy(TINY)
    for name, values in sections.items():
        out.setdefault(name, {}).update(values)
    return out


@pytest.fixture
def tiny_config() -> FederationConfig:
    return federation_from_dict(tiny_dict(), source="tiny.toml")

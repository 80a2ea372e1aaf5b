"""Atomic, digest-checked, pickle-free checkpoints."""

from __future__ import annotations

import pytest
import torch

from fedfew_med import checkpoint
from fedfew_med.training import SiteState


def _state(seed: int):
    g = torch.Generator().manual_seed(seed)
    models = [{"conv.weight": torch.randn(2, 3, generator=g), "fc.bias": torch.randn(4, generator=g)} for _ in range(2)]
    sites = {
        "site-a": SiteState(models={"personal": {"w": torch.randn(3, generator=g)}}, buffers={"server/1": {"bn.running_mean": torch.randn(2, generator=g)}}),
        "site_b.2": SiteState(),
    }
    return models, sites


def test_roundtrip_is_exact(tmp_path):
    models, sites = _state(0)
    checkpoint.save(tmp_path, 3, server_models=models, sites=sites, state={"config_digest": "abc"})
    ck = checkpoint.load(tmp_path)
    assert ck is not None and ck.round == 3 and ck.state == {"config_digest": "abc"}
    for a, b in zip(models, ck.server_models, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(ck.sites["site-a"].models["personal"]["w"], sites["site-a"].models["personal"]["w"])
    assert torch.equal(ck.sites["site-a"].buffers["server/1"]["bn.running_mean"], sites["site-a"].buffers["server/1"]["bn.running_mean"])


def test_keeps_two_and_points_to_latest(tmp_path):
    models, sites = _state(0)
    for r in range(4):
        checkpoint.save(tmp_path, r, server_models=models, sites=sites, state={})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["LATEST", "round-00002", "round-00003"]
    assert checkpoint.latest_round(tmp_path) == 3


def test_interrupted_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    models, sites = _state(0)
    checkpoint.save(tmp_path, 0, server_models=models, sites=sites, state={"r": 0})

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", boom)
    new_models, _ = _state(1)
    with pytest.raises(checkpoint.WriteError, match=r"round-00001.*No space left on device.*round 0\) is intact"):
        checkpoint.save(tmp_path, 1, server_models=new_models, sites=sites, state={"r": 1})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["LATEST", "round-00000"]  # no tmp dir left
    ck = checkpoint.load(tmp_path)
    assert ck is not None and ck.round == 0 and ck.state == {"r": 0}
    assert torch.equal(ck.server_models[0]["conv.weight"], models[0]["conv.weight"])


def test_tampered_file_is_refused(tmp_path):
    models, sites = _state(0)
    path = checkpoint.save(tmp_path, 0, server_models=models, sites=sites, state={})
    blob = bytearray((path / "server.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (path / "server.safetensors").write_bytes(bytes(blob))
    with pytest.raises(checkpoint.CheckpointError, match="SHA-256"):
        checkpoint.load(tmp_path)


def test_no_checkpoint(tmp_path):
    assert checkpoint.load(tmp_path) is None
    assert checkpoint.latest_round(tmp_path) is None

"""[training] device and precision: validation, resolution, CPU identity, device-free state, resume across devices.

Nothing here needs a GPU; the tests marked ``gpu`` run only where torch sees one
(``benchmarks/gpu_check.sh`` runs them on a lent GPU machine).
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from fedfew_med.config import ConfigError, federation_from_dict
from fedfew_med.devices import autocast, grad_scaler, resolve_device, to_cpu
from fedfew_med.simulation import run
from tests.conftest import tiny_dict

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")


def _config(**training):
    return federation_from_dict(tiny_dict(training=training), source="tiny.toml")


@pytest.mark.parametrize(
    ("key", "value", "ok"),
    [
        ("device", "auto", True),
        ("device", "cpu", True),
        ("device", "cuda", True),  # valid config; whether the machine has it is checked when the run starts
        ("device", "cuda:1", True),
        ("device", "gpu", False),
        ("device", "cuda:", False),
        ("device", "cuda:x", False),
        ("device", "CPU", False),
        ("device", 0, False),
        ("precision", "32", True),
        ("precision", "bf16", True),
        ("precision", "16-mixed", True),
        ("precision", "16", False),
        ("precision", "fp16", False),
        ("precision", 32, False),
    ],
)
def test_config_accepts_only_the_documented_values(key, value, ok):
    if ok:
        assert getattr(_config(**{key: value}).training, key) == value
    else:
        with pytest.raises(ConfigError) as exc:
            _config(**{key: value})
        assert "tiny.toml" in str(exc.value) and key in str(exc.value) and repr(value) in str(exc.value)


def test_auto_resolves_to_cuda_when_present_else_cpu():
    assert resolve_device("auto") == torch.device("cuda" if HAS_CUDA else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_gpu_that_is_not_there_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for spec in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(ValueError, match=r"sees no CUDA device.*\"auto\""):
            resolve_device(spec)
    assert resolve_device("auto") == torch.device("cpu")


def test_a_run_on_a_missing_gpu_is_refused_before_anything_trains(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"tiny.toml.*\[training\].device = 'cuda:0'"):
        run(_config(device="cuda:0"), run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_digest_ignores_the_device_and_keeps_old_configs_digests():
    base = _config()
    assert _config(device="cpu").digest() == _config(device="cuda").digest() == base.digest()
    assert _config(precision="bf16").digest() != base.digest()
    # a config written before the options existed: its digest is unchanged
    old = base.to_dict()
    del old["training"]["device"], old["training"]["precision"], old["training"]["one_pass"], old["training"]["channels_last"]
    del old["run"]["metric"]
    assert base.digest() == hashlib.sha256(json.dumps(old, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_cpu_float32_helpers_are_the_identity():
    cpu = torch.device("cpu")
    assert grad_scaler(cpu, "32") is None and grad_scaler(cpu, "bf16") is None
    with autocast(cpu, "32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(cpu, "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    x = torch.arange(3.0)
    y = to_cpu({"x": x})["x"]
    assert torch.equal(x, y) and y.data_ptr() != x.data_ptr()  # a copy: the source may go on training


@pytest.mark.parametrize("precision", ["bf16", "16-mixed"])
def test_reduced_precision_trains_and_leaves_float32_cpu_state(tmp_path, precision):
    result = run(_config(device="cpu", precision=precision), run_dir=tmp_path / "r")
    reference = run(_config(device="cpu"), run_dir=tmp_path / "fp32")
    for model in result.models:
        assert all(t.dtype == torch.float32 and t.device.type == "cpu" and torch.isfinite(t).all() for t in model.values())
    saved = load_file(str(tmp_path / "r/checkpoints/round-00003/sites.safetensors"))
    assert all(t.dtype == torch.float32 for t in saved.values())
    assert result.summary["compute"] == {"device": "cpu", "precision": precision}
    # another arithmetic, the same learning: not the float32 numbers, but close to them
    first = next(iter(result.models[0]))
    assert not torch.equal(result.models[0][first], reference.models[0][first])
    assert result.summary["summary"]["mean"] == pytest.approx(reference.summary["summary"]["mean"], abs=0.25)


def test_resume_after_a_device_change_equals_uninterrupted_to_the_bit(tmp_path):
    """Checkpoints hold CPU tensors and the digest ignores the device: a run started with one device
    setting resumes with another (here cpu → auto, which is the CPU on this machine; on a GPU machine
    the same path is cuda → cpu, run by the gpu-marked test below)."""
    straight = run(_config(device="cpu"), run_dir=tmp_path / "straight")
    run(_config(device="cpu"), run_dir=tmp_path / "split", stop_after=2)
    resumed = run(_config(device="auto"), run_dir=tmp_path / "split", resume=True)
    assert resumed.summary["finished"]
    for a, b in zip(straight.models, resumed.models, strict=True):
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert resumed.summary["compute"]["device"] == str(resolve_device("auto"))


def test_dp_refuses_reduced_precision(tmp_path):
    cfg = federation_from_dict(
        {**tiny_dict(training={"precision": "bf16"}), "privacy": {"epsilon": 8.0}},
        source="tiny.toml",
    )
    with pytest.raises(ConfigError, match=r'precision must be "32" when a site trains with DP'):
        run(cfg, run_dir=tmp_path / "r")


@gpu
def test_gpu_run_matches_cpu_and_resumes_on_the_cpu(tmp_path):
    cpu = run(_config(device="cpu"), run_dir=tmp_path / "cpu")
    run(_config(device="cuda"), run_dir=tmp_path / "gpu", stop_after=2)
    ckpt = load_file(str(tmp_path / "gpu/checkpoints/round-00001/server.safetensors"))
    assert all(t.device.type == "cpu" for t in ckpt.values())
    resumed = run(_config(device="cpu"), run_dir=tmp_path / "gpu", resume=True)  # started on the GPU, ends on the CPU
    assert resumed.summary["finished"]
    assert resumed.summary["summary"]["mean"] == pytest.approx(cpu.summary["summary"]["mean"], abs=0.05)
    for a, b in zip(cpu.models, resumed.models, strict=True):
        for n in a:
            torch.testing.assert_close(a[n], b[n], atol=1e-3, rtol=1e-3)


@gpu
def test_gpu_bf16_trains(tmp_path):
    result = run(_config(device="cuda", precision="bf16"), run_dir=tmp_path / "r")
    assert result.summary["compute"]["device"].startswith("cuda")
    assert all(torch.isfinite(t).all() for m in result.models for t in m.values())


@gpu
def test_gpu_channels_last_matches_the_default_layout(tmp_path):
    default = run(_config(device="cuda"), run_dir=tmp_path / "a")
    fast = run(_config(device="cuda", channels_last=True), run_dir=tmp_path / "b")
    for a, b in zip(default.models, fast.models, strict=True):
        for n in a:
            torch.testing.assert_close(b[n], a[n], atol=1e-3, rtol=1e-3)

"""Model files are verified by SHA-256 on load: every loader, a flipped byte, a clear error naming the file.

Table-driven over every place that reads model weights from a run directory: the checkpoint
(server and site tensors), the final ``models.safetensors``, the notebooks' API
(:func:`fedfew_med.evaluation.load_run`, :meth:`Run.final_models`), a resumed simulation and a
resumed Flower coordinator. The byte flipped is the file's last one, in the tensor data: the
file still parses as safetensors, so only the digest can tell (safetensors has no checksum).
A Flower site's own state snapshots (:mod:`fedfew_med.flower.site_store`) carry the SHA-256 of
their tensors in their header: a flipped byte, a dropped digest, re-written tensors or an edited
index are each refused.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from fedfew_med import checkpoint, evaluation
from fedfew_med.audit.report import digests
from fedfew_med.checkpoint import CheckpointError
from fedfew_med.config import FederationConfig, federation_from_dict
from fedfew_med.flower.site_store import SiteStateError, SiteStore
from fedfew_med.simulation import run
from fedfew_med.training import SiteState
from tests.conftest import tiny_dict
from tests.flower.conftest import task_identity  # noqa: F401 (a fixture: Flower stamps messages with a task identity)

LAST = "checkpoints/round-00001"


def config() -> FederationConfig:
    """Ditto: every site keeps a personal model, so the checkpoint's site file holds tensors too."""
    return federation_from_dict(tiny_dict(run={"name": "digests", "seed": 3, "rounds": 2},
                                          algorithm={"name": "ditto", "params": {"lam": 0.1}}), source="tiny.toml")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-round run (checkpoints of rounds 0 and 1, models.safetensors, summary.json)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks on a shared machine
    try:
        run_dir = tmp_path_factory.mktemp("digests") / "run"
        run(config(), run_dir=run_dir)
    finally:
        torch.set_num_threads(saved)
    return run_dir


def flip_last_byte(path: Path) -> None:
    """Change the file's last byte (tensor data: the file still parses, the values differ)."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))


def _resume_simulation(run_dir: Path) -> Any:
    return run(config(), run_dir=run_dir, resume=True)


def _resume_coordinator(run_dir: Path) -> Any:
    from fedfew_med.flower.client_app import app
    from fedfew_med.flower.coordinator import Coordinator, ServerSettings
    from tests.flower.fakegrid import LocalGrid

    (run_dir.parent / "fed.toml").write_text("")  # ServerSettings wants a path; the config object is passed directly
    settings = ServerSettings(federation_config=run_dir.parent / "fed.toml", run_dir=run_dir, resume=True,
                              connect_timeout=0.1, query_timeout=0.1, round_timeout=0.1, poll_interval=0.01)
    return Coordinator(LocalGrid(app, {}), config(), settings).run()


# (loader name, file flipped, load function)
LOADERS: list[tuple[str, str, Callable[[Path], Any]]] = [
    ("checkpoint.load: server models", f"{LAST}/server.safetensors", checkpoint.load),
    ("checkpoint.load: site states", f"{LAST}/sites.safetensors", checkpoint.load),
    ("checkpoint.load_final: served models", "models.safetensors", checkpoint.load_final),
    ("evaluation.load_run (notebooks)", f"{LAST}/server.safetensors", evaluation.load_run),
    ("evaluation.load_run: site states", f"{LAST}/sites.safetensors", evaluation.load_run),
    ("Run.final_models (notebooks)", "models.safetensors", lambda d: evaluation.load_run(d).final_models()),
    ("simulate --resume", f"{LAST}/sites.safetensors", _resume_simulation),
    ("Flower coordinator resume", f"{LAST}/server.safetensors", _resume_coordinator),
]


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("target", "load"), [c[1:] for c in LOADERS], ids=[c[0] for c in LOADERS])
def test_a_flipped_byte_is_refused_with_the_file_named(tmp_path, finished, target, load):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    if "resume" not in load.__name__:  # the intact copy loads (resuming a finished run would rewrite it)
        load(run_dir)
    path = run_dir / target
    flip_last_byte(path)
    load_file(str(path))  # still a valid safetensors file: only the digest tells
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ": missing or its SHA-256 does not match"):
        load(run_dir)


def test_the_final_models_are_the_last_checkpoints_server_models(finished):
    ckpt = checkpoint.load(finished)
    assert ckpt is not None
    final = checkpoint.load_final(finished)
    assert len(final) == len(ckpt.server_models) >= 1
    for a, b in zip(final, ckpt.server_models, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert evaluation.load_run(finished).final_models()[0].keys() == final[0].keys()


def _drop_digest(run_dir: Path) -> None:
    state = run_dir / LAST / "state.json"
    meta = json.loads(state.read_text())
    del meta["digests"]["server.safetensors"]
    state.write_text(json.dumps(meta))


def _drop_summary_digest(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    del summary["models_sha256"]
    (run_dir / "summary.json").write_text(json.dumps(summary))


MISSING: list[tuple[str, Callable[[Path], None], Callable[[Path], Any], str]] = [
    ("state.json without the server digest", _drop_digest, checkpoint.load,
     f"{LAST}/state.json: records no SHA-256 for server.safetensors"),
    ("checkpoint tensors deleted", lambda d: (d / LAST / "sites.safetensors").unlink(), checkpoint.load,
     f"{LAST}/sites.safetensors: missing or its SHA-256 does not match"),
    ("summary.json without models_sha256", _drop_summary_digest, checkpoint.load_final,
     "summary.json: records no models_sha256; .*models.safetensors cannot be verified"),
    ("summary.json deleted", lambda d: (d / "summary.json").unlink(), checkpoint.load_final, "summary.json: unreadable"),
    ("models.safetensors deleted", lambda d: (d / "models.safetensors").unlink(), checkpoint.load_final,
     "models.safetensors: missing or its SHA-256 does not match"),
    ("models.safetensors replaced by older models", lambda d: shutil.copy(d / "checkpoints/round-00000/server.safetensors", d / "models.safetensors"),
     checkpoint.load_final, "models.safetensors: missing or its SHA-256 does not match"),
]


@pytest.mark.parametrize(("tamper", "load", "message"), [c[1:] for c in MISSING], ids=[c[0] for c in MISSING])
def test_a_missing_digest_or_file_is_refused_not_skipped(tmp_path, finished, tamper, load, message):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    tamper(run_dir)
    with pytest.raises(CheckpointError, match=message):
        load(run_dir)


def test_the_audit_report_flags_a_changed_model_file(tmp_path, finished):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    assert digests(run_dir)["verified"]
    flip_last_byte(run_dir / "models.safetensors")
    assert not digests(run_dir)["verified"]


def _resave(path, edit):
    """Rewrite a snapshot with its tensors and ``edit(metadata)``: a header someone changed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as fh:
        meta, tensors = dict(fh.metadata()), {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    edit(meta, tensors)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (flip_last_byte, "do not match its SHA-256"),
        (lambda p: _resave(p, lambda m, t: m.pop("sha256")), "records no sha256"),
        (lambda p: _resave(p, lambda m, t: t.update(t0=t["t0"] + 1)), "do not match its SHA-256"),  # re-written tensors
        (lambda p: _resave(p, lambda m, t: m.update(index=m["index"].replace("personal", "other"))), "do not match"),
    ],
    ids=["flipped-byte", "no-digest", "new-tensor-values", "edited-index"],
)
def test_a_site_state_snapshot_that_changed_is_refused(tmp_path, damage, message):
    store = SiteStore(tmp_path, run_key="run-1", site="site-a")
    state = SiteState()
    state.models["personal"] = {"w": torch.arange(16, dtype=torch.float32), "step": torch.tensor(3)}
    state.buffers["personal"] = {"flag": torch.tensor([True, False])}
    path = store.save(0, state)
    loaded = store.load(0)  # a 0-dim and a bool tensor are digested too
    assert torch.equal(loaded.models["personal"]["w"], state.models["personal"]["w"])
    assert torch.equal(loaded.models["personal"]["step"], state.models["personal"]["step"])
    damage(path)
    with pytest.raises(SiteStateError, match=re.escape(str(path)) + ".*" + message):
        store.load(0)

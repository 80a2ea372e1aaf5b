"""Nothing is ever unpickled: not checkpoints, not Flower messages, not data caches.

Two halves.

*Static*, on the source of ``fedfew_med/`` (parsed with :mod:`ast`, never imported or grepped):
no import of a pickling module (pickle, cPickle, _pickle, dill, joblib, shelve, marshal,
cloudpickle), no ``torch.load`` without ``weights_only=True``, no ``torch.save`` /
``torch.jit.load`` / ``torch.jit.save`` at all (tensors go to safetensors, metadata to JSON), no
``numpy.load`` / ``numpy.save`` whose ``allow_pickle`` is not a literal ``False`` where it is
given (``numpy.save`` defaults to True, so it must be given), no call anywhere that passes
``allow_pickle`` other than ``False`` (MONAI's ``NumpyReader`` for one), no pandas
``read_pickle`` / ``to_pickle``, and no MONAI dataset that pickles its cache to disk
(``PersistentDataset``, ``CacheNTransDataset``, ``LMDBDataset``, ``GDSDataset``). Aliases
(``import torch as T``, ``from torch import load``) are resolved. The checker is itself tested on
snippets that must and must not be flagged.

*Dynamic*: ``pickle.load``, ``pickle.loads`` and ``pickle.Unpickler`` (and the same names of the C
module ``_pickle``) are replaced by functions that record the call and raise; then a DP federation
runs a round, is checkpointed and resumed, its run directory is loaded through the notebooks' API,
a Flower reply, a model and a site state go through Flower's own wire serialisation and back, a
site snapshot is written and read, and a real PNG + CSV site is loaded through MONAI. Nothing may
call them (the record is checked too, since the federation skips a site that raises).

Scope of the dynamic half: it sees every unpickling that goes through the ``pickle`` module's
functions at call time. It would not see ``multiprocessing``'s ``ForkingPickler`` (bound to
``pickle.loads`` when imported); the project starts no worker processes (every ``DataLoader``
has ``num_workers=0``, sites run in one process), so nothing crosses a process boundary by pickle.
"""

from __future__ import annotations

import _pickle
import ast
import io
import pickle
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.flower.conftest import task_identity  # noqa: F401 (a fixture: Flower stamps messages with a task identity)

PACKAGE = Path(__file__).resolve().parents[2] / "fedfew_med"

BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}
BANNED_CALLS = {  # dotted name -> why (always refused)
    "torch.save": "torch.save pickles; write tensors with safetensors and metadata as JSON",
    "torch.jit.save": "TorchScript archives hold pickles; write tensors with safetensors",
    "torch.jit.load": "TorchScript archives hold pickles; read tensors with safetensors",
    "pandas.read_pickle": "pandas.read_pickle unpickles",
    "pandas.DataFrame.to_pickle": "to_pickle pickles",
}
BANNED_ATTRIBUTES = {"read_pickle", "to_pickle"}  # on any object (a DataFrame's method)
PICKLING_DATASETS = {"PersistentDataset", "CacheNTransDataset", "LMDBDataset", "GDSDataset"}  # MONAI: cache by pickle


@dataclass(frozen=True)
class Violation:
    file: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.what}"


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted name it stands for (``np`` -> ``numpy``, ``load`` -> ``torch.load``)."""
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """The dotted name an expression like ``T.jit.load`` refers to, or None."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    base = aliases.get(node.id, node.id)
    return ".".join([base, *reversed(parts)])


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def pickle_violations(source: str, file: str = "<src>") -> list[Violation]:
    """Every use of pickling in ``source`` (see the module docstring for the rules)."""
    tree = ast.parse(source, filename=file)
    aliases = _aliases(tree)
    out: list[Violation] = []

    def flag(node: ast.AST, what: str) -> None:
        out.append(Violation(file, getattr(node, "lineno", 0), what))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in BANNED_MODULES:
                    flag(node, f"imports {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in BANNED_MODULES:
                flag(node, f"imports from {node.module}")
            for a in node.names:
                if a.name in PICKLING_DATASETS:
                    flag(node, f"imports {a.name} (MONAI pickles its cache to disk)")
        elif isinstance(node, ast.Attribute) and node.attr in PICKLING_DATASETS | BANNED_ATTRIBUTES:
            flag(node, f"uses .{node.attr}")
        elif isinstance(node, ast.Name) and node.id in PICKLING_DATASETS:
            flag(node, f"uses {node.id} (MONAI pickles its cache to disk)")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func, aliases)
            if name in BANNED_CALLS:
                flag(node, f"calls {name}: {BANNED_CALLS[name]}")
            elif name == "torch.load" and not _is_const(_keyword(node, "weights_only"), True):
                flag(node, "calls torch.load without weights_only=True")
            elif name in ("numpy.save", "numpy.savez", "numpy.savez_compressed") and not _is_const(_keyword(node, "allow_pickle"), False):
                flag(node, f"calls {name} without allow_pickle=False (object arrays would be pickled)")
            elif name in ("builtins.__import__", "__import__", "importlib.import_module") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and str(arg.value).split(".")[0] in BANNED_MODULES:
                    flag(node, f"imports {arg.value} dynamically")
            pickle_kw = _keyword(node, "allow_pickle")
            if pickle_kw is not None and not _is_const(pickle_kw, False) and not (name or "").startswith("numpy.save"):
                flag(node, f"calls {name or '<call>'} with allow_pickle other than False")
    return out


def package_sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_package_has_sources_to_check():
    assert len(package_sources()) > 50


@pytest.mark.parametrize("path", package_sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_pickles_or_unpickles(path):
    found = pickle_violations(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE.parent)))
    assert not found, "pickling found:\n" + "\n".join(map(str, found))


@pytest.mark.parametrize(
    ("source", "flagged"),
    [
        ("import pickle", True),
        ("import pickle as p", True),
        ("from pickle import loads", True),
        ("import _pickle", True),
        ("import cPickle", True),
        ("import dill", True),
        ("from joblib import load", True),
        ("import shelve", True),
        ("import marshal\nmarshal.loads(b'')", True),
        ("import cloudpickle", True),
        ("import importlib\nimportlib.import_module('pickle')", True),
        ("__import__('dill')", True),
        ("import torch\ntorch.load('f')", True),
        ("import torch\ntorch.load('f', weights_only=False)", True),
        ("import torch as T\nT.load('f', map_location='cpu')", True),
        ("from torch import load\nload('f')", True),
        ("import torch\ntorch.load('f', weights_only=True)", False),
        ("import torch\ntorch.save({}, 'f')", True),
        ("from torch import save as s\ns({}, 'f')", True),
        ("import torch\ntorch.jit.load('f')", True),
        ("import numpy as np\nnp.load('f', allow_pickle=True)", True),
        ("import numpy as np\nflag = True\nnp.load('f', allow_pickle=flag)", True),
        ("import numpy as np\nnp.load('f')", False),
        ("import numpy as np\nnp.load('f', allow_pickle=False)", False),
        ("import numpy as np\nnp.save('f', a)", True),
        ("import numpy as np\nnp.save('f', a, allow_pickle=False)", False),
        ("from monai.data import NumpyReader\nNumpyReader(allow_pickle=True)", True),
        ("from monai.data import NumpyReader\nNumpyReader()", False),
        ("from monai.data import PersistentDataset", True),
        ("import monai\nmonai.data.LMDBDataset(data=[], transform=None)", True),
        ("from monai.data import CacheDataset\nCacheDataset([], None)", False),
        ("import pandas as pd\npd.read_pickle('f')", True),
        ("df.to_pickle('f')", True),
        ("from safetensors.torch import load_file\nload_file('f')", False),
        ("import json\njson.loads('{}')", False),
        ("import copy\ncopy.deepcopy(x)", False),
    ],
)
def test_the_checker_flags_what_it_must_and_nothing_else(source, flagged):
    assert bool(pickle_violations(source)) is flagged, pickle_violations(source)


# ---------------------------------------------------------------------------------------------- dynamic
@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Make every unpickling entry point record its caller and raise; yields the record."""
    calls: list[str] = []

    def refuse(name: str) -> Any:
        def refused(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"{name} was called: something unpickles")
        return refused

    class RefusedUnpickler:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            calls.append("Unpickler")
            raise AssertionError("pickle.Unpickler was used: something unpickles")

    for module in (pickle, _pickle):
        monkeypatch.setattr(module, "load", refuse(f"{module.__name__}.load"))
        monkeypatch.setattr(module, "loads", refuse(f"{module.__name__}.loads"))
        monkeypatch.setattr(module, "Unpickler", RefusedUnpickler)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks on a shared machine
    yield calls
    torch.set_num_threads(saved)
    assert calls == [], f"unpickling was attempted: {calls}"


def test_the_guard_catches_unpickling(no_unpickling):
    with pytest.raises(AssertionError, match="unpickles"):
        pickle.loads(pickle.dumps({"a": 1}))
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    buf.seek(0)
    with pytest.raises(AssertionError, match="unpickles"):
        np.load(buf, allow_pickle=True)
    buf = io.BytesIO()
    torch.save({"a": 1}, buf)
    buf.seek(0)
    with pytest.raises(AssertionError, match="unpickles"):
        torch.load(buf, weights_only=False)
    assert no_unpickling == ["pickle.loads", "pickle.load", "Unpickler"]
    no_unpickling.clear()


@pytest.mark.usefixtures("task_identity")
def test_a_dp_run_checkpoint_resume_evaluation_and_flower_wire_never_unpickle(tmp_path, no_unpickling):
    from fedfew_med import checkpoint, evaluation
    from fedfew_med.config import federation_from_dict
    from fedfew_med.data.sites import load_site
    from fedfew_med.dp.chain import CHAIN_FILE
    from fedfew_med.flower import codec
    from fedfew_med.flower.site_store import SiteStore
    from fedfew_med.simulation import run
    from tests.conftest import tiny_dict
    from tests.data.sitekit import png_site

    # a DP federation (fixed σ, server DP): round 0, checkpoint, resume, round 1, final models
    data = {"num_sites": 2, "image_size": 16, "train_min": 24, "train_max": 24, "test_per_site": 8, "seed": 1}
    d = tiny_dict(run={"name": "nopickle", "seed": 3, "rounds": 2}, data={"name": "synthetic", "params": data},
                  algorithm={"name": "ditto", "params": {"lam": 0.1}})
    d["privacy"] = {"epsilon": 50.0, "noise_multiplier": 1.0, "loss_noise_multiplier": 1.0}
    d["server_privacy"] = {"clip": 1.0, "noise_multiplier": 0.8}
    config = federation_from_dict(d, source="nopickle.toml")
    run(config, run_dir=tmp_path / "run", stop_after=1)
    ckpt = checkpoint.load(tmp_path / "run")
    assert ckpt is not None and ckpt.sites and ckpt.state["privacy"]["sites"]
    result = run(config, run_dir=tmp_path / "run", resume=True)
    assert result.rounds_completed == 2 and (tmp_path / "run" / CHAIN_FILE).is_file()
    assert all(not rec["failures"] and rec["site_losses"] for rec in result.records)  # every site really trained
    loaded = evaluation.load_run(tmp_path / "run")
    assert loaded.final_models()[0].keys() == result.models[0].keys()
    assert loaded.site_report(loaded.sites[0], n_resamples=5).metrics

    # Flower: a reply, the server models and a site state through Flower's own wire format
    from flwr.app import Message, RecordDict

    from tests.flower.fakegrid import wire

    reply = codec.decode_reply(_through_wire(codec.encode_reply(_reply(result.models[0])), wire, Message))
    assert torch.equal(reply.models[0][next(iter(result.models[0]))], next(iter(result.models[0].values())))
    tensors, meta = codec.state_to_records(ckpt.sites[loaded.sites[0]], run_key="k", round_idx=0)
    back = _through_wire(RecordDict({codec.STATE_TENSORS: tensors, codec.STATE_META: meta}), wire, Message)
    _, _, state = codec.records_to_state(back.array_records[codec.STATE_TENSORS], back.config_records[codec.STATE_META])
    assert state.models.keys() == ckpt.sites[loaded.sites[0]].models.keys()

    # a site's own snapshot on its disk, and a real image site through MONAI's readers and cache
    store = SiteStore(tmp_path / "state", run_key="k", site="s")
    store.save(0, state)
    assert store.load(0).models.keys() == state.models.keys()
    site = load_site(png_site(tmp_path / "png"))
    assert next(iter(site.loader("train", batch_size=4)))["image"].ndim == 4
    shutil.rmtree(tmp_path / "run")


def _reply(params: dict[str, torch.Tensor]) -> Any:
    from fedfew_med.algorithms import SiteReply

    return SiteReply(num_samples=3, losses=(0.5,), models={0: params}, info={"trained": [0]})


def _through_wire(content: Any, wire: Any, message_type: Any) -> Any:
    """``content`` as a receiver inflates it from Flower's serialised message."""
    msg = message_type(content, 1, "train", group_id="g")
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return wire(msg).content

"""No raw data, file path or patient identifier leaves a site: every message a site sends is inspected.

Two hospitals with real files (PNG images + a CSV, loaded through ``fedfew_med.data.sites``) whose
data is marked with sentinels: the data root, every image file name and a folder are named after
``PATIENT_SECRET_123``, the CSV carries a patient-id column (``PID-...``), and the site's state
directory lives under the same root. A two-round FedFew federation (K = 2) runs through the real
ClientApp handlers over the in-process grid (``tests/flower/fakegrid.py``: Flower's own
serialisation both ways), and every reply a site sends (query, train, evaluate) is captured as the
coordinator receives it. Each must hold only

- ArrayRecords ``model.<k>`` whose keys are the server model's parameter names with their shapes
  (so no tensor is, or has the shape of, an input image or a batch of them);
- a MetricRecord ``fedfew.reply`` with ``num-samples`` and the K ``losses``;
- ConfigRecords with allow-listed keys, whose JSON payloads (``info``, the evaluation ``entry``)
  have allow-listed keys and numbers only;
- under DP, an evaluate reply's K scores are the losses the site released (noised, charged) in that
  round's train reply, and its model index is their argmin (``fedfew_med.deployment``);

and no string anywhere (record names, keys, values, decoded JSON, message metadata) may hold the
sentinel, a patient id, a path separator, the data root, an image file name or a long text.

A site that fails sends its exception text to the coordinator (Flower's error reply), and the
project's errors name the file involved. That leak is shown by an expected failure below
(``fedfew_med/flower/client_app.py``: the handlers do not catch and redact their exceptions).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedfew_med.flower.client_app import app as client_app
from fedfew_med.flower.coordinator import Coordinator, CoordinatorResult, ServerSettings
from tests.data.sitekit import NAMES, site_doc, write_csv, write_png, write_toml
from tests.flower.conftest import task_identity, write_config  # noqa: F401 (task_identity: a fixture)
from tests.flower.fakegrid import LocalGrid

SENTINEL = "PATIENT_SECRET_123"
RAW_SIZE = (10, 12)  # the PNGs on disk (H, W)
INPUT_SIZE = (8, 8)  # after the site's preprocessing
SITES = ("hospital-a", "hospital-b")

ALLOWED_RECORDS: dict[str, set[str]] = {  # record name -> keys a site may send in it
    "fedfew.site": {"name", "num-train", "protocol", "task", "in-channels", "num-classes", "spatial-dims", "image-size",
                    "privacy"},
    "fedfew.reply": {"num-samples", "losses"},
    "fedfew.reply-info": {"info"},
    "fedfew.evaluation": {"entry"},
    "fedfew.privacy": {"state", "report", "declined"},  # a DP site: its ledger state and privacy report
}
JSON_KEYS = {  # keys allowed in the JSON strings of fedfew.reply-info / fedfew.evaluation
    "info": {"trained", "personal_loss", "cluster", "local_loss"},
    "entry": {"model", "scores", "metrics", "metrics_finetuned", "device"},
    "privacy": {"options", "grad_sample_mode"},
    "state": {"calibration", "ledger", "stopped_round"},
    "report": {"accountant", "delta", "digest", "epsilon", "grad_sample_mode", "loss_clip", "loss_noise_multiplier",
               "loss_releases", "max_grad_norm", "mechanisms", "noise_multiplier", "physical_batch_size", "planned",
               "remaining_epsilon", "round", "sample_rate", "steps", "stopped", "target_epsilon"},
}
METRIC_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
# the DP records (query's privacy options, a train reply's ledger state and report) also hold names and digests:
# short tokens (an accountant, a mechanism, a hex digest, a site name), never a sentence, a path or a file name
JSON_TOKENS = {"privacy", "state", "report"}
TOKEN = re.compile(r"^[A-Za-z0-9_.:+\-]{0,64}$")
DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")  # an evaluation entry's device: where the site computed, nothing of its data
SLOT_LABEL = re.compile(r"^[a-z]+/\d+(:[a-z]+)?$")  # a ledger entry's model slot, e.g. 'server/0', 'server/1:val'

MAX_STRING = 64


def patient_id(site: int, i: int) -> str:
    return f"PID-{7000 + 100 * site + i}-XZ"


def write_site(root: Path, index: int, n: int = 12) -> tuple[Path, list[np.ndarray]]:
    """A PNG + CSV site whose paths and metadata are full of sentinels; returns its site file and raw images."""
    rows, images = [], []
    for i in range(n):
        grey = np.random.default_rng(100 * index + i).integers(0, 255, size=RAW_SIZE)
        name = f"{SENTINEL}/{SENTINEL}_{patient_id(index, i)}.png"
        write_png(root / name, grey)
        images.append(grey)
        rows.append({"image": name, "label": NAMES[i % 2], "patient_id": patient_id(index, i), "birth_date": "1961-04-02"})
    write_csv(root / f"{SENTINEL}_labels.csv", rows)
    doc = site_doc("images_csv", "classification", spatial_size=INPUT_SIZE,
                   site={"name": SITES[index], "task": "classification"}, source={"csv": f"{SENTINEL}_labels.csv"})
    return write_toml(root / f"{SENTINEL}_site.toml", doc), images


class CapturingGrid(LocalGrid):
    """The in-process grid, keeping every reply as the coordinator receives it (after the wire)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.captured: list[Any] = []

    def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
        ids = list(super().push_messages(messages))
        self.captured += [self.replies[i] for i in ids if i in self.replies]
        return ids


@pytest.fixture
def federation(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    dp = getattr(request, "param", False)  # the sites train with DP: their replies carry ledgers and privacy reports
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    roots = [tmp_path / f"{SENTINEL}_data_{i}" for i in range(len(SITES))]
    sites = [write_site(root, i) for i, root in enumerate(roots)]
    config_path = tmp_path / "fed.toml"
    config = write_config(config_path, run={"rounds": 2, "eval_every": 1}, algorithm={"name": "fedfew", "params": {"k": 2, "mu": 0.01}},
                          **({"privacy": {"epsilon": 50.0, "noise_multiplier": 1.0, "loss_noise_multiplier": 5.0}} if dp else {}))
    nodes = {101 + i: {"site-config": str(site), "state-dir": str(root / f"{SENTINEL}_state")}
             for i, ((site, _), root) in enumerate(zip(sites, roots, strict=True))}
    grid = CapturingGrid(client_app, nodes)
    settings = ServerSettings(federation_config=config_path, run_dir=tmp_path / "run", connect_timeout=1.0,
                              query_timeout=5.0, round_timeout=30.0, poll_interval=0.05)
    yield {"grid": grid, "config": config, "settings": settings, "roots": roots, "images": [im for _, ims in sites for im in ims],
           "tmp": tmp_path, "dp": dp}
    torch.set_num_threads(saved)


def forbidden_strings(fed: dict[str, Any]) -> list[str]:
    pids = [patient_id(s, i) for s in range(len(SITES)) for i in range(12)]
    return [SENTINEL, "PID-", "1961-04-02", ".png", ".csv", ".toml", str(fed["tmp"]), *map(str, fed["roots"]), *pids]


def walk_strings(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """Every string inside ``value`` (keys and values, nested), with where it is."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from walk_strings(k, f"{where}.<key>")
            yield from walk_strings(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from walk_strings(v, f"{where}[{i}]")


def check_json(payload: Any, allowed: set[str], where: str, *, tokens: bool = False) -> None:
    """Decoded JSON: a dict of allow-listed keys; below them only numbers, None, metric names and lists.

    With ``tokens``, keys and values below the top level may also be short tokens (:data:`TOKEN`).
    """
    assert isinstance(payload, dict), f"{where}: expected a JSON object, got {payload!r}"
    assert set(payload) <= allowed, f"{where}: keys {sorted(set(payload) - allowed)} are not allowed"
    if "device" in payload:
        assert isinstance(payload["device"], str) and DEVICE.match(payload["device"]), f"{where}.device: {payload['device']!r}"
        payload = {k: v for k, v in payload.items() if k != "device"}

    def leaves(v: Any, at: str) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                assert METRIC_NAME.match(k) or (tokens and TOKEN.match(k)), f"{at}: key {k!r} is not a metric name"
                leaves(x, f"{at}.{k}")
        elif isinstance(v, list):
            for i, x in enumerate(v):
                leaves(x, f"{at}[{i}]")
        elif tokens and isinstance(v, (str, bool)):
            assert isinstance(v, bool) or TOKEN.match(v) or SLOT_LABEL.match(v), f"{at}: {v!r} is not a short token"
        else:
            assert v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)), f"{at}: {v!r} is not a number"

    for key, value in payload.items():
        leaves(value, f"{where}.{key}")


def inspect_reply(msg: Any, *, expected: dict[str, tuple[int, ...]], forbidden: list[str], images: list[np.ndarray]) -> str:
    """Check one reply a site sent; returns its message type."""
    kind = msg.metadata.message_type
    assert not msg.has_error(), f"a site sent an error reply to a {kind} message: {msg.error.reason}"
    content = msg.content
    strings: list[tuple[str, str]] = [("metadata.group_id", msg.metadata.group_id), ("metadata.message_type", kind)]
    for name, record in content.array_records.items():
        assert re.fullmatch(r"model\.\d+", name), f"{kind}: array record {name!r} is not a model"
        assert set(record) == set(expected), f"{kind}: {name} keys {sorted(record)} are not the model's parameters"
        for key, arr in record.items():
            a = arr.numpy()
            assert tuple(a.shape) == expected[key], f"{kind}: {name}/{key} has shape {a.shape}, expected {expected[key]}"
            assert a.dtype == np.float32 and np.isfinite(a).all()
            assert tuple(a.shape[-2:]) not in (RAW_SIZE, INPUT_SIZE), f"{kind}: {name}/{key} has an image's shape"
            flat = a.ravel()
            for image in images:  # no raw image (as pixels or scaled to [0, 1]) hides in a parameter
                raw = image.ravel().astype(np.float32)
                assert flat.size < raw.size or not any(np.array_equal(flat[i:i + raw.size], v) for v in (raw, raw / 255)
                                                        for i in range(0, flat.size - raw.size + 1))
        strings.append((f"{name}.<name>", name))
    for name, metrics in content.metric_records.items():
        assert name in ALLOWED_RECORDS and set(metrics) <= ALLOWED_RECORDS[name], f"{kind}: metric record {name}: {sorted(metrics)}"
        for key, value in metrics.items():
            values = value if isinstance(value, list) else [value]
            assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values), f"{kind}: {name}.{key} = {value!r}"
        strings.append((f"{name}.<name>", name))
    for name, config in content.config_records.items():
        assert name in ALLOWED_RECORDS, f"{kind}: config record {name!r} is not allowed"
        assert set(config) <= ALLOWED_RECORDS[name], f"{kind}: {name} keys {sorted(set(config) - ALLOWED_RECORDS[name])}"
        strings.append((f"{name}.<name>", name))
        for key, value in config.items():
            assert isinstance(value, (int, float, str)) and (key == "declined" or not isinstance(value, bool)), f"{kind}: {name}.{key} = {value!r}"
            if key in JSON_KEYS and value != "":
                payload = json.loads(str(value))
                check_json(payload, JSON_KEYS[key], f"{kind}: {name}.{key}", tokens=key in JSON_TOKENS)
                strings += list(walk_strings(payload, f"{name}.{key}"))
            else:
                strings += list(walk_strings(value, f"{name}.{key}"))
                assert not isinstance(value, str) or len(value) <= MAX_STRING, f"{kind}: {name}.{key} is a long text"
            strings.append((f"{name}.<key>", key))
    for where, text in strings:
        assert len(text) <= MAX_STRING, f"{kind}: {where} is a long text ({len(text)} characters)"
        assert ("/" not in text or SLOT_LABEL.match(text)) and "\\" not in text, f"{kind}: {where} = {text!r} looks like a path"
        for bad in forbidden:
            assert bad not in text, f"{kind}: {where} = {text!r} holds {bad!r}"
    return str(kind)


@pytest.mark.parametrize("federation", [False, True], indirect=True, ids=["plain", "dp"])
@pytest.mark.usefixtures("task_identity")
def test_every_message_a_site_sends_holds_only_models_and_allow_listed_numbers(federation):
    grid = federation["grid"]
    result: CoordinatorResult = Coordinator(grid, federation["config"], federation["settings"]).run()
    assert result.summary["finished"] and sorted(result.summary["per_site"]) == list(SITES)
    assert all(not rec["failures"] for rec in result.records)
    expected = {name: tuple(t.shape) for name, t in result.models[0].items()}
    kinds = [inspect_reply(msg, expected=expected, forbidden=forbidden_strings(federation), images=federation["images"])
             for msg in grid.captured]
    # every kind of message was seen: one query, two train and two evaluate replies per site
    assert sorted(kinds) == sorted(["query"] * 2 + ["train"] * 4 + ["evaluate"] * 4)
    assert sum(len(m.content.array_records) for m in grid.captured) > 0  # the train replies did carry models
    trains = [m for m in grid.captured if m.metadata.message_type == "train"]
    assert all(("fedfew.privacy" in m.content.config_records) == federation["dp"] for m in trains)  # and DP ledgers
    if federation["dp"]:  # an evaluate reply says nothing of the training records that was not charged already:
        released = {(m.metadata.src_node_id, m.metadata.group_id): list(m.content.metric_records["fedfew.reply"]["losses"])
                    for m in trains}
        for m in grid.captured:
            if m.metadata.message_type != "evaluate":
                continue
            entry = json.loads(str(m.content.config_records["fedfew.evaluation"]["entry"]))
            losses = released[(m.metadata.src_node_id, m.metadata.group_id)]  # the same round's train reply (DP, in the ledger)
            assert entry["scores"] == pytest.approx(losses, abs=0, rel=1e-6)
            assert entry["model"] == min(range(len(losses)), key=lambda k: (losses[k], k))  # post-processing of them
    # and the sentinels were really there to be leaked: the coordinator's run directory holds none of them
    for path in (federation["tmp"] / "run").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl"):
            text = path.read_text()
            assert not any(bad in text for bad in forbidden_strings(federation)), f"{path} holds site data"


@pytest.mark.usefixtures("task_identity")
def test_the_inspector_catches_a_leak(federation):
    """The checks are not vacuous: a reply carrying a path in its info, or an image-shaped tensor, is caught."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

    def reply(content: RecordDict) -> Any:
        return Message(content, 101, "train", group_id="g")

    leak_info = RecordDict({"fedfew.reply-info": ConfigRecord({"info": json.dumps({"trained": [0], "file": f"/data/{SENTINEL}.png"})})})
    with pytest.raises(AssertionError, match="not allowed"):
        inspect_reply(reply(leak_info), expected={}, forbidden=forbidden_strings(federation), images=[])
    leak_value = RecordDict({"fedfew.site": ConfigRecord({"name": "hospital-a", "protocol": f"{SENTINEL}_scanner"})})
    with pytest.raises(AssertionError, match=SENTINEL):
        inspect_reply(reply(leak_value), expected={}, forbidden=forbidden_strings(federation), images=[])
    batch = ArrayRecord({"w": Array(np.zeros((4, 1, *INPUT_SIZE), np.float32))})
    with pytest.raises(AssertionError, match="shape"):
        inspect_reply(reply(RecordDict({"model.0": batch})), expected={"w": (4, 1, *INPUT_SIZE)}, forbidden=[], images=[])
    image = federation["images"][0].astype(np.float32)
    hidden = ArrayRecord({"w": Array(np.concatenate([np.ones(5, np.float32), image.ravel()]))})
    with pytest.raises(AssertionError):
        inspect_reply(reply(RecordDict({"model.0": hidden})), expected={"w": (5 + image.size,)}, forbidden=[],
                      images=[federation["images"][0]])


@pytest.mark.usefixtures("task_identity")
def test_a_failing_site_sends_no_path_in_its_error(federation):
    grid = federation["grid"]
    broken = federation["roots"][1]
    next((broken / SENTINEL).glob("*.png")).unlink()  # one image of hospital-b disappears: load_site refuses the site
    Coordinator(grid, federation["config"], federation["settings"]).run()
    errors = [m.error.reason for m in grid.captured if m.has_error()]
    assert errors  # hospital-b refused every message
    for reason in errors:  # what failed, and where the site's administrator finds the details
        assert reason.count("SiteValidationError while handling a ") == 1 and "site log reference" in reason, reason
        for bad in forbidden_strings(federation):
            assert bad not in reason, f"an error reply holds {bad!r}: {reason[:300]}"

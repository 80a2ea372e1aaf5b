"""A site that sends a hostile or broken update over Flower is skipped for the round, and recorded.

The coordinator validates every reply before aggregation exactly as the simulation does
(:func:`fedfew_med.runtime.validate_reply`: keys, shapes, dtypes, finite values and losses, and
``[faults].max_update_norm``). The reference for each case is the same federation in which that
site simply fails in that round (its handler raises): the final models must be equal to the bit,
so nothing of the rejected update reached the aggregate, and the site's next round started from
the state the server accepted last, not from the one it trained for the rejected reply.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, Message, MetricRecord

from fedfew_med.flower.coordinator import Coordinator
from tests.flower.conftest import write_config
from tests.flower.test_coordinator import NAMES, _grid, _records, _same_models, _settings

pytestmark = pytest.mark.usefixtures("task_identity")

HOSTILE_NODE, HOSTILE_ROUND = 102, "0"  # NAMES[1], in the first round
Tamper = Callable[[Message], None]


def _first_array(msg: Message) -> tuple[str, str, np.ndarray]:
    record = min(k for k in msg.content.array_records)
    key = next(iter(msg.content.array_records[record]))
    return record, key, msg.content.array_records[record][key].numpy()


def _set(msg: Message, value: np.ndarray) -> None:
    record, key, _ = _first_array(msg)
    msg.content.array_records[record][key] = Array(value)


def _scaled(msg: Message) -> None:
    _set(msg, _first_array(msg)[2] * np.float32(1e6) + np.float32(1e6))  # a model-replacement attack


def _nan(msg: Message) -> None:
    a = _first_array(msg)[2].copy()
    a.flat[0] = np.nan
    _set(msg, a)


def _inf(msg: Message) -> None:
    a = _first_array(msg)[2].copy()
    a.flat[-1] = -np.inf
    _set(msg, a)


def _reshaped(msg: Message) -> None:
    _set(msg, np.zeros((7, 3), np.float32))


def _float64(msg: Message) -> None:
    _set(msg, _first_array(msg)[2].astype(np.float64))


def _extra_key(msg: Message) -> None:
    record, _, _ = _first_array(msg)
    msg.content.array_records[record]["backdoor.weight"] = Array(np.ones(4, np.float32))


def _dropped_key(msg: Message) -> None:
    record, key, _ = _first_array(msg)
    del msg.content.array_records[record][key]


def _unsent_model(msg: Message) -> None:
    record, _, _ = _first_array(msg)
    msg.content.array_records["model.9"] = msg.content.array_records[record]


def _losses(values: list[float]) -> Tamper:
    def tamper(msg: Message) -> None:
        reply = msg.content.metric_records["fedfew.reply"]
        msg.content["fedfew.reply"] = MetricRecord({"num-samples": reply["num-samples"], "losses": values})
    return tamper


def _num_samples(value: int) -> Tamper:
    def tamper(msg: Message) -> None:
        reply = msg.content.metric_records["fedfew.reply"]
        msg.content["fedfew.reply"] = MetricRecord({"num-samples": value, "losses": reply["losses"]})
    return tamper


CASES: list[tuple[str, Tamper, str]] = [
    ("update norm past the bound", _scaled, "norm"),
    ("nan parameter", _nan, "NaN or Inf"),
    ("inf parameter", _inf, "NaN or Inf"),
    ("wrong shape", _reshaped, "shape"),
    ("wrong dtype", _float64, "dtype"),
    ("extra parameter", _extra_key, "backdoor.weight"),
    ("missing parameter", _dropped_key, "missing"),
    ("model it was not sent", _unsent_model, "9"),
    ("nan loss", _losses([float("nan"), 0.5]), "loss"),
    ("too few losses", _losses([0.5]), "loss"),
    ("zero samples", _num_samples(0), "num_samples"),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    """The federation in which NAMES[1] raises in round 0 (computed once)."""
    root = tmp_path_factory.mktemp("skipped")
    path = root / "fed.toml"
    config = write_config(path, run={"rounds": 2}, algorithm={"name": "fedfew", "params": {"k": 2, "mu": 0.01}})
    grid = _grid(root, path)

    def crash(msg: Message) -> None:
        if msg.metadata.message_type == "train" and msg.metadata.group_id == HOSTILE_ROUND and msg.metadata.dst_node_id == HOSTILE_NODE:
            raise RuntimeError("the site failed")

    grid.before_handle = crash
    from flwr.supercore.task_identity import TaskIdentity

    with pytest.MonkeyPatch.context() as mp:  # what the task_identity fixture does, for this module-scoped run
        for attr, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
            mp.setattr(TaskIdentity, attr, value)
        result = Coordinator(grid, config, _settings(root, path)).run()
    return path, config, result, _records(root / "run")


@pytest.mark.parametrize(("tamper", "message"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_a_hostile_update_is_skipped_recorded_and_leaves_no_trace(tmp_path, reference, tamper, message):
    path, config, expected, expected_records = reference
    grid = _grid(tmp_path, path)

    def hostile(reply: Message) -> Message:
        meta = reply.metadata
        if meta.message_type == "train" and meta.group_id == HOSTILE_ROUND and meta.src_node_id == HOSTILE_NODE:
            tamper(reply)
        return reply

    grid.after_handle = hostile
    result = Coordinator(grid, config, _settings(tmp_path, path)).run()
    records = _records(tmp_path / "run")
    why = records[0]["failures"][NAMES[1]]
    assert list(records[0]["failures"]) == [NAMES[1]] and message in why, why
    assert records[1]["failures"] == {} and NAMES[1] in records[1]["site_losses"]  # it is back in the next round
    _same_models(expected.models, result.models)  # to the bit: as if the site had simply failed
    assert [r["assignments"] for r in records] == [r["assignments"] for r in expected_records]

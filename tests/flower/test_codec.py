"""Tensors and configs through Flower records: exact, pickle-free, and what each side may see."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedfew_med.algorithms import RoundInfo, SiteReply
from fedfew_med.flower import codec
from fedfew_med.flower.site_store import SiteStateError, SiteStore, flatten_state, unflatten_state
from fedfew_med.runtime import ModelFacts
from fedfew_med.training import SiteState
from tests.flower.conftest import write_config
from tests.flower.fakegrid import wire


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "net.conv.weight": torch.randn(4, 1, 3, 3, generator=g),
        "net.conv.bias": torch.randn(4, generator=g, dtype=torch.float64),
        "scale": torch.tensor(2.5),  # 0-d
        "count": torch.arange(3, dtype=torch.int64),
        "empty": torch.zeros(0, 5),
    }


def test_params_round_trip_bit_exact_with_names_and_order():
    params = _params()
    record = codec.params_to_record(params)
    assert isinstance(record, ArrayRecord) and list(record) == list(params)
    back = codec.record_to_params(record)
    assert list(back) == list(params)
    for name, t in params.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(back[name], t), name
    back["scale"] += 1  # fresh, writable tensors
    assert params["scale"] == 2.5


def test_params_are_copied_not_shared():
    params = _params()
    record = codec.params_to_record(params)
    params["net.conv.bias"].add_(1.0)
    assert not torch.equal(codec.record_to_params(record)["net.conv.bias"], params["net.conv.bias"])


def test_arrays_travel_as_npy_without_pickle():
    record = codec.params_to_record(_params())
    for arr in record.values():
        assert arr.stype == "numpy.ndarray"
        assert arr.data.startswith(b"\x93NUMPY")  # numpy.save format, written with allow_pickle=False


def test_bfloat16_is_refused_not_silently_converted():
    with pytest.raises(codec.CodecError, match="bfloat16"):
        codec.params_to_record({"w": torch.ones(2, dtype=torch.bfloat16)})


def test_models_survive_a_real_message_round_trip(task_identity):
    from flwr.app import Message

    models = {0: _params(0), 2: _params(2)}
    content = RecordDict()
    for key, rec in codec.models_to_records(models).items():
        content[key] = rec
    assert sorted(content.array_records) == ["model.0", "model.2"]
    received = wire(Message(content, 5, "train"))
    back = codec.records_to_models(received.content)
    assert list(back) == [0, 2]
    for k in models:
        assert all(torch.equal(back[k][n], models[k][n]) for n in models[k])


@pytest.mark.parametrize("extras", [{}, {"mu": 0.01}, {"mu": 1e-300, "tau": 3.0}])
def test_round_encoding_carries_only_the_sites_own_weight(extras):
    info = RoundInfo(round=3, num_rounds=10, participants=("a", "b", "c"), site_weight={"a": 0.2, "b": 0.3, "c": 0.5},
                     extras=extras)
    record = codec.encode_round(info, "b")
    assert isinstance(record, ConfigRecord)
    assert not any(isinstance(v, str) and v in ("a", "c") for v in record.values())
    back = codec.decode_round(record)
    assert back == RoundInfo(round=3, num_rounds=10, participants=("b",), site_weight={"b": 0.3}, extras=extras)


def test_round_decoding_names_what_is_missing():
    with pytest.raises(codec.CodecError, match="'site-weight'"):
        codec.decode_round(ConfigRecord({"round": 1, "num-rounds": 2, "site": "a"}))
    with pytest.raises(codec.CodecError, match="finite"):
        codec.decode_round(ConfigRecord({"round": 1, "num-rounds": 2, "site": "a", "site-weight": math.nan}))


def test_run_header_carries_the_config_and_checks_its_digest(tmp_path):
    config = write_config(tmp_path / "f.toml", algorithm={"name": "fedfew", "params": {"k": 3, "mu": 0.05}})
    header = codec.RunHeader(run_key="tiny-abc", config=config, base_round=4)
    back = codec.decode_run(codec.encode_run(header))
    assert back.run_key == "tiny-abc" and back.base_round == 4
    assert back.config.digest() == config.digest() and back.config.to_dict() == config.to_dict()
    tampered = codec.encode_run(header)
    tampered["config-digest"] = "0" * 64
    with pytest.raises(codec.CodecError, match="digest"):
        codec.decode_run(tampered)


@pytest.mark.parametrize("losses", [(), (0.5,), (0.1, float(2**-40), 7.0)])
def test_replies_round_trip(losses):
    models = {1: _params(1)} if losses else {}
    reply = SiteReply(num_samples=31, losses=losses, models=models, info={"trained": [1], "note": "ok"})
    back = codec.decode_reply(codec.encode_reply(reply))
    assert back.num_samples == 31 and back.losses == losses and dict(back.info) == {"trained": [1], "note": "ok"}
    assert list(back.models) == list(models)
    for k in models:
        assert all(torch.equal(back.models[k][n], models[k][n]) for n in models[k])


def test_a_reply_without_its_record_is_refused():
    with pytest.raises(codec.CodecError, match="fedfew.reply"):
        codec.decode_reply(RecordDict())


def test_site_cards_and_evaluations_round_trip():
    card = codec.SiteCard("site-a", 40, ModelFacts("classification", 1, 2, 2, 16), protocol="bright")
    assert codec.decode_site(codec.encode_site(card)) == card
    assert codec.SiteCard.from_json("site-a", card.to_json()) == card
    no_protocol = codec.SiteCard("b", 3, ModelFacts("tabular", 7, 2, 0, 0))
    assert codec.decode_site(codec.encode_site(no_protocol)) == no_protocol
    entry = {"model": 1, "scores": [0.3, 0.2], "metrics": {"accuracy": 0.75, "auc": float("nan")}}
    back = codec.decode_evaluation(codec.encode_evaluation(entry))
    assert back["model"] == 1 and back["metrics"]["accuracy"] == 0.75 and math.isnan(back["metrics"]["auc"])
    assert codec.decode_evaluate(codec.encode_evaluate("site-a", 4)) == ("site-a", 4, None)
    assert codec.decode_evaluate(codec.encode_evaluate("site-a", 4, [0.5, 1.25])) == ("site-a", 4, [0.5, 1.25])


def _state() -> SiteState:
    return SiteState(
        models={"personal": _params(5)},
        buffers={"server/0": {"bn.running_mean": torch.ones(4), "bn.num_batches_tracked": torch.tensor(3)},
                 "personal": {"bn.running_mean": torch.zeros(4)}},
    )


def _same_state(a: SiteState, b: SiteState) -> None:
    for kind in ("models", "buffers"):
        sa, sb = getattr(a, kind), getattr(b, kind)
        assert list(sa) == list(sb)
        for slot in sa:
            assert list(sa[slot]) == list(sb[slot])
            assert all(torch.equal(sa[slot][n], sb[slot][n]) for n in sa[slot])


def test_site_state_round_trips_through_context_records_and_flat_tensors():
    state = _state()
    tensors, meta = codec.state_to_records(state, run_key="r1", round_idx=6)
    run_key, round_idx, back = codec.records_to_state(tensors, meta)
    assert (run_key, round_idx) == ("r1", 6)
    _same_state(state, back)
    flat, index = flatten_state(state)
    _same_state(state, unflatten_state(flat, index))


def test_site_store_keeps_the_base_and_the_newest_snapshot(tmp_path):
    store = SiteStore(tmp_path, run_key="run-1", site="site-a")
    assert store.rounds() == [] and store.load(-1).models == {}
    store.save(0, _state())
    store.save(1, SiteState(), keep=0)
    assert store.rounds() == [0, 1]
    store.save(3, _state(), keep=0)  # round 1 was not accepted by the coordinator: its snapshot goes
    assert store.rounds() == [0, 3]
    _same_state(store.load(3), _state())
    assert not list(store.root.glob(".*tmp*"))
    with pytest.raises(SiteStateError, match="no state snapshot for round 1"):
        store.load(1)
    other = SiteStore(tmp_path, run_key="run-1", site="site-b")
    other.root.mkdir(parents=True)
    (other.root / "round-00003.safetensors").write_bytes(store.path(3).read_bytes())
    with pytest.raises(SiteStateError, match="belongs to site 'site-a'"):
        other.load(3)
    (other.root / "round-00004.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SiteStateError, match="unreadable"):
        other.load(4)
    with pytest.raises(ValueError, match="run key"):
        SiteStore(tmp_path, run_key="../escape", site="a")


def test_dp_fields_round_trip_and_only_the_sites_own_weight_travels(tmp_path):
    config = write_config(tmp_path / "f.toml")
    header = codec.decode_run(codec.encode_run(codec.RunHeader(run_key="k", config=config, base_round=-1, dp_ready=True)))
    assert header.dp_ready is True
    old = codec.encode_run(codec.RunHeader(run_key="k", config=config, base_round=-1))
    del old["dp-ready"]  # a header without the field: not DP-ready
    assert codec.decode_run(old).dp_ready is False
    privacy = {"options": {"epsilon": 3.0, "delta": 1e-5}, "grad_sample_mode": "hooks"}
    card = codec.SiteCard("site-a", 40, ModelFacts("classification", 1, 2, 2, 16), privacy=privacy)
    assert codec.decode_site(codec.encode_site(card)) == card
    assert codec.SiteCard.from_json("site-a", card.to_json()) == card
    bad = codec.encode_site(card)
    bad["privacy"] = '{"epsilon": 3}'
    with pytest.raises(codec.CodecError, match="privacy must be a JSON object with 'options'"):
        codec.decode_site(bad)
    first = RoundInfo(round=2, num_rounds=5, participants=("a", "b"), site_weight={"a": 0.25, "b": 0.75}, extras={"mu": 0.5})
    plan = codec.PrivacyPlan(rounds=(2, 4), first=first, ledger_digest="ab" * 32, ledger_entries=3, ledger_epsilon=1.5)
    record = codec.encode_privacy_plan(plan, "b")
    assert "0.25" not in str(record["plan"])  # site a's weight is not sent to site b
    site, back = codec.decode_privacy_plan(record)
    assert site == "b" and back.rounds == (2, 4) and (back.ledger_digest, back.ledger_entries, back.ledger_epsilon) == ("ab" * 32, 3, 1.5)
    assert back.first == RoundInfo(round=2, num_rounds=5, participants=("b",), site_weight={"b": 0.75}, extras={"mu": 0.5})
    record["plan"] = str(record["plan"]).replace('"rounds": [2, 4]', '"rounds": [3, 4]')
    with pytest.raises(codec.CodecError, match="first round must be the first of its rounds"):
        codec.decode_privacy_plan(record)
    reply = codec.PrivacyReply(state={"ledger": {}}, report={"epsilon": math.inf}, declined=True)
    assert codec.decode_privacy_reply(codec.encode_privacy_reply(reply)) == reply

"""What travels in a Flower message, and back: pure conversions, no I/O.

Tensors go through :class:`flwr.app.ArrayRecord` (``numpy.save`` with
``allow_pickle=False`` on the wire); everything else is a
:class:`~flwr.app.ConfigRecord` or :class:`~flwr.app.MetricRecord` of scalars,
with small nested structures as JSON strings. Nothing is ever pickled.

Record names (one :class:`~flwr.app.RecordDict` per message):

======================  ===========================================================
``model.<k>``           ArrayRecord: server model k (parameter name -> tensor)
``fedfew.run``          ConfigRecord: run key, resolved federation config (JSON) and
                        its digest, the site's base round (see ``site_store``), and
                        whether the networks are DP-ready (every message)
``fedfew.round``        ConfigRecord: round, num-rounds, the site's name and λ_i,
                        the algorithm's extras as ``extra.<name>`` (train only)
``fedfew.reply``        MetricRecord: ``num-samples`` and the K ``losses``
``fedfew.reply-info``   ConfigRecord: the reply's small ``info`` dict as JSON
``fedfew.site``         ConfigRecord: a site's name, sample count, model facts, for a
                        tabular site its feature column names in the order it uses (JSON;
                        names only, no value), and for a DP site its privacy options (query)
``fedfew.evaluate``     ConfigRecord: the site addressed and the round (evaluate only)
``fedfew.evaluation``   ConfigRecord: a site's evaluation entry as JSON (evaluate reply)
``fedfew.privacy-plan`` ConfigRecord: a DP site's participation plan and the ledger the
                        coordinator last saw from it (train, DP sites only)
``fedfew.privacy``      ConfigRecord: a DP site's ledger state and privacy report, and
                        whether it declined the round for lack of budget (train reply)
======================  ===========================================================
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedfew_med.algorithms import Params, RoundInfo, SiteReply
from fedfew_med.config import FederationConfig, federation_from_dict
from fedfew_med.flower.site_store import flatten_state, unflatten_state
from fedfew_med.runtime import ModelFacts
from fedfew_med.training import SiteState

MODEL_PREFIX = "model."
RUN = "fedfew.run"
ROUND = "fedfew.round"
REPLY = "fedfew.reply"
REPLY_INFO = "fedfew.reply-info"
SITE = "fedfew.site"
EVALUATION = "fedfew.evaluation"
EVALUATE = "fedfew.evaluate"
STATE_TENSORS = "fedfew.site-state"
STATE_META = "fedfew.site-state-meta"
PRIVACY_PLAN = "fedfew.privacy-plan"
PRIVACY = "fedfew.privacy"
PRIVACY_STATE = "fedfew.site-privacy"  # context.state: the site's privacy state (JSON), beside its disk copy
EXTRA_PREFIX = "extra."


class CodecError(ValueError):
    """A message does not hold what the protocol says it must."""


# ------------------------------------------------------------------------ tensors
def params_to_record(params: Params) -> ArrayRecord:
    """One model's parameters as an ArrayRecord (names kept, order kept, values copied)."""
    record = ArrayRecord()
    for name, t in params.items():
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16; refuse rather than silently upcast
            raise CodecError(f"{name!r} is bfloat16, which cannot travel through ArrayRecord")
        record[name] = Array(t.detach().cpu().contiguous().numpy())
    return record


def record_to_params(record: ArrayRecord) -> Params:
    """The inverse of :func:`params_to_record` (fresh, writable tensors)."""
    return {name: torch.from_numpy(np.array(arr.numpy(), copy=True)) for name, arr in record.items()}


def models_to_records(models: Mapping[int, Params]) -> dict[str, ArrayRecord]:
    """Models by server index as ``{"model.<k>": ArrayRecord}``."""
    return {f"{MODEL_PREFIX}{k}": params_to_record(p) for k, p in sorted(models.items())}


def records_to_models(content: RecordDict) -> dict[int, Params]:
    """Every ``model.<k>`` ArrayRecord of a message, by k."""
    out: dict[int, Params] = {}
    for key, record in content.array_records.items():
        if not key.startswith(MODEL_PREFIX):
            continue
        index = key.removeprefix(MODEL_PREFIX)
        if not index.isdigit():
            raise CodecError(f"record {key!r}: expected 'model.<index>'")
        out[int(index)] = record_to_params(record)
    return dict(sorted(out.items()))


# --------------------------------------------------------------------- run & round
@dataclass(frozen=True)
class RunHeader:
    """What every train/evaluate message carries besides the round."""

    run_key: str  # names this run's site-state directory at every site
    config: FederationConfig  # the coordinator's resolved federation config
    base_round: int  # the site state to start from: after this round (-1: fresh)
    dp_ready: bool = False  # a site of the federation trains with DP: every network is DP-ready


def encode_run(header: RunHeader) -> ConfigRecord:
    return ConfigRecord(
        {
            "run-key": header.run_key,
            "federation": json.dumps(header.config.to_dict(), sort_keys=True),
            "config-digest": header.config.digest(),
            "base-round": int(header.base_round),
            "dp-ready": bool(header.dp_ready),
        }
    )


def decode_run(record: ConfigRecord) -> RunHeader:
    """The run header; CodecError if the config does not survive the trip unchanged."""
    fields = _require(record, RUN, "run-key", "federation", "config-digest", "base-round")
    config = federation_from_dict(json.loads(str(fields["federation"])), source="<federation config from the coordinator>")
    if config.digest() != fields["config-digest"]:
        raise CodecError("the federation config received does not match its digest; coordinator and site versions differ?")
    return RunHeader(run_key=str(fields["run-key"]), config=config, base_round=int(fields["base-round"]),
                     dp_ready=bool(record.get("dp-ready", False)))


def encode_round(info: RoundInfo, site: str) -> ConfigRecord:
    """The round as ``site`` needs it: only its own λ_i (other sites' weights are not revealed)."""
    record = ConfigRecord(
        {"round": int(info.round), "num-rounds": int(info.num_rounds), "site": site, "site-weight": float(info.site_weight[site])}
    )
    for name, value in info.extras.items():
        record[f"{EXTRA_PREFIX}{name}"] = float(value)
    return record


def decode_round(record: ConfigRecord) -> RoundInfo:
    """The site's view of the round: it is the only participant it knows of."""
    fields = _require(record, ROUND, "round", "num-rounds", "site", "site-weight")
    site = str(fields["site"])
    extras = {k.removeprefix(EXTRA_PREFIX): _number(v, k) for k, v in record.items() if k.startswith(EXTRA_PREFIX)}
    return RoundInfo(
        round=int(fields["round"]),
        num_rounds=int(fields["num-rounds"]),
        participants=(site,),
        site_weight={site: float(fields["site-weight"])},
        extras=extras,
    )


# --------------------------------------------------------------------------- replies
def encode_reply(reply: SiteReply) -> RecordDict:
    """Returned models, K losses, sample count and the small info dict."""
    content = RecordDict()
    for key, record in models_to_records(reply.models).items():
        content[key] = record
    content[REPLY] = MetricRecord({"num-samples": int(reply.num_samples), "losses": [float(x) for x in reply.losses]})
    content[REPLY_INFO] = ConfigRecord({"info": json.dumps(dict(reply.info), sort_keys=True)})
    return content


def decode_reply(content: RecordDict) -> SiteReply:
    if REPLY not in content.metric_records:
        raise CodecError(f"reply has no {REPLY!r} record")
    metrics = content.metric_records[REPLY]
    losses = metrics.get("losses", [])
    if not isinstance(losses, list):
        raise CodecError(f"{REPLY}.losses must be a list, got {type(losses).__name__}")
    info: dict[str, Any] = {}
    if REPLY_INFO in content.config_records:
        info = json.loads(str(content.config_records[REPLY_INFO]["info"]))
    return SiteReply(
        num_samples=int(_number(metrics.get("num-samples", 0), "num-samples")),
        losses=tuple(float(x) for x in losses),
        models=records_to_models(content),
        info=info,
    )


# ------------------------------------------------------------------ site description
@dataclass(frozen=True)
class SiteCard:
    """What a site tells the coordinator when asked (query): nothing about its records."""

    name: str
    num_train: int
    facts: ModelFacts
    protocol: str | None = None  # acquisition protocol label, shown in the summary table
    privacy: Mapping[str, Any] | None = None  # a DP site: {"options", "grad_sample_mode", "where"}; None without DP
    # a tabular site's feature columns in the order of its inputs; () for images (and for cards saved
    # before sites sent them). Tables are matched by name: the coordinator refuses a site whose list differs.
    features: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n_train": self.num_train, "protocol": self.protocol, "facts": self.facts.__dict__.copy()}
        if self.privacy is not None:
            out["privacy"] = dict(self.privacy)
        if self.features:  # absent for image sites: their saved state reads as before
            out["features"] = list(self.features)
        return out

    @classmethod
    def from_json(cls, name: str, data: Mapping[str, Any]) -> SiteCard:
        privacy = data.get("privacy")
        return cls(name=name, num_train=int(data["n_train"]), facts=ModelFacts(**data["facts"]), protocol=data.get("protocol"),
                   privacy=None if privacy is None else dict(privacy), features=tuple(data.get("features", ())))


def encode_site(card: SiteCard) -> ConfigRecord:
    f = card.facts
    return ConfigRecord(
        {
            "name": card.name,
            "num-train": int(card.num_train),
            "protocol": card.protocol or "",
            "task": f.task,
            "in-channels": int(f.in_channels),
            "num-classes": int(f.num_classes),
            "spatial-dims": int(f.spatial_dims),
            "image-size": int(f.image_size),
            "privacy": "" if card.privacy is None else json.dumps(dict(card.privacy), sort_keys=True),
            **({"features": json.dumps(list(card.features))} if card.features else {}),
        }
    )


def decode_site(record: ConfigRecord) -> SiteCard:
    fields = _require(record, SITE, "name", "num-train", "task", "in-channels", "num-classes", "spatial-dims", "image-size")
    facts = ModelFacts(
        task=str(fields["task"]),
        in_channels=int(fields["in-channels"]),
        num_classes=int(fields["num-classes"]),
        spatial_dims=int(fields["spatial-dims"]),
        image_size=int(fields["image-size"]),
    )
    privacy = str(record.get("privacy", "")) or None
    card_privacy = None if privacy is None else json.loads(privacy)
    if card_privacy is not None and not (isinstance(card_privacy, dict) and isinstance(card_privacy.get("options"), dict)):
        raise CodecError(f"{SITE}.privacy must be a JSON object with 'options', got {privacy!r}")
    try:
        features = json.loads(str(record.get("features", "") or "[]"))
    except ValueError:
        features = None
    if not (isinstance(features, list) and all(isinstance(c, str) for c in features)):
        raise CodecError(f"{SITE}.features must be a JSON list of column names, got {record.get('features')!r}")
    return SiteCard(name=str(fields["name"]), num_train=int(fields["num-train"]), facts=facts,
                    protocol=str(record.get("protocol", "")) or None, privacy=card_privacy, features=tuple(features))


def encode_evaluate(site: str, round_idx: int, released: Sequence[float] | None = None) -> ConfigRecord:
    """An evaluation request for ``site`` after round ``round_idx``.

    ``released``: for a DP site, the K losses it released in its last training round (it ranks
    the models by them: :mod:`fedfew_med.deployment`); omitted when there are none.
    """
    fields: dict[str, Any] = {"site": site, "round": int(round_idx)}
    if released is not None:
        fields["released-losses"] = [float(v) for v in released]
    return ConfigRecord(fields)


def decode_evaluate(record: ConfigRecord) -> tuple[str, int, list[float] | None]:
    """``(site, round, released losses or None)`` of :func:`encode_evaluate`."""
    fields = _require(record, EVALUATE, "site", "round")
    released = record.get("released-losses")
    if released is not None:
        values = released if isinstance(released, list) else [released]
        released = [_number(v, "released-losses") for v in values]
        if not all(math.isfinite(v) for v in released):
            raise CodecError(f"{EVALUATE}.released-losses must be finite, got {released}")
    return str(fields["site"]), int(fields["round"]), released


def encode_evaluation(entry: Mapping[str, Any]) -> ConfigRecord:
    """A site's evaluation entry (model index, scores, metrics); NaN allowed (JSON extension, as metrics.jsonl)."""
    return ConfigRecord({"entry": json.dumps(dict(entry), sort_keys=True)})


def decode_evaluation(record: ConfigRecord) -> dict[str, Any]:
    fields = _require(record, EVALUATION, "entry")
    entry = json.loads(str(fields["entry"]))
    if not isinstance(entry, dict) or "metrics" not in entry or "model" not in entry:
        raise CodecError(f"{EVALUATION}: an entry needs 'model' and 'metrics', got {sorted(entry) if isinstance(entry, dict) else entry!r}")
    return entry


# ------------------------------------------------------------------------- privacy
@dataclass(frozen=True)
class PrivacyPlan:
    """What a DP site is sent with every train message besides the round.

    ``rounds`` (the rounds it takes part in, over the whole run) and ``first`` (its view of
    the first of them) are what its σ is calibrated for, as ``plan_sites`` does in the
    simulation; ``ledger_*`` describe the ledger the coordinator last received from it, which
    the site's own ledger must extend (a site whose ledger went missing or back refuses).
    """

    rounds: tuple[int, ...]
    first: RoundInfo
    ledger_digest: str
    ledger_entries: int
    ledger_epsilon: float


def encode_privacy_plan(plan: PrivacyPlan, site: str) -> ConfigRecord:
    first = plan.first
    body = {
        "rounds": [int(r) for r in plan.rounds],
        "first": {"round": int(first.round), "num_rounds": int(first.num_rounds), "site_weight": float(first.site_weight[site]),
                  "extras": {k: float(v) for k, v in first.extras.items()}},
        "ledger": {"digest": plan.ledger_digest, "entries": int(plan.ledger_entries), "epsilon": float(plan.ledger_epsilon)},
    }
    return ConfigRecord({"site": site, "plan": json.dumps(body, sort_keys=True)})


def decode_privacy_plan(record: ConfigRecord) -> tuple[str, PrivacyPlan]:
    """(site, plan); CodecError when a field is missing or malformed."""
    fields = _require(record, PRIVACY_PLAN, "site", "plan")
    site = str(fields["site"])
    try:
        body = json.loads(str(fields["plan"]))
        first, ledger = body["first"], body["ledger"]
        plan = PrivacyPlan(
            rounds=tuple(int(r) for r in body["rounds"]),
            first=RoundInfo(round=int(first["round"]), num_rounds=int(first["num_rounds"]), participants=(site,),
                            site_weight={site: float(first["site_weight"])},
                            extras={str(k): float(v) for k, v in first["extras"].items()}),
            ledger_digest=str(ledger["digest"]),
            ledger_entries=int(ledger["entries"]),
            ledger_epsilon=float(ledger["epsilon"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CodecError(f"{PRIVACY_PLAN}: malformed plan ({type(exc).__name__}: {exc})") from None
    if not plan.rounds or plan.first.round != plan.rounds[0] or plan.ledger_entries < 0:
        raise CodecError(f"{PRIVACY_PLAN}: the plan's first round must be the first of its rounds {list(plan.rounds)}")
    return site, plan


@dataclass(frozen=True)
class PrivacyReply:
    """A DP site's privacy after its round: its ``SitePrivacy.state_dict()`` and ``report()``."""

    state: Mapping[str, Any]
    report: Mapping[str, Any]
    declined: bool = False  # the round would have exceeded its budget: it did not train


def encode_privacy_reply(reply: PrivacyReply) -> ConfigRecord:
    return ConfigRecord({"state": json.dumps(dict(reply.state), sort_keys=True),
                         "report": json.dumps(dict(reply.report), sort_keys=True), "declined": bool(reply.declined)})


def decode_privacy_reply(record: ConfigRecord) -> PrivacyReply:
    fields = _require(record, PRIVACY, "state", "report", "declined")
    state, report = json.loads(str(fields["state"])), json.loads(str(fields["report"]))
    if not isinstance(state, dict) or not isinstance(report, dict):
        raise CodecError(f"{PRIVACY}: state and report must be JSON objects")
    return PrivacyReply(state=state, report=report, declined=bool(fields["declined"]))


# ------------------------------------------------------------------ site state in context
def state_to_records(state: SiteState, *, run_key: str, round_idx: int) -> tuple[ArrayRecord, ConfigRecord]:
    """A site's state as (tensors, index): tensors are ``t<i>``, the index maps them to (kind, slot, name)."""
    tensors, index = flatten_state(state)
    record = ArrayRecord()
    for key, t in tensors.items():
        record[key] = Array(t.detach().cpu().contiguous().numpy())
    meta = ConfigRecord({"run-key": run_key, "round": int(round_idx), "index": json.dumps(index)})
    return record, meta


def records_to_state(tensors: ArrayRecord, meta: ConfigRecord) -> tuple[str, int, SiteState]:
    """The inverse of :func:`state_to_records`: (run key, round, state)."""
    fields = _require(meta, STATE_META, "run-key", "round", "index")
    flat = {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in tensors.items()}
    return str(fields["run-key"]), int(fields["round"]), unflatten_state(flat, json.loads(str(fields["index"])))


# ----------------------------------------------------------------------------- misc
def _require(record: Mapping[str, Any], what: str, *keys: str) -> dict[str, Any]:
    missing = [k for k in keys if k not in record]
    if missing:
        raise CodecError(f"{what} record lacks {', '.join(repr(k) for k in missing)}")
    out = {k: record[k] for k in keys}
    for k, v in out.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise CodecError(f"{what}.{k} must be finite, got {v}")
    return out


def _number(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CodecError(f"{key} must be a number, got {value!r}")
    return float(value)

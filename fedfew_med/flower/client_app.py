"""The Flower ``ClientApp``: one hospital's side of a FedFew round.

Three message handlers, each a thin skin over :class:`~fedfew_med.runtime.SiteRuntime`:

``query``
    The site's name, training-set size and model facts (so the coordinator can
    compute λ_i and build the initial models), a tabular site's feature column
    names in its input order (so the coordinator can refuse a site whose columns
    differ: tables are matched by name), and whether it trains with DP (its
    resolved ``[privacy]`` options: target ε, δ, ...); nothing about its records.
``train``
    Run :meth:`SiteRuntime.step` on the received models from the state the
    coordinator names (its *base round*); save the new state atomically on the
    site's disk and in the node's context; return the updated models, K losses
    and the sample count. A DP site first opens and checks its privacy ledger
    (:mod:`fedfew_med.flower.site_privacy`), declines a round that would exceed its
    budget, trains through the simulation's DP work, saves the ledger (even when the
    round fails) and adds its ledger state and privacy report to the reply.
``evaluate``
    :meth:`SiteRuntime.evaluate` of the received server models on the site's test
    split; the model chosen for deployment is recorded in the site's state
    directory (``deployed.json``); the training state is untouched. A DP site
    chooses by the K losses it released in its last training round, which the
    coordinator sends back, and computes nothing new on its training records
    (:mod:`fedfew_med.deployment`).

A handler's error is logged in full at the site and reaches the coordinator without
paths or file names (:mod:`fedfew_med.flower.site_errors`).

Flower starts a fresh ClientApp process for every message, so nothing is cached
between messages except the site state kept in ``context.state`` (a copy of the
last snapshot; the disk copy survives SuperNode restarts).
"""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedfew_med.data import SiteData
from fedfew_med.dp.federation import site_privacy_options
from fedfew_med.flower import codec
from fedfew_med.flower.logs import forward_logs
from fedfew_med.flower.node import NodeSettings, site_runtime
from fedfew_med.flower.site_errors import site_errors
from fedfew_med.flower.site_privacy import SiteLedger, privacy_card
from fedfew_med.flower.site_store import SiteStore
from fedfew_med.runtime import ModelFacts
from fedfew_med.training import SiteState

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Describe this site: name, sample count, model facts, protocol label."""
    with forward_logs(), site_errors("query", _places(context)):
        data = NodeSettings.from_node_config(context.node_config).load_site()
        privacy = None
        if codec.RUN in msg.content.config_records:  # the federation's [privacy] and this site's own resolve together
            config = codec.decode_run(msg.content.config_records[codec.RUN]).config
            privacy = privacy_card(config, data, site_runtime(config, data, SiteState(), dp_ready=True))
        card = codec.SiteCard(
            name=data.name,
            num_train=data.size("train"),
            facts=ModelFacts.of(data),
            protocol=_protocol(data),
            privacy=privacy,
            features=tuple(str(c) for c in data.metadata.get("features", ())),
        )
        return Message(RecordDict({codec.SITE: codec.encode_site(card)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One local round; the state is saved only if the step succeeds and validates."""
    with forward_logs(), site_errors("train", _places(context)):
        settings = NodeSettings.from_node_config(context.node_config)
        header = codec.decode_run(msg.content.config_records[codec.RUN])
        info = codec.decode_round(msg.content.config_records[codec.ROUND])
        data = settings.load_site()
        _check_addressee(info.participants[0], data)
        plan = None
        if codec.PRIVACY_PLAN in msg.content.config_records:
            planned_for, plan = codec.decode_privacy_plan(msg.content.config_records[codec.PRIVACY_PLAN])
            _check_addressee(planned_for, data)
        _set_threads(header.config.run.threads)
        store = SiteStore(settings.state_dir, run_key=header.run_key, site=data.name)
        runtime = site_runtime(header.config, data, _load_state(context, store, header.base_round), dp_ready=header.dp_ready)
        ledger = SiteLedger.open(config=header.config, data=data, runtime=runtime, plan=plan, store=store, context=context)
        if ledger is not None:
            if not ledger.can_train(info.round):  # checked before any data is touched
                ledger.save(context)
                content = RecordDict({codec.PRIVACY: codec.encode_privacy_reply(ledger.reply(info.round, declined=True))})
                return Message(content, reply_to=msg)
            runtime.work_factory = ledger.privacy.work_factory  # DP by composition, as in the simulation
        try:
            reply = runtime.step(info, codec.records_to_models(msg.content))
        finally:
            if ledger is not None:  # what was spent stays spent, even if the round failed
                ledger.save(context)
        store.save(info.round, runtime.state, keep=header.base_round)
        _remember(context, runtime.state, run_key=header.run_key, round_idx=info.round)
        content = codec.encode_reply(reply)
        if ledger is not None:
            content[codec.PRIVACY] = codec.encode_privacy_reply(ledger.reply(info.round))
        return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The deployed model's test metrics at this site (the state is read, never changed)."""
    with forward_logs(), site_errors("evaluate", _places(context)):
        settings = NodeSettings.from_node_config(context.node_config)
        header = codec.decode_run(msg.content.config_records[codec.RUN])
        site, round_idx, released = codec.decode_evaluate(msg.content.config_records[codec.EVALUATE])
        data = settings.load_site()
        _check_addressee(site, data)
        _set_threads(header.config.run.threads)
        store = SiteStore(settings.state_dir, run_key=header.run_key, site=data.name)
        runtime = site_runtime(header.config, data, _load_state(context, store, header.base_round), dp_ready=header.dp_ready)
        models = codec.records_to_models(msg.content)
        if list(models) != list(range(len(models))):
            raise codec.CodecError(f"evaluate needs every server model 0..K-1, got indices {list(models)}")
        # A DP site ranks the models by the losses it released (sent back by the coordinator), never by fresh ones:
        # it decides that from its own config, whatever the message says (fedfew_med.deployment).
        private = site_privacy_options(header.config, data) is not None
        entry = runtime.evaluate(list(models.values()), round_idx, private=private, released=released)
        store.save_choice(round_idx, entry)
        return Message(RecordDict({codec.EVALUATION: codec.encode_evaluation(entry)}), reply_to=msg)


def _places(context: Context) -> dict[str, Path | None]:
    """The node's local paths, as given in ``--node-config``, and the placeholders that replace them in errors."""
    places: dict[str, Path | None] = {}
    for key in ("state-dir", "site-config", "federation-config"):
        value = context.node_config.get(key)
        places[f"<{key}>"] = Path(value) if isinstance(value, str) and value else None
    return places


def _protocol(data: SiteData) -> str | None:
    value = data.metadata.get("protocol")
    return None if value is None else str(value)


def _check_addressee(site: str, data: SiteData) -> None:
    if site != data.name:
        raise ValueError(f"the message is for site {site!r}, but this SuperNode serves {data.name!r}")


def _set_threads(threads: int) -> None:
    if threads:  # this process exists only for this message, so the setting dies with it
        torch.set_num_threads(threads)


def _load_state(context: Context, store: SiteStore, base_round: int) -> SiteState:
    """The state after ``base_round``: from the context if it holds exactly that, else from disk."""
    if base_round < 0:
        return SiteState()
    tensors = context.state.array_records.get(codec.STATE_TENSORS)
    meta = context.state.config_records.get(codec.STATE_META)
    if tensors is not None and meta is not None:
        run_key, round_idx, state = codec.records_to_state(tensors, meta)
        if run_key == store.run_key and round_idx == base_round:
            return state
    return store.load(base_round)


def _remember(context: Context, state: SiteState, *, run_key: str, round_idx: int) -> None:
    tensors, meta = codec.state_to_records(state, run_key=run_key, round_idx=round_idx)
    context.state[codec.STATE_TENSORS] = tensors
    context.state[codec.STATE_META] = meta

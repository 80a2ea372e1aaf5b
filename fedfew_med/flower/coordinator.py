"""The coordinator: the FedFew round loop of ``fedfew_med.simulation``, over a Flower ``Grid``.

Per round, exactly as the in-process simulation does, with messages in between:

0. *Roster.* SuperNodes the coordinator has not met yet are sent a ``query``
   message; each answers with its site name, training-set size and model facts
   (a bounded wait, ``query-timeout``); a site whose facts, or (tabular) whose
   feature column names and their order, differ from the admitted sites' is
   refused for the run. Known sites are remembered with their
   sample counts in every checkpoint, so λ_i needs no query round after the first
   one, and a site that is offline stays a participant that *failed*.
1. *Participants* are sampled among all known sites (``run.participation``,
   seeded by round); λ_i is computed from their sample counts.
2. *Train.* Each connected participant is sent, in one message, the models it
   needs (one ``ArrayRecord`` per model), its round info and its base round; the
   coordinator waits for each site at most ``[faults].site_timeout_s`` seconds when
   that is set (> 0) and not above ``round-timeout``, else ``round-timeout``, and not
   at all once its SuperNode has left (:mod:`fedfew_med.flower.waits`). A site that is
   offline (``SiteOffline``), errors, times out (``SiteTimeout``) or returns a malformed
   update is skipped for the round and named in the record's ``failures``. Fewer
   than ``min-sites`` valid replies end the run with :class:`FederationError` (the
   last checkpoint stays resumable).
3. *Aggregate* the valid replies, in participant order (as the simulation does).
4. *Evaluate* every connected site's deployed model (when the simulation would),
   append the record to ``metrics.jsonl`` and checkpoint the server models and the
   JSON state (run key, roster, each site's last accepted round).

Resume (``resume=true``) continues after the last checkpoint; sites restore the
state they had after the round the coordinator last accepted from them (see
``fedfew_med.flower.site_store``), so a replayed round is computed exactly as the
first time.

Differential privacy (``[privacy]`` of the federation or of a site's own file,
``[server_privacy]``) is composed as in the simulation; see
:mod:`fedfew_med.flower.privacy` (the coordinator) and
:mod:`fedfew_med.flower.site_privacy` (the sites). A participant out of privacy budget does
not train (``privacy_stopped``); fewer than ``min-sites`` replies then end the run only if
fewer sites than that could train.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from flwr.app import Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedfew_med import checkpoint
from fedfew_med.algorithms import Params, RoundInfo, SiteReply
from fedfew_med.algorithms.base import ServerStep
from fedfew_med.config import ConfigError, FederationConfig, did_you_mean
from fedfew_med.data.tables import feature_mismatch
from fedfew_med.deployment import check_private_deployment, load_released, released_state
from fedfew_med.dp.chain import CHAIN_FILE, LedgerChain, open_chain
from fedfew_med.dp.ledger import LedgerStateError
from fedfew_med.dp.server import ServerDP
from fedfew_med.flower import codec, rundir, transport
from fedfew_med.flower.privacy import NO_UPDATE, RunPrivacy
from fedfew_med.flower.waits import Bound, collect
from fedfew_med.metrics import headline_metric, summarize
from fedfew_med.runtime import (
    ModelFacts,
    ServerRuntime,
    make_algorithm,
    params_nbytes,
    reply_nbytes,
    validate_reply,
)

log = logging.getLogger(__name__)

NOT_CONNECTED = "SiteOffline: the site's SuperNode is not connected to the SuperLink"
_UNREACHABLE = ("SiteTimeout", "SiteOffline")  # train failures after which evaluation is not even asked for
_TTL_SLACK = 30.0  # seconds a message outlives the wait for its reply (then the SuperLink drops it)
_ERROR_NAMES = {v: k for k, v in vars(ErrorCode).items() if k.isupper() and isinstance(v, int)}
_CLIENT_EXCEPTION = re.compile(r"^<class '([\w.]+)'>:<'(.*)'>$", re.DOTALL)


class FederationError(RuntimeError):
    """Too few sites to go on; the last checkpoint is intact and the run can be resumed."""


class ServerConfigError(ConfigError):
    """The ServerApp's run config (``--run-config``) is invalid."""


@dataclass(frozen=True)
class ServerSettings:
    """The coordinator's run config (Flower ``--run-config`` keys in kebab case).

    Attributes
    ----------
    federation_config
        The federation TOML on the coordinator's machine (absolute path).
    run_dir
        Where ``metrics.jsonl``, checkpoints and the summary go (absolute path).
    resume, overwrite
        As ``fedfew-med simulate --resume / --overwrite``.
    min_sites
        Fewest valid replies a round needs; fewer end the run (resumable). At least 1.
    expected_sites
        Wait (at most ``connect_timeout``) until this many SuperNodes are connected before
        the first round; 0 waits only for ``min_sites``.
    connect_timeout, query_timeout, round_timeout
        Upper bounds, in seconds, of every wait: for SuperNodes to connect, for the
        answers to a query, for the replies of one train or evaluate phase. The federation's
        ``[faults].site_timeout_s``, when set (> 0) and smaller, bounds each train or evaluate
        wait instead; a site whose SuperNode leaves the SuperLink is given up at once
        (:mod:`fedfew_med.flower.waits`).
    poll_interval
        Seconds between two pulls of replies from the SuperLink.
    stop_after
        Stop after this many rounds in this run (0: run to the end); resume later.
    overrides
        ``set``: config overrides (``SECTION.KEY=VALUE``, TOML values, one a line) applied to the
        federation config as ``simulate --set`` does; the resolved config is what the sites receive.
    tls, node_auth, launched_by
        The transport facts the launcher knows (``fedfew-med flower run`` passes them): TLS to the
        SuperLink, SuperNode authentication, and how it knows them. Recorded in the checkpoints and
        ``summary.json`` (:mod:`fedfew_med.flower.transport`); ``launched_by`` empty: not recorded.
    """

    federation_config: Path
    run_dir: Path
    resume: bool = False
    overwrite: bool = False
    min_sites: int = 1
    expected_sites: int = 0
    connect_timeout: float = 120.0
    query_timeout: float = 60.0
    round_timeout: float = 600.0
    poll_interval: float = 0.5
    stop_after: int = 0
    overrides: tuple[str, ...] = ()
    tls: bool = False
    node_auth: bool = False
    launched_by: str = ""

    KEYS: ClassVar[dict[str, str]] = {
        "federation-config": "federation_config",
        "run-dir": "run_dir",
        "resume": "resume",
        "overwrite": "overwrite",
        "min-sites": "min_sites",
        "expected-sites": "expected_sites",
        "connect-timeout": "connect_timeout",
        "query-timeout": "query_timeout",
        "round-timeout": "round_timeout",
        "poll-interval": "poll_interval",
        "stop-after": "stop_after",
        "set": "overrides",
        "tls": "tls",
        "node-auth": "node_auth",
        "launched-by": "launched_by",
    }

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> ServerSettings:
        """Validate the run config; errors name the key, what must hold and what was given."""
        where = "--run-config"
        unknown = sorted(set(run_config) - set(cls.KEYS))
        if unknown:
            raise ServerConfigError(f"{where}: unknown key {unknown[0]!r}{did_you_mean(unknown[0], cls.KEYS)}; "
                                    f"allowed keys are {', '.join(cls.KEYS)}")
        kinds = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, attr in cls.KEYS.items():
            if key not in run_config:
                continue
            value = run_config[key]
            kind = kinds[attr]
            if kind == "Path":
                if not isinstance(value, str) or not value or not Path(value).expanduser().is_absolute():
                    raise ServerConfigError(f"{where}: {key} must be an absolute path, got {value!r}")
                values[attr] = Path(value).expanduser()
            elif kind == "bool":
                if not isinstance(value, bool):
                    raise ServerConfigError(f"{where}: {key} must be true or false, got {value!r}")
                values[attr] = value
            elif attr == "overrides":  # `flower run --set K=V ...`: one override a line (run-config values are scalars)
                if not isinstance(value, str):
                    raise ServerConfigError(f"{where}: set must be overrides SECTION.KEY=VALUE, one a line, got {value!r}")
                lines = tuple(line for line in value.split("\n") if line.strip())
                bad = [line for line in lines if "=" not in line]
                if bad:
                    raise ServerConfigError(f"{where}: set: each override must be SECTION.KEY=VALUE, got {bad[0]!r}")
                values[attr] = lines
            elif kind == "str":
                if not isinstance(value, str):
                    raise ServerConfigError(f"{where}: {key} must be a string, got {value!r}")
                values[attr] = value
            elif kind == "int":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ServerConfigError(f"{where}: {key} must be an integer >= 0, got {value!r}")
                values[attr] = value
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                    raise ServerConfigError(f"{where}: {key} must be a number of seconds > 0, got {value!r}")
                values[attr] = float(value)
        for key in ("federation-config", "run-dir"):
            if cls.KEYS[key] not in values:
                raise ServerConfigError(f"{where} must set {key}=\"/absolute/path\"")
        if values.get("min_sites", 1) < 1:
            raise ServerConfigError(f"{where}: min-sites must be an integer >= 1, got {values['min_sites']}")
        return cls(**values)


NODES_FILE = "nodes.json"  # node id <-> site, written by the coordinator into the run directory


@dataclass
class CoordinatorResult:
    """What a finished (or stopped) coordinator run produced; the simulation's result, for Flower."""

    run_dir: Path
    rounds_completed: int
    models: list[Params]
    summary: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)  # rounds run by this call


class Coordinator:
    """Drives one federation run over a Flower ``Grid``; see the module docstring."""

    def __init__(self, grid: Grid, config: FederationConfig, settings: ServerSettings) -> None:
        self.grid = grid
        self.config = config
        self.settings = settings
        self.run_key = ""
        self.facts: ModelFacts | None = None
        self.roster: dict[str, codec.SiteCard] = {}  # every site met in this run (persisted)
        self.last_accepted: dict[str, int] = {}  # site -> last round whose reply was aggregated (persisted)
        self.released: dict[str, list[float]] = {}  # DP site -> K losses it released last (persisted)
        self.node_of: dict[str, int] = {}  # connected site -> its SuperNode's node id (not persisted)
        self.rejected: set[int] = set()  # node ids refused for this run (facts or name conflicts)
        self._nodes_written = ""  # the last nodes.json written by this coordinator
        self.launches: list[dict[str, Any]] = []  # every start of this run and its transport facts (persisted)
        self.server: ServerRuntime | None = None
        self.privacy = RunPrivacy(config)

    # ------------------------------------------------------------------ the run
    def run(self) -> CoordinatorResult:
        """Run (or resume) the federation to its last round (or ``stop-after`` rounds) and write the summary."""
        with rundir.locked(self.settings.run_dir):
            return self._run()

    def _run(self) -> CoordinatorResult:
        cfg, st = self.config, self.settings
        run_dir = st.run_dir
        chain = self._open_chain()  # privacy_ledger.jsonl: checked before prepare changes anything
        ckpt = rundir.prepare(run_dir, cfg, resume=st.resume, overwrite=st.overwrite)
        start, history = 0, []
        if ckpt is not None:
            self._restore(ckpt)
            if chain is not None:  # the checkpoint's ledgers must be those the chain recorded (no rollback)
                try:
                    chain.verify_checkpoint(ckpt.round, ckpt.state.get("privacy"), where=f"{run_dir}: round {ckpt.round}")
                except LedgerStateError as exc:
                    raise rundir.RunDirError(str(exc)) from None
            start = ckpt.round + 1
            history = checkpoint.truncate_records(run_dir / "metrics.jsonl", ckpt.round)
            log.info("resuming %s after round %d", run_dir, ckpt.round)
        else:  # (a resume without a checkpoint is logged by rundir.prepare)
            self.run_key = f"{re.sub(r'[^A-Za-z0-9._-]', '-', cfg.run.name)}-{uuid.uuid4().hex[:12]}"
        end = cfg.run.rounds if not st.stop_after else min(cfg.run.rounds, start + st.stop_after)
        self.launches.append(transport.launch_entry(first_round=start, tls=st.tls, node_auth=st.node_auth,
                                                    launched_by=st.launched_by))
        self._await_nodes(max(st.min_sites, st.expected_sites))
        self._refresh_roster()
        server = self._server()
        records: list[dict[str, Any]] = []
        evaluation: dict[str, dict[str, Any]] = {}
        for r in range(start, end):
            t0 = time.perf_counter()
            if len(self.node_of) < st.min_sites:
                self._await_nodes(st.min_sites)
            self._refresh_roster()
            participants = server.participants(r, list(self.roster))
            trainers, stopped = self.privacy.split(r, participants)  # a site out of privacy budget does not train
            info = server.round_info(r, {s: self.roster[s].num_train for s in trainers or participants})
            replies, traffic, failures, declined = self._train(info, trainers)
            stopped = [s for s in participants if s in set(stopped) | set(declined)]
            needed = st.min_sites if not stopped else min(st.min_sites, len(participants) - len(stopped))
            if len(replies) < needed:
                raise FederationError(
                    f"round {r}: {len(replies)} valid site replies, fewer than min-sites={st.min_sites}; "
                    f"failures: {failures}. The checkpoint of the previous round is intact: fix the sites and resume."
                )
            step = server.aggregate(info, replies) if replies else ServerStep(models=server.models, log=dict(NO_UPDATE))
            for s in replies:
                self.last_accepted[s] = r
                if s in self.privacy.sites and replies[s].losses:  # what a DP site ranks its models by (deployment.py)
                    self.released[s] = list(replies[s].losses)
            extra: dict[str, Any] = {}
            if r == cfg.run.rounds - 1 or r % cfg.run.eval_every == 0 or r == end - 1:
                unreachable = {s: why for s, why in failures.items() if why.startswith(_UNREACHABLE)}
                evaluation, eval_failures = self._evaluate(r, skip=unreachable)
                if eval_failures:
                    extra["evaluation_failures"] = eval_failures
            record = {
                "round": r,
                "participants": participants,
                "failures": failures,
                "server": step.log,
                "site_losses": {s: list(rep.losses) for s, rep in replies.items()},
                "site_info": {s: dict(rep.info) for s, rep in replies.items()},
                "assignments": {s: e["model"] for s, e in evaluation.items()},
                "metrics": {s: e["metrics"] for s, e in evaluation.items()},
                "summary": summarize({s: e["metrics"][headline_metric(self._facts().task, cfg.run.metric)] for s, e in evaluation.items()}),
                "bytes": traffic,
                "seconds": round(time.perf_counter() - t0, 4),
                **extra,
                **self.privacy.round_entries(r, stopped, server.algorithm),
            }
            state = self._state()
            if chain is None and self._private():  # DP asked for by the sites' own files: known once they answered
                chain = open_chain(run_dir, config_digest=cfg.digest(), resume=False, checkpoint_round=None)
            if chain is not None:  # the round's spending is on disk before its record and checkpoint, as the simulation
                try:
                    chain.append(r, state["privacy"])
                except LedgerStateError as exc:
                    raise rundir.RunDirError(str(exc)) from None
            checkpoint.append_record(run_dir / "metrics.jsonl", record)  # before the checkpoint, as the simulation
            checkpoint.save(run_dir, r, server_models=server.models, sites={}, state=state)
            records.append(record)
            sm = record["summary"]
            scored = f"; mean {sm['mean']:.3f}, worst site {sm['worst']:.3f} over {len(evaluation)} site(s)" if evaluation else ""
            log.info("round %d done: %d replies, failures %s%s", r, len(replies), sorted(failures), scored)
        latest = checkpoint.latest_round(run_dir)
        completed = 0 if latest is None else latest + 1
        if not evaluation:
            evaluation, _ = self._evaluate(max(completed - 1, 0))
        summary = rundir.summarize_run(
            config=cfg,
            task=self._facts().task,
            num_models=server.algorithm.num_models,
            sites={s: {"n_train": c.num_train, "protocol": c.protocol} for s, c in self.roster.items()},
            records=history + records,
            evaluation=evaluation,
            models=server.models,
            dp_ready=bool(self.privacy.dp_ready),
            features=next((c.features for _, c in sorted(self.roster.items()) if c.features), ()),  # admitted: all equal
        )
        summary["finished"] = completed >= cfg.run.rounds
        summary["run_key"] = self.run_key
        summary["transport"] = transport.transport_record(self.launches, self._nodes_doc())
        entries = self.privacy.round_entries(max(completed - 1, 0), [], server.algorithm)
        summary.update({k: v for k, v in entries.items() if k != "privacy_stopped"})
        checkpoint.write_final(run_dir, server.models, summary)
        log.info("run %s in %s:\n%s", "finished" if summary["finished"] else "stopped", run_dir, rundir.summary_table(summary))
        return CoordinatorResult(run_dir=run_dir, rounds_completed=completed, models=server.models, summary=summary, records=records)

    # --------------------------------------------------------------- the phases
    def _train(
        self, info: RoundInfo, participants: list[str]
    ) -> tuple[dict[str, SiteReply], dict[str, dict[str, int]], dict[str, str], list[str]]:
        """Replies, traffic and failures of the sites that trained, and the DP sites that declined (out of budget)."""
        server = self._server()
        failures: dict[str, str] = {}
        sent: dict[str, dict[int, Params]] = {}
        messages: dict[str, Message] = {}
        for s in participants:
            if s not in self.node_of:
                failures[s] = NOT_CONNECTED
                continue
            sent[s] = server.models_for(s, info)
            content = RecordDict()
            for key, record in codec.models_to_records(sent[s]).items():
                content[key] = record
            content[codec.RUN] = codec.encode_run(self._header(s))
            content[codec.ROUND] = codec.encode_round(info, s)
            plan = self.privacy.plan_for(s)
            if plan is not None:
                content[codec.PRIVACY_PLAN] = codec.encode_privacy_plan(plan, s)
            messages[s] = self._message(content, s, MessageType.TRAIN, group=str(info.round))
        bound = self._round_bound()
        answers, errors = self._exchange(messages, bound=bound, timeout_words=lambda s: (
            f"SiteTimeout: site {s!r} did not finish round {info.round} within {bound.words()}; its late reply is discarded"))
        failures.update(errors)
        replies: dict[str, SiteReply] = {}
        traffic: dict[str, dict[str, int]] = {}
        declined: list[str] = []
        for s in participants:  # participant order: aggregation sums in this order, as the simulation
            if s not in answers:
                continue
            try:
                if self._privacy_of(s, answers[s]):
                    declined.append(s)
                    continue
                reply = codec.decode_reply(answers[s].content)
                validate_reply(reply, sent[s], server.algorithm.num_models, max_update_norm=self.config.faults.max_update_norm)
            except Exception as exc:  # a malformed update must not crash the federation
                failures[s] = f"{type(exc).__name__}: {exc}"
                continue
            replies[s] = reply
            traffic[s] = {"sent": sum(params_nbytes(p) for p in sent[s].values()), "received": reply_nbytes(reply)}
        for s, why in failures.items():
            log.warning("round %d: site %s skipped: %s", info.round, s, why)
        return replies, traffic, {s: failures[s] for s in participants if s in failures}, declined

    def _privacy_of(self, site: str, answer: Message) -> bool:
        """Take a train reply's privacy report (a DP site must send one); True when the site declined the round."""
        record = answer.content.config_records.get(codec.PRIVACY)
        if record is None:
            if site in self.privacy.sites:
                raise LedgerStateError(f"site {site!r} trains with DP, but its reply carries no privacy report")
            return False
        reply = codec.decode_privacy_reply(record)
        self.privacy.accept(site, reply)  # what the site spent is kept even if its update is refused below
        if reply.declined:
            log.warning("round %d: site %s declined to train: out of privacy budget (ε = %.4f of %g)",
                        int(reply.report.get("round", -1)), site, float(reply.report.get("epsilon", 0.0)),
                        float(reply.report.get("target_epsilon") or 0.0))
        return reply.declined

    def _evaluate(self, round_idx: int, *, skip: Mapping[str, str] | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """Every connected site's deployed model on its test split, by site name.

        Sites in ``skip`` (those that just timed out or were unavailable in training) are not
        asked: a dead SuperNode would otherwise cost a second ``round-timeout`` in the same round.
        """
        models = codec.models_to_records(dict(enumerate(self._server().models)))
        failures: dict[str, str] = {}
        messages: dict[str, Message] = {}
        for s in sorted(self.roster):
            if s not in self.node_of:
                failures[s] = NOT_CONNECTED
                continue
            if skip and s in skip:
                failures[s] = skip[s]  # its training failure (SiteOffline / SiteTimeout): not asked again this round
                continue
            content = RecordDict()
            for key, record in models.items():  # the same records in every message: the SuperLink stores them once
                content[key] = record
            content[codec.RUN] = codec.encode_run(self._header(s))
            content[codec.EVALUATE] = codec.encode_evaluate(s, round_idx, self.released.get(s))
            messages[s] = self._message(content, s, MessageType.EVALUATE, group=str(round_idx))
        bound = self._round_bound()
        answers, errors = self._exchange(messages, bound=bound, timeout_words=lambda s: (
            f"SiteTimeout: site {s!r} did not finish its evaluation after round {round_idx} within {bound.words()}"))
        failures.update(errors)
        evaluation: dict[str, dict[str, Any]] = {}
        for s in sorted(answers):
            try:
                evaluation[s] = codec.decode_evaluation(answers[s].content.config_records[codec.EVALUATION])
            except Exception as exc:
                failures[s] = f"{type(exc).__name__}: {exc}"
        for s, why in failures.items():
            log.warning("evaluation after round %d: site %s skipped: %s", round_idx, s, why)
        return evaluation, dict(sorted(failures.items()))

    # ------------------------------------------------------------- the roster
    def _await_nodes(self, want: int) -> None:
        """Wait (bounded) until ``want`` SuperNodes are connected; FederationError below ``min-sites``."""
        st = self.settings
        deadline = time.monotonic() + st.connect_timeout
        online = set(self.grid.get_node_ids())
        while len(online) < want and time.monotonic() < deadline:
            time.sleep(min(st.poll_interval, max(deadline - time.monotonic(), 0.0)))
            online = set(self.grid.get_node_ids())
        if len(online) < st.min_sites:
            raise FederationError(
                f"{len(online)} SuperNode(s) connected after {st.connect_timeout:g}s, fewer than min-sites={st.min_sites}"
            )
        if len(online) < want:
            log.warning("%d of the %d expected SuperNodes connected after %gs; going on with them",
                        len(online), want, st.connect_timeout)

    def _refresh_roster(self) -> None:
        """Forget disconnected nodes; query new ones (bounded) and admit those that fit."""
        online = list(self.grid.get_node_ids())
        self.node_of = {s: n for s, n in self.node_of.items() if n in set(online)}
        known = set(self.node_of.values()) | self.rejected
        new = sorted(n for n in online if n not in known)
        if not new:
            self._write_nodes()  # a node may have left
            return
        header = codec.encode_run(codec.RunHeader(run_key=self.run_key, config=self.config, base_round=-1,
                                                  dp_ready=bool(self.privacy.dp_ready)))
        messages = {n: self._message(RecordDict({codec.RUN: header}), n, MessageType.QUERY, group="query") for n in new}
        query = Bound(self.settings.query_timeout, "query-timeout")
        answers, errors = self._exchange(messages, bound=query, timeout_words=lambda n: (
            f"SiteTimeout: SuperNode {n} did not describe its site within {query.words()}"))
        for n, why in errors.items():
            log.warning("SuperNode %d did not describe its site (will ask again next round): %s", n, why)
        cards: list[tuple[codec.SiteCard, int]] = []
        for n, answer in answers.items():
            try:
                cards.append((codec.decode_site(answer.content.config_records[codec.SITE]), n))
            except Exception as exc:
                log.warning("SuperNode %d sent an unreadable site description: %s", n, exc)
        for card, n in sorted(cards, key=lambda c: (c[0].name, c[1])):
            self._admit(card, n)
        self._write_nodes()

    def _write_nodes(self) -> None:
        """``nodes.json`` in the run directory: which SuperNode id serves which site (``fedfew-med flower nodes``).

        Flower's own listing (``flwr supernode ls``) shows only node ids; the coordinator is the one
        that learns the site behind each id, so it writes the mapping whenever it changes.
        """
        text = json.dumps(self._nodes_doc(), indent=2, sort_keys=True) + "\n"
        if text != self._nodes_written:  # every round asks; the file changes only when the mapping does
            checkpoint.atomic_write_text(self.settings.run_dir / NODES_FILE, text)
            self._nodes_written = text

    def _nodes_doc(self) -> dict[str, Any]:
        rows = [{"node_id": self.node_of.get(s), "site": s, "n_train": c.num_train,
                 "status": "connected" if s in self.node_of else "disconnected"} for s, c in sorted(self.roster.items())]
        return {"run_key": self.run_key, "sites": rows, "refused_node_ids": sorted(self.rejected)}

    def _admit(self, card: codec.SiteCard, node: int) -> None:
        # tables are matched by name: a site alone keeps its CSV's column order, so any other list than
        # the admitted sites' (all equal) would cross features silently. Checked before the facts, so that
        # a missing column is named rather than reported as a feature count. Cards saved before sites sent
        # their columns have none and fix nothing.
        reference = next(((s, c.features) for s, c in sorted(self.roster.items()) if c.features), None)
        if reference is not None and card.features != reference[1]:
            self.rejected.add(node)
            how = feature_mismatch(card.features, reference[1]) if card.features else "names no column (an older fedfew-med?)"
            log.error("SuperNode %d (site %s) refused for this run: its table %s, compared with site %s; the "
                      "federation's feature columns are %s (list them in [source].feature_columns of its site file)",
                      node, card.name, how, reference[0], list(reference[1]))
            return
        if self.facts is None:
            self.facts = card.facts  # the first site (by name) fixes what the models look like
        if card.facts != self.facts:
            self.rejected.add(node)
            log.error("SuperNode %d (site %s) refused for this run: its data has %s, the federation %s",
                      node, card.name, card.facts, self.facts)
            return
        why = self.privacy.refusal(card, self.roster)
        if why is not None:
            self.rejected.add(node)
            log.error("SuperNode %d (site %s) refused for this run: %s", node, card.name, why)
            return
        if card.name in self.node_of:
            self.rejected.add(node)
            log.error("SuperNode %d claims site %s, which SuperNode %d already serves; refused for this run",
                      node, card.name, self.node_of[card.name])
            return
        old = self.roster.get(card.name)
        if old is not None and old.num_train != card.num_train:
            log.warning("site %s now reports %d training records (was %d); λ follows", card.name, card.num_train, old.num_train)
        self.roster[card.name] = card
        self.node_of[card.name] = node
        log.info("site %s is SuperNode %d (%d training records)", card.name, node, card.num_train)

    # ---------------------------------------------------------------- helpers
    def _server(self) -> ServerRuntime:
        if self.server is None:
            algorithm, models = make_algorithm(self.config, self._facts(), self.privacy.preparer(self.roster))
            self.server = ServerRuntime(self.config, self.privacy.wrap(algorithm), models)
            self.privacy.plan(self.roster, self.server, models)
            try:
                check_private_deployment(self.config, self.server.algorithm, models, sorted(self.privacy.sites))
            except ConfigError as exc:
                raise ServerConfigError(str(exc)) from None
        return self.server

    def _facts(self) -> ModelFacts:
        if self.facts is None:
            raise FederationError("no site has described its data yet, so the models cannot be built")
        return self.facts

    def _header(self, site: str) -> codec.RunHeader:
        return codec.RunHeader(run_key=self.run_key, config=self.config, base_round=self.last_accepted.get(site, -1),
                               dp_ready=bool(self.privacy.dp_ready))

    def _round_bound(self) -> Bound:
        """How long a train or evaluate phase waits for a site (:class:`~fedfew_med.flower.waits.Bound`)."""
        return Bound.for_round(site_timeout_s=self.config.faults.site_timeout_s, round_timeout=self.settings.round_timeout)

    def _message(self, content: RecordDict, site_or_node: str | int, kind: str, *, group: str) -> Message:
        node = self.node_of[site_or_node] if isinstance(site_or_node, str) else site_or_node
        timeout = self.settings.query_timeout if kind == MessageType.QUERY else self._round_bound().seconds
        return Message(content, node, kind, ttl=timeout + _TTL_SLACK, group_id=group)

    def _exchange(self, messages: Mapping[Any, Message], *, bound: Bound,
                  timeout_words: Callable[[Any], str]) -> tuple[dict[Any, Message], dict[Any, str]]:
        """Push ``messages`` and wait for their replies (:func:`fedfew_med.flower.waits.collect`): never past ``bound``,
        and not for a site whose SuperNode is gone."""
        if not messages:
            return {}, {}
        keys = list(messages)
        ids = list(self.grid.push_messages([messages[k] for k in keys]))
        ids += [""] * (len(keys) - len(ids))
        pushed: dict[str, tuple[Any, int]] = {}
        errors: dict[Any, str] = {}
        for key, message_id in zip(keys, ids, strict=True):
            if message_id:
                pushed[message_id] = (key, int(messages[key].metadata.dst_node_id))
            else:
                errors[key] = "MessageRefused: the SuperLink did not accept the message"
        answers, failures = collect(self.grid, pushed, bound=bound, poll_interval=self.settings.poll_interval,
                                    describe=describe_error, timeout_words=timeout_words)
        errors.update(failures)
        return answers, errors

    def _private(self) -> bool:
        """Whether the run has DP sites or server-side DP (its ledgers then go into the chain)."""
        return bool(self.privacy.sites) or isinstance(self._server().algorithm, ServerDP)

    def _open_chain(self) -> LedgerChain | None:
        """The run's ``privacy_ledger.jsonl`` when it has (or had, by its checkpoint) privacy spending, else None.

        A new run whose DP is asked for only by the sites' own files opens it after the first round instead.
        """
        cfg, run_dir = self.config, self.settings.run_dir
        latest = checkpoint.latest_round(run_dir) if run_dir.exists() else None
        private = bool(cfg.privacy or cfg.server_privacy) or (run_dir / CHAIN_FILE).exists()
        if self.settings.resume and latest is not None and not private:  # its state alone; prepare() loads the tensors
            prior = (checkpoint.latest_state(run_dir) or {}).get("privacy") or {}
            private = bool(prior.get("sites")) or prior.get("server") is not None
        if not private:
            return None
        try:
            return open_chain(run_dir, config_digest=cfg.digest(), resume=self.settings.resume, checkpoint_round=latest)
        except LedgerStateError as exc:
            raise rundir.RunDirError(str(exc)) from None

    def _state(self) -> dict[str, Any]:
        """The JSON state saved with every checkpoint."""
        return {
            "config_digest": self.config.digest(),
            "run_key": self.run_key,
            "facts": dict(self._facts().__dict__),
            "sites": {s: c.to_json() for s, c in sorted(self.roster.items())},
            "last_accepted": dict(sorted(self.last_accepted.items())),
            "privacy": self.privacy.state_dict(self._server().algorithm),  # every DP ledger as last reported
            "algorithm": self._server().algorithm.server_state(),  # e.g. FedFew's idle counts
            "transport": [dict(entry) for entry in self.launches],  # each start's transport facts (transport.py)
            "released_losses": released_state(self.released),  # the DP sites' last released K losses
        }

    def _restore(self, ckpt: checkpoint.Checkpoint) -> None:
        st = ckpt.state
        missing = [k for k in ("run_key", "facts", "sites", "last_accepted") if k not in st]
        if missing:
            raise rundir.RunDirError(
                f"{self.settings.run_dir}: the checkpoint lacks {missing}; was it written by `fedfew-med simulate`? "
                "A simulation cannot be resumed on Flower"
            )
        self.run_key = str(st["run_key"])
        self.facts = ModelFacts(**st["facts"])
        self.roster = {s: codec.SiteCard.from_json(s, c) for s, c in st["sites"].items()}
        self.last_accepted = {s: int(r) for s, r in st["last_accepted"].items()}
        self.launches = [dict(entry) for entry in st.get("transport", [])]
        self.released = load_released(st.get("released_losses"))
        algorithm, initial = make_algorithm(self.config, self.facts, self.privacy.restore_preparer(st.get("privacy")))
        self.server = ServerRuntime(self.config, self.privacy.wrap(algorithm), ckpt.server_models)
        try:  # spent budgets come back with the checkpoint; a restart never resets them
            self.privacy.restore(st.get("privacy"), self.roster, self.server, initial,
                                 where=f"{self.settings.run_dir}: round {ckpt.round}")
        except LedgerStateError as exc:
            raise rundir.RunDirError(str(exc)) from None
        try:
            self.server.algorithm.load_server_state(st.get("algorithm", {}))
        except ValueError as exc:
            raise rundir.RunDirError(f"{self.settings.run_dir}: round {ckpt.round}: {exc}") from None


def describe_error(code: int, reason: str) -> str:
    """A Flower error reply as ``"Kind: message"``, like the simulation's failure strings."""
    match = _CLIENT_EXCEPTION.match(reason.strip())
    if code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION and match:
        kind = match.group(1).rsplit(".", 1)[-1]
        if kind == "SiteFailure":  # fedfew_med.flower.site_errors: already "Kind: message", without the site's paths
            return str(match.group(2))
        return f"{kind}: {match.group(2)}"
    return f"{_ERROR_NAMES.get(code, f'FlowerError{code}')}: {reason}"

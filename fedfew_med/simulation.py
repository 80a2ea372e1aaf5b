"""The in-process federation: sites run one after another in one process.

``run(config, run_dir=...)`` drives any registered algorithm through its rounds
and returns a :class:`SimulationResult`. Every round it

1. samples the participants (fraction ``run.participation``, seeded by round),
2. sends each participant its models, runs the algorithm's site step on that
   site's own data, seeds and state, and validates the reply against the server's
   own models (keys, shapes, dtypes, finite values, ``[faults].max_update_norm``): a
   site that raises, runs past ``[faults].site_timeout_s`` or returns a malformed
   update is skipped for the round and recorded under ``failures``, and its state
   stays at its last accepted round,
3. aggregates, evaluates every site's *deployed* model on its held-out test split
   (one protocol for every method; a site whose evaluation raises is recorded under
   ``evaluation_failures``), appends a record to ``metrics.jsonl`` and checkpoints
   the whole state atomically.

``resume=True`` continues from the last completed round; the result is identical
to the bit to an uninterrupted run because every random stream is derived from
(seed, round, site, slot) rather than carried along. This holds for a process killed
at any moment (SIGKILL included, ``tests/reliability/test_kill_resume.py``): what it
half wrote is never read, and the run directory's lock dies with it.

Differential privacy is added by composition (:mod:`fedfew_med.dp.federation`): a site with
``[privacy]`` options trains through ``DPSiteWork`` on a DP-ready network, with one ledger for
the whole run that is saved in every checkpoint and restored on resume (a killed and resumed
run spends exactly what an uninterrupted one spends); ``privacy_ledger.jsonl``, a digest chain
over the ledgers written before each round's checkpoint (:mod:`fedfew_med.dp.chain`), makes a
resume refuse when a checkpoint or the chain was deleted, edited or rolled back. Before each round a site whose next
round would exceed its budget stops training (logged, and listed in the record's
``privacy_stopped``); it keeps receiving and evaluating models. Every record and the summary
carry a ``privacy`` entry per DP site (ε spent, δ, noise multiplier, clip norm, sample rate,
steps, accountant, mechanisms), and ``server_privacy`` under ``[server_privacy]``.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedfew_med import checkpoint, rundir
from fedfew_med.algorithms import Params, RoundInfo, SiteReply
from fedfew_med.algorithms.base import ServerStep
from fedfew_med.config import ConfigError, FederationConfig
from fedfew_med.data import SiteData, build_sites
from fedfew_med.deployment import check_private_deployment, load_released, released_state
from fedfew_med.devices import resolve_device
from fedfew_med.dp import federation as dp_federation
from fedfew_med.dp.chain import open_chain
from fedfew_med.dp.ledger import LedgerStateError
from fedfew_med.dp.server import ServerDP
from fedfew_med.dp.site import SitePrivacy
from fedfew_med.metrics import headline_metric, summarize
from fedfew_med.rundir import RunDirError
from fedfew_med.runtime import (
    ModelFacts,
    ServerRuntime,
    WorkFactory,
    local_runtimes,
    make_algorithm,
    params_nbytes,
    reply_nbytes,
    validate_reply,
)
from fedfew_med.site_pool import SitePool, check_workers
from fedfew_med.training import SiteState, SiteWork

log = logging.getLogger(__name__)


@dataclass
class Callbacks:
    """Hooks for progress display; all optional. The library itself never prints."""

    on_round_start: Callable[[int, Sequence[str]], None] | None = None
    on_site_done: Callable[[int, str], None] | None = None
    on_round_end: Callable[[dict[str, Any]], None] | None = None
    # loading the site files (half a minute for the demo): (message, steps done, steps in all)
    on_load: Callable[[str, int, int], None] | None = None
    # the deployed models' evaluation (a minute on the demo's last round): its start, then each site done
    on_evaluate_start: Callable[[int, Sequence[str]], None] | None = None
    on_site_evaluated: Callable[[int, str], None] | None = None


@dataclass
class SimulationResult:
    """What a finished (or resumed-and-finished) run produced."""

    run_dir: Path
    rounds_completed: int
    models: list[Params]
    summary: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)  # rounds run by this call


__all__ = ["Callbacks", "Federation", "RunDirError", "SiteBusy", "SiteTimeout", "SimulationResult", "run", "validate_reply"]


class SiteTimeout(RuntimeError):
    """A site did not finish its round within ``[faults].site_timeout_s``."""


class SiteBusy(RuntimeError):
    """A site is still running a round that timed out; it gets no new work until that ends."""


class _SiteCall:
    """One site round running in a worker thread; its outcome is read only if it ends in time.

    The thread works on a private copy of the network and of the site's state (see
    :meth:`fedfew_med.runtime.SiteRuntime.compute`), so a call that is abandoned after the time
    limit touches nothing the main thread or another site uses, and its late result, kept only
    in this object, is never read.
    """

    def __init__(self, site: str, round_idx: int) -> None:
        self.site = site
        self.round = round_idx
        self.done = threading.Event()
        self.result: tuple[SiteReply, SiteState] | None = None
        self.error: BaseException | None = None

    def start(self, work: Callable[[], tuple[SiteReply, SiteState]]) -> None:
        def target() -> None:
            try:
                self.result = work()
            except BaseException as exc:  # handed to the waiting thread, or dropped with a late call
                self.error = exc
            finally:
                self.done.set()

        # daemon: a site that never returns must not keep the process alive at exit
        threading.Thread(target=target, name=f"fedfew-site-{self.site}-round-{self.round}", daemon=True).start()


class Federation:
    """One server and many sites in this process (no file I/O).

    Sites with privacy options (see :mod:`fedfew_med.dp.federation`) get a DP-ready network,
    a calibrated plan and a ledger (:attr:`privacy`), and train through ``DPSiteWork``;
    ``[server_privacy]`` wraps the algorithm in ``ServerDP``.
    """

    def __init__(self, config: FederationConfig, sites: Sequence[SiteData], work_factory: WorkFactory = SiteWork) -> None:
        self.config = config
        facts = ModelFacts.common(sites)
        self.task = facts.task
        prepare = dp_federation.network_preparer(config, sites)
        self.dp_ready = prepare is not None  # every network is the DP-ready rewrite (a site trains with DP)
        algorithm, models = make_algorithm(config, facts, prepare)  # also checks [run].metric against the task
        self.metric = headline_metric(self.task, config.run.metric)
        algorithm = dp_federation.with_server_dp(algorithm, config)
        self.server = ServerRuntime(config, algorithm, models)
        self.sites = local_runtimes(config, sites, algorithm, work_factory, prepare)
        first = next(iter(self.sites.values()))
        buffers = [n for n, _ in first.network.named_buffers()]
        if config.training.one_pass and buffers:
            raise ConfigError(f"{config.source}: [training].one_pass needs a network without buffers, but [model].name "
                              f"{config.model.name!r} has {len(buffers)} ({buffers[0]}...): running statistics cannot be "
                              "shared by the copies of one pass; set one_pass = false or use a norm without statistics")
        self.privacy: dict[str, SitePrivacy] = dp_federation.plan_sites(
            config, sites, algorithm=algorithm, models=models, network=first.network,
            participants=self.participants, round_info=self.round_info,
        )
        for name, site_privacy in self.privacy.items():
            self.sites[name].work_factory = site_privacy.work_factory  # DP by composition: the site's round trains privately
        check_private_deployment(config, algorithm, models, sorted(self.privacy))
        # The K losses each DP site released (charged) in its last training round: its evaluation ranks the models
        # by these, never by fresh losses on its records (fedfew_med.deployment). Saved with every checkpoint.
        self.released: dict[str, list[float]] = {}
        self._pending: dict[str, _SiteCall] = {}  # site rounds that timed out and may still be running
        self.pool: SitePool | None = None  # set by start_workers: sites computed in worker processes

    def start_workers(self, workers: int) -> None:
        """Compute the sites' rounds and evaluations in ``workers`` forked processes (same numbers; see :mod:`fedfew_med.site_pool`)."""
        check_workers(self.config, workers, private_sites=sorted(self.privacy))
        if workers > 1:
            self.pool = SitePool(self.sites, workers, threads=self.config.run.threads or torch.get_num_threads())

    def close(self) -> None:
        """Stop the worker processes, if any."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    @property
    def server_dp(self) -> ServerDP | None:
        """The ServerDP wrapper of the algorithm, if server-side DP is on."""
        alg = self.server.algorithm
        return alg if isinstance(alg, ServerDP) else None

    def trainers(self, round_idx: int, participants: Sequence[str]) -> tuple[list[str], list[str]]:
        """``participants`` split into the sites that train this round and those out of privacy budget."""
        trainers, stopped = [], []
        for site in participants:
            p = self.privacy.get(site)
            if p is not None and p.stopped:  # stopped for good: its ledger and plan no longer change
                stopped.append(site)
                continue
            if p is None or p.can_train(round_idx):
                trainers.append(site)
                continue
            stopped.append(site)
            after = p.ledger.epsilon_after(p.round_mechanisms(round_idx))
            log.warning("round %d: site %s stops training: its next round would take ε from %.4f to %.4f, past its "
                        "budget ε = %g (δ = %g); it keeps receiving and evaluating models",
                        round_idx, site, p.ledger.epsilon(), after, p.options.epsilon, p.options.delta)
        return trainers, stopped

    def privacy_records(self, round_idx: int) -> dict[str, dict[str, Any]]:
        """Every DP site's privacy report after ``round_idx`` (JSON-able)."""
        return {name: p.report(round_idx) for name, p in sorted(self.privacy.items())}

    def server_privacy_record(self) -> dict[str, Any] | None:
        """The server ledger's report under ServerDP, else None."""
        sdp = self.server_dp
        if sdp is None:
            return None
        return dp_federation.server_report(sdp)

    def privacy_state(self) -> dict[str, Any]:
        """JSON-able ledgers of the run, for the checkpoint."""
        return dp_federation.privacy_state(self.privacy, self.server.algorithm)

    def load_privacy_state(self, state: dict[str, Any] | None, *, where: str) -> None:
        """Restore the ledgers saved by :meth:`privacy_state` (spent ε is never reset)."""
        dp_federation.load_privacy_state(state, self.privacy, self.server.algorithm, where=where)

    @property
    def models(self) -> list[Params]:
        return self.server.models

    def participants(self, round_idx: int) -> list[str]:
        """Sites sampled for ``round_idx``."""
        return self.server.participants(round_idx, list(self.sites))

    def round_info(self, round_idx: int, participants: Sequence[str]) -> RoundInfo:
        """The broadcast of ``round_idx`` to ``participants``."""
        return self.server.round_info(round_idx, {s: self.sites[s].data.size("train") for s in participants})

    def site_step(self, site: str, info: RoundInfo) -> tuple[SiteReply, dict[str, int]]:
        """Send ``site`` its models, run its round, validate the reply, and count the traffic.

        The round is bounded by ``[faults].site_timeout_s`` when it is set (:meth:`_bounded`).
        The reply is checked against the server's own models (keys, shapes, dtypes, finite values,
        ``[faults].max_update_norm``) before it can reach the aggregation; the site's state moves
        on only if the reply is accepted.

        Raises
        ------
        Exception
            Whatever the site raised; :class:`SiteTimeout` or :class:`SiteBusy`; ValueError for a
            malformed reply. The round loop records it and goes on without the site.
        """
        runtime = self.sites[site]
        sent = self.server.models_for(site, info)
        timeout = self.config.faults.site_timeout_s
        reply, state = self._bounded(site, info, sent, timeout) if timeout > 0 else runtime.compute(info, sent)
        return self._accept(site, sent, reply, state)

    def _accept(self, site: str, sent: Mapping[int, Params], reply: SiteReply, state: SiteState) -> tuple[SiteReply, dict[str, int]]:
        """Validate ``site``'s reply against the server's models, commit its state, count the traffic."""
        reference = {k: self.server.models[k] for k in sent}  # the server's copies: the site may have changed its own
        validate_reply(reply, reference, self.server.algorithm.num_models, max_update_norm=self.config.faults.max_update_norm)
        self.sites[site].commit(state)
        return reply, {"sent": sum(params_nbytes(p) for p in sent.values()), "received": reply_nbytes(reply)}

    def site_steps(self, sites: Sequence[str], info: RoundInfo) -> Iterator[tuple[str, tuple[SiteReply, dict[str, int]] | Exception]]:
        """:meth:`site_step` of every site in ``sites``, in that order: ``(site, (reply, traffic) or the exception)``.

        With workers (:meth:`start_workers`) up to N sites compute at once, and their results are
        still validated, committed and handed on in the order of ``sites``.
        """
        if self.pool is None:
            for site in sites:
                try:
                    outcome: tuple[SiteReply, dict[str, int]] | Exception = self.site_step(site, info)
                except Exception as exc:  # the round loop records it and goes on without the site
                    outcome = exc
                yield site, outcome
            return
        sent: dict[str, dict[int, Params]] = {}

        def jobs() -> Iterator[tuple[str, RoundInfo, Mapping[int, Params], SiteState]]:
            for site in sites:
                sent[site] = self.server.models_for(site, info)
                yield site, info, sent[site], self.sites[site].state

        for site, result in self.pool.train(jobs()):
            models = sent.pop(site)
            accepted: tuple[SiteReply, dict[str, int]] | Exception
            if isinstance(result, Exception):
                accepted = result
            else:
                try:
                    accepted = self._accept(site, models, *result)
                except Exception as exc:  # a malformed reply: the site's failure, as in site_step
                    accepted = exc
            yield site, accepted

    def _bounded(self, site: str, info: RoundInfo, sent: Mapping[int, Params], timeout: float) -> tuple[SiteReply, SiteState]:
        """``site``'s round in a worker thread, waited for at most ``timeout`` seconds.

        Python cannot stop a thread: a call that times out is left to finish on its own (on its
        private network and state copy) and the site is skipped (:class:`SiteBusy`) until it has;
        its result is then dropped. So a late reply is never aggregated, the site's state stays at
        its last accepted round, and the site's data is never used by two threads at once.
        """
        pending = self._pending.get(site)
        if pending is not None:
            if not pending.done.is_set():
                raise SiteBusy(f"site {site!r} is still running its round-{pending.round} step, which timed out; "
                               "it gets no new work until that ends")
            del self._pending[site]
            log.info("round %d: site %s finished its timed-out round %d late; that result was discarded", info.round, site, pending.round)
        runtime = self.sites[site]
        network = copy.deepcopy(runtime.network)  # private scratch space: other sites keep using the shared one
        call = _SiteCall(site, info.round)
        call.start(lambda: runtime.compute(info, sent, network=network))
        if not call.done.wait(timeout):
            self._pending[site] = call
            raise SiteTimeout(f"site {site!r} did not finish round {info.round} within [faults].site_timeout_s = {timeout:g} s; "
                              "its late reply will be discarded")
        if call.error is not None:
            raise call.error
        assert call.result is not None  # done without an error means a result
        return call.result

    def evaluate(self, round_idx: int, on_site: Callable[[int, str], None] | None = None,
                 ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """Every site's deployed model on its test split, and why each site that could not be evaluated failed.

        A site whose evaluation raises (its files went bad mid-run, say) is left out of this
        round's metrics and named in the second dict; the federation goes on. ``on_site`` is
        called with the round and the site as each site's evaluation comes back.
        """
        evaluation: dict[str, dict[str, Any]] = {}
        failures: dict[str, str] = {}
        if self.pool is not None:
            jobs = ((name, self.server.models, round_idx, self.sites[name].state) for name in sorted(self.sites))
            outcomes: Iterator[tuple[str, dict[str, Any] | Exception]] = self.pool.evaluate(jobs)
        else:
            outcomes = ((name, self._evaluate_site(name, round_idx)) for name in sorted(self.sites))
        for name, outcome in outcomes:
            if isinstance(outcome, Exception):  # a site that cannot evaluate must not crash the federation
                failures[name] = f"{type(outcome).__name__}: {outcome}"
                log.warning("round %d: site %s not evaluated: %s", round_idx, name, failures[name])
            else:
                evaluation[name] = outcome
            if on_site:
                on_site(round_idx, name)
        return evaluation, failures

    def _evaluate_site(self, name: str, round_idx: int) -> dict[str, Any] | Exception:
        try:
            return self.sites[name].evaluate(self.server.models, round_idx, private=name in self.privacy,
                                             released=self.released.get(name))
        except Exception as exc:
            return exc


def summarize_run(fed: Federation, records: Sequence[dict[str, Any]], evaluation: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The final summary (:func:`fedfew_med.rundir.summarize_run`) of ``fed``'s run."""
    return rundir.summarize_run(
        config=fed.config,
        task=fed.task,
        num_models=fed.server.algorithm.num_models,
        sites={s: {"n_train": r.data.size("train"), "protocol": r.data.metadata.get("protocol")} for s, r in fed.sites.items()},
        records=records,
        evaluation=evaluation,
        models=fed.models,
        dp_ready=fed.dp_ready,
        features=next(iter(fed.sites.values())).data.metadata.get("features", ()),  # every site's, aligned by name
    )


def _no_update(fed: Federation) -> ServerStep:
    """The server step of a round in which no site could train: the models stay as they are."""
    return ServerStep(models=fed.models, log={"skipped": "no participant could train (privacy budgets spent)"})


def run(
    config: FederationConfig,
    *,
    run_dir: str | Path,
    sites: Sequence[SiteData] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    callbacks: Callbacks | None = None,
    workers: int = 1,
) -> SimulationResult:
    """Run (or resume) a federation and return its result.

    The run directory is locked for the whole call (:func:`fedfew_med.rundir.locked`): a second
    process on the same directory gets a :class:`RunDirError`.

    Parameters
    ----------
    config
        The federation config.
    run_dir
        Where the resolved config, ``metrics.jsonl``, checkpoints and ``summary.json`` go.
    sites
        The sites' data; built from ``config.data`` when omitted.
    resume
        Continue from the last completed round in ``run_dir``.
    overwrite
        Replace an existing run in ``run_dir`` (ignored with ``resume``).
    stop_after
        Stop after this many rounds in this call (for tests and scheduled runs); the run can be resumed.
    callbacks
        Progress hooks.
    workers
        Processes computing the sites (:mod:`fedfew_med.site_pool`); the result is the same to the
        bit as with 1 at the same torch threads per process.
    """
    try:  # a GPU that is not there is the config's error, not every site's in every round
        resolve_device(config.training.device)
    except ValueError as exc:
        raise ConfigError(f"{config.source}: {exc}") from None
    with rundir.locked(Path(run_dir)):
        return _run(config, run_dir=Path(run_dir), sites=sites, resume=resume, overwrite=overwrite,
                    stop_after=stop_after, callbacks=callbacks, workers=workers)


def _run(
    config: FederationConfig,
    *,
    run_dir: Path,
    sites: Sequence[SiteData] | None,
    resume: bool,
    overwrite: bool,
    stop_after: int | None,
    callbacks: Callbacks | None,
    workers: int,
) -> SimulationResult:
    """:func:`run` under the run directory's lock."""
    cb = callbacks or Callbacks()
    fed = Federation(config, sites if sites is not None else build_sites(config.data, source=config.source, progress=cb.on_load))
    check_workers(config, workers, private_sites=sorted(fed.privacy))  # before the run directory is touched
    chain = None  # privacy_ledger.jsonl (fedfew_med.dp.chain): checked before open_run_dir changes anything
    if fed.privacy or fed.server_dp is not None:
        try:
            chain = open_chain(run_dir, config_digest=config.digest(), resume=resume, checkpoint_round=checkpoint.latest_round(run_dir))
        except LedgerStateError as exc:
            raise RunDirError(str(exc)) from None
    ckpt = rundir.open_run_dir(run_dir, config, resume=resume, overwrite=overwrite)
    start = 0
    history: list[dict[str, Any]] = []
    if ckpt is not None:
        fed.server.models = ckpt.server_models
        for name, site_runtime in fed.sites.items():
            site_runtime.state = ckpt.sites.get(name, SiteState())
        try:  # spent privacy budget comes back with the checkpoint; a restart never resets it
            fed.load_privacy_state(ckpt.state.get("privacy"), where=f"{run_dir}: round {ckpt.round}")
            if chain is not None:  # the ledgers must be those the chain recorded for this round (no rollback)
                chain.verify_checkpoint(ckpt.round, ckpt.state.get("privacy"), where=f"{run_dir}: round {ckpt.round}")
        except LedgerStateError as exc:
            raise RunDirError(str(exc)) from None
        fed.released = load_released(ckpt.state.get("released_losses"))
        try:  # e.g. FedFew's idle counts: a resumed run re-seeds in the same round as an uninterrupted one
            fed.server.algorithm.load_server_state(ckpt.state.get("algorithm", {}))
        except ValueError as exc:
            raise RunDirError(f"{run_dir}: round {ckpt.round}: {exc}") from None
        start = ckpt.round + 1
        history = checkpoint.truncate_records(run_dir / "metrics.jsonl", ckpt.round)
        log.info("resuming %s after round %d", run_dir, ckpt.round)
    end = config.run.rounds if stop_after is None else min(config.run.rounds, start + stop_after)
    records: list[dict[str, Any]] = []
    evaluation: dict[str, dict[str, Any]] = {}
    fed.start_workers(workers)
    try:
        for r in range(start, end):
            t0 = time.perf_counter()
            participants = fed.participants(r)
            trainers, privacy_stopped = fed.trainers(r, participants)  # a site out of privacy budget does not train
            info = fed.round_info(r, trainers or participants)
            if cb.on_round_start:
                cb.on_round_start(r, participants)
            aggregation = fed.server.begin_aggregation(info)  # replies are folded in as they arrive
            site_losses: dict[str, list[float]] = {}
            site_info: dict[str, dict[str, Any]] = {}
            traffic: dict[str, dict[str, int]] = {}
            failures: dict[str, str] = {}
            for site, outcome in fed.site_steps(trainers, info):
                if isinstance(outcome, Exception):  # a crashed site must not crash the federation
                    failures[site] = f"{type(outcome).__name__}: {outcome}"
                    log.warning("round %d: site %s skipped: %s", r, site, failures[site])
                else:
                    reply, traffic[site] = outcome
                    aggregation.add(site, reply)
                    site_losses[site], site_info[site] = list(reply.losses), dict(reply.info)
                    if site in fed.privacy and reply.losses:
                        fed.released[site] = list(reply.losses)
                if cb.on_site_done:
                    cb.on_site_done(r, site)
            step = fed.server.finish(aggregation) if trainers else _no_update(fed)
            last = r == config.run.rounds - 1
            eval_failures: dict[str, str] = {}
            if last or r % config.run.eval_every == 0 or r == end - 1:
                if cb.on_evaluate_start:
                    cb.on_evaluate_start(r, sorted(fed.sites))
                evaluation, eval_failures = fed.evaluate(r, cb.on_site_evaluated)
            record = {
                "round": r,
                "participants": participants,
                "failures": failures,
                "server": step.log,
                "site_losses": site_losses,
                "site_info": site_info,
                "assignments": {s: e["model"] for s, e in evaluation.items()},
                "metrics": {s: e["metrics"] for s, e in evaluation.items()},
                "summary": summarize({s: e["metrics"][fed.metric] for s, e in evaluation.items()}),
                "bytes": traffic,
                "seconds": round(time.perf_counter() - t0, 4),
            }
            if eval_failures:  # as the Flower coordinator's records
                record["evaluation_failures"] = eval_failures
            if fed.privacy:
                record["privacy"] = fed.privacy_records(r)
                record["privacy_stopped"] = privacy_stopped
            server_privacy = fed.server_privacy_record()
            if server_privacy is not None:
                record["server_privacy"] = server_privacy
            if chain is not None:  # the round's spending is on disk before its record and checkpoint
                try:
                    chain.append(r, fed.privacy_state())
                except LedgerStateError as exc:
                    raise RunDirError(str(exc)) from None
            checkpoint.append_record(run_dir / "metrics.jsonl", record)  # before the checkpoint: a completed round always has its record
            site_states = {name: rt.state for name, rt in fed.sites.items()}
            run_state: dict[str, Any] = {"config_digest": config.digest(), "algorithm": fed.server.algorithm.server_state()}
            if fed.privacy or fed.server_dp is not None:
                run_state["privacy"] = fed.privacy_state()  # every site's ledger, with every checkpoint
            if fed.privacy:
                run_state["released_losses"] = released_state(fed.released)
            checkpoint.save(run_dir, r, server_models=fed.models, sites=site_states, state=run_state)
            records.append(record)
            if cb.on_round_end:
                cb.on_round_end(record)
    finally:
        fed.close()
    latest = checkpoint.latest_round(run_dir)
    completed = 0 if latest is None else latest + 1
    if not evaluation:
        evaluation, _ = fed.evaluate(max(completed - 1, 0))
    summary = summarize_run(fed, history + records, evaluation)
    summary["finished"] = completed >= config.run.rounds
    if fed.privacy:
        summary["privacy"] = fed.privacy_records(max(completed - 1, 0))
    server_privacy = fed.server_privacy_record()
    if server_privacy is not None:
        summary["server_privacy"] = server_privacy
    checkpoint.write_final(run_dir, fed.models, summary)
    return SimulationResult(run_dir=run_dir, rounds_completed=completed, models=fed.models, summary=summary, records=records)

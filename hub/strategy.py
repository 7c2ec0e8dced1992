"""LoRAFedAvg: Flower's FedAvg, aggregating LoRA adapter tensors only, reply by reply.

Flower's FedAvg refuses a whole round when one reply is inconsistent; on a fleet of arms one
misbehaving node must not cost everyone the round. Here every reply is validated on its own
(names, shapes, dtypes, finite values, example count; for FFA-LoRA an unchanged A) and a bad
reply is dropped with a log line naming the agent, while the rest are aggregated robustly by the
pure functions of ``zk0.hub.robust`` (an update far from the fleet's median update is dropped,
one too large clipped, an inflated example count capped, each with a log line naming the agent)
and ``zk0.hub.aggregation``, then, if the run asks for one, a server optimizer
(FedAvgM, FedAdam: ``zk0.hub.server_optimizer``) steps from the round's starting adapter towards
that aggregate. Should aggregating still fail (any error of those pure functions), the round
keeps the previous global adapter with a logged reason and the run goes on. The strategy also
keeps what the hub reports per round: bytes sent and received, its timings, dropped, skipped
(an arm that stayed busy: ``zk0.shared.agent_status.skip_of``) and clipped agents, and each
agent's evaluation MSE and closed-loop success keyed by agent id.

Each evaluate message asks for that round's closed-loop episodes (``success_episodes``, a
function of the round). A reply's success counts are bounded on their own: ints with
0 <= successes <= episodes <= asked, or the success part is ignored with a warning naming the
agent while its MSE still counts (a buggy or hostile arm must not claim 12/10).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TypeGuard

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from loguru import logger

from zk0.hub.aggregation import Arrays, ClientUpdate, Mode, ffa_violation, validate_update
from zk0.hub.robust import AggregationError, RobustSettings, robust_aggregate
from zk0.hub.server_optimizer import OptimizerSettings, OptimizerState
from zk0.hub.server_optimizer import step as server_step
from zk0.hub.update_rows import ReplyRows
from zk0.shared.adapter_wire import AdapterLayout, WireError, pack
from zk0.shared.agent_status import skip_of
from zk0.shared.artifact import as_stored
from zk0.shared.federation import (
    AGENT_ID,
    ARRAYS_KEY,
    CLIENTAPP_START_SECONDS,
    EVAL_MSE,
    HANDOVER_SECONDS,
    META_KEY,
    METRICS_KEY,
    SUCCESS_COUNT,
    SUCCESS_EPISODES,
    SUCCESS_EPISODES_ASKED,
    TASK_SECONDS,
    TRAIN_SECONDS,
    RunSettings,
)
from zk0.shared.success import SuccessRate


def to_numpy(record: ArrayRecord) -> Arrays:
    """The adapter Flower keeps between rounds (one Array per tensor, named) as numpy; in
    messages it travels packed (``zk0.shared.adapter_wire``)."""
    return {name: array.numpy() for name, array in record.items()}


def to_record(arrays: Arrays) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def agent_of(message: Message) -> str:
    meta = message.content.config_records.get(META_KEY) if not message.has_error() else None
    if meta is not None and isinstance(meta.get(AGENT_ID), str):
        return str(meta[AGENT_ID])
    return f"node-{message.metadata.src_node_id}"


@dataclass
class RoundReport:
    bytes_sent: int = 0
    bytes_received: int = 0
    #: ``time.perf_counter()`` when the training messages went out (None: no training yet).
    train_started: float | None = None
    #: From sending the training messages to having all replies (Flower's part included).
    train_wall_s: float = 0.0
    #: The slowest accepted client's own training time: the rest of train_wall_s is overhead.
    slowest_train_s: float = 0.0
    #: Where that overhead went, as the accepted clients report it (the largest of each, each
    #: bounded by train_wall_s): the whole task with its model set-up, the ClientApp process's
    #: start, the hand-over to the agent's round worker and back (``zk0.shared.federation``).
    slowest_task_s: float = 0.0
    clientapp_start_s: float = 0.0
    handover_s: float = 0.0
    #: Robust aggregation and the server optimizer's step (None: nothing was aggregated).
    aggregation_s: float | None = None
    trained: list[str] = field(default_factory=list)
    #: Agents whose training reply did not count, and why (skipped agents are not here).
    dropped: dict[str, str] = field(default_factory=dict)
    #: Agents that declined the round, their arm kept busy, and why.
    skipped: dict[str, str] = field(default_factory=dict)
    #: Agents whose replies counted within bounds (update norm clipped, weight capped), and why.
    clipped: dict[str, str] = field(default_factory=dict)
    #: Why the round kept the previous global adapter although replies arrived (None: it did not).
    aggregation_failed: str | None = None
    eval_mse: dict[str, float] = field(default_factory=dict)
    eval_examples: dict[str, int] = field(default_factory=dict)
    #: Closed-loop episodes this round asked of each agent (0: none).
    success_asked: int = 0
    #: Accepted closed-loop results; agents that ran no episode are absent.
    success: dict[str, SuccessRate] = field(default_factory=dict)

    def elapsed_s(self) -> float | None:
        """Seconds since the training messages went out (None: the round trained nothing)."""
        return None if self.train_started is None else time.perf_counter() - self.train_started

    def add_timing(self, metrics: MetricRecord) -> None:
        """One accepted reply's self-reported seconds: kept where finite and within the round."""
        for key, name in _TIMINGS.items():
            value = metrics.get(key)
            if isinstance(value, float) and 0.0 <= value <= self.train_wall_s:
                setattr(self, name, max(getattr(self, name), value))


#: Reply metric -> the RoundReport field that keeps the largest.
_TIMINGS = {
    TRAIN_SECONDS: "slowest_train_s",
    TASK_SECONDS: "slowest_task_s",
    CLIENTAPP_START_SECONDS: "clientapp_start_s",
    HANDOVER_SECONDS: "handover_s",
}


def _no_episodes(server_round: int) -> int:
    return 0


def _is_count(value: object) -> TypeGuard[int]:
    # bool is an int in Python; a count is not a truth value.
    return isinstance(value, int) and not isinstance(value, bool)


def success_of(metrics: MetricRecord, asked: int) -> tuple[SuccessRate | None, str | None]:
    """(result, None), (None, None) where no episode ran, or (None, why it is refused)."""
    count, episodes = metrics.get(SUCCESS_COUNT), metrics.get(SUCCESS_EPISODES)
    if count is None and episodes is None:
        return None, None
    if not (_is_count(count) and _is_count(episodes)):
        return None, f"{SUCCESS_COUNT}/{SUCCESS_EPISODES} must both be integers"
    if not 0 <= count <= episodes <= asked:
        return None, f"{count}/{episodes} outside 0 <= successes <= episodes <= {asked} asked"
    return (SuccessRate.of(count, episodes) if episodes else None), None


class LoRAFedAvg(FedAvg):
    """FedAvg over adapter tensors, weighted by examples, tolerant of bad replies.

    ``aggregation`` picks the maths (``fedavg``, ``svd``, ``ffa``; see ``zk0.hub.aggregation``).
    ``optimizer`` (its ``server-*`` settings) and ``optimizer_state`` (where it continues from,
    e.g. after a hub restart) add a server optimizer; ``optimizer_state`` is the state after the
    last aggregated round, for the caller to save. None (or ``server-optimizer: none``): plain.
    ``success_episodes(round)``: closed-loop episodes each evaluation of that round asks for.
    ``robust``: the bounds of ``zk0.hub.robust`` (None: ``RunSettings``' defaults).
    ``accept(arrays)``: why a round's aggregate may not become the global adapter, or None
    (the hub's adapter bounds); refused, the round keeps the previous adapter.
    ``start_from(round)``: arrays a round trains from instead of the last aggregate, or None
    (the canary gate rejected that aggregate's version: ``zk0.hub.gate``).
    ``held_frames()``: agent id -> the frames its status last reported holding; a reply
    claiming to have trained on more is counted with that many (None: no statuses known).
    ``excluded``: agent id -> why its replies never count in this run (its statistics were
    dropped from the run's normalization: ``zk0.hub.fleet_stats``).
    ``as_run(round, arrays)``: what the arms run of a round's arrays, which its evaluation
    scores (default: them rounded to bfloat16, as stored).
    """

    def __init__(
        self,
        *,
        aggregation: Mode = "fedavg",
        optimizer: OptimizerSettings | None = None,
        optimizer_state: OptimizerState | None = None,
        success_episodes: Callable[[int], int] = _no_episodes,
        robust: RobustSettings | None = None,
        accept: Callable[[Arrays], str | None] | None = None,
        start_from: Callable[[int], Arrays | None] | None = None,
        held_frames: Callable[[], Mapping[str, int]] | None = None,
        excluded: Mapping[str, str] | None = None,
        as_run: Callable[[int, Arrays], Arrays] | None = None,
        **fedavg_options: object,
    ) -> None:
        super().__init__(**fedavg_options)  # type: ignore[arg-type]
        self.aggregation = aggregation
        self.robust: RobustSettings = robust if robust is not None else RunSettings()
        self.accept = accept
        self.start_from = start_from
        self.held_frames = held_frames
        self.excluded = dict(excluded or {})
        self.success_episodes = success_episodes
        self.as_run = as_run or (lambda _round, arrays: as_stored(arrays))
        self.optimizer: OptimizerSettings | None = None
        self.optimizer_state: OptimizerState | None = None
        if optimizer is not None and optimizer.server_optimizer != "none":
            self.optimizer = optimizer
            self.optimizer_state = optimizer_state or OptimizerState(optimizer.server_optimizer)
        self.reports: dict[int, RoundReport] = {}
        self._reference: dict[int, Arrays] = {}

    def report(self, server_round: int) -> RoundReport:
        return self.reports.setdefault(server_round, RoundReport())

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.start_from is not None and (instead := self.start_from(server_round)) is not None:
            arrays = to_record(instead)
        reference = self._reference[server_round] = to_numpy(arrays)
        wire = pack(reference)
        messages = list(super().configure_train(server_round, wire, config, grid))
        self.report(server_round).train_started = time.perf_counter()
        self.report(server_round).bytes_sent += wire.count_bytes() * len(messages)
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        asked = self.success_episodes(server_round)
        self.report(server_round).success_asked = asked
        # A copy: Flower hands the same record to every round (and to training).
        round_config = ConfigRecord({**config, SUCCESS_EPISODES_ASKED: asked})
        # What the arms run: the version as stored, not the hub's float32 master.
        stored = pack(self.as_run(server_round, to_numpy(arrays)))
        return super().configure_evaluate(server_round, stored, round_config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        reference = self._reference.pop(server_round)
        report = self.report(server_round)
        report.train_wall_s = report.elapsed_s() or 0.0
        accepted: list[RecordDict] = []
        updates: list[ClientUpdate] = []
        held = self.held_frames() if self.held_frames is not None else {}
        replies = list(replies)
        rows = ReplyRows(AdapterLayout.of(reference), len(replies))
        for message in replies:
            agent = agent_of(message)
            if message.has_error() and (skip := skip_of(message.error.reason)) is not None:
                agent, busy = skip  # its text names the agent: an error reply has no meta
                report.skipped[agent] = busy
                logger.warning("round {}: {} skipped the round: {}", server_round, agent, busy)
                continue
            reason, update = self._check_train_reply(message, agent, reference, rows)
            if update is not None and 0 < held.get(agent, 0) < update.num_examples:
                report.clipped[agent] = (
                    f"example count {update.num_examples} capped to the {held[agent]} frames "
                    "its status reports"
                )
                update = replace(update, num_examples=held[agent])
            if update is not None:
                report.bytes_received += message.content[ARRAYS_KEY].count_bytes()
            if reason is None and agent in report.trained:
                # One agent, one vote: a node claiming another's id must not count twice.
                reason = "a second reply under the same agent id"
            if reason is None and agent in self.excluded:
                reason = (
                    "its statistics were dropped from the run's normalization "
                    f"({self.excluded[agent]})"
                )
            if reason is not None or update is None:
                report.dropped[agent] = reason or "no update"
                logger.warning("round {}: dropped reply from {}: {}", server_round, agent, reason)
                continue
            accepted.append(message.content)
            updates.append(update)
            report.trained.append(agent)
            report.add_timing(message.content.metric_records[METRICS_KEY])
        if not updates:
            logger.error(
                "round {}: no valid replies; the global adapter stays as it was", server_round
            )
            return None, None
        try:
            started = time.perf_counter()
            result = robust_aggregate(self.aggregation, updates, reference, self.robust)
            merged, optimizer_state = result.arrays, self.optimizer_state
            if self.optimizer is not None and optimizer_state is not None:
                merged, optimizer_state = server_step(
                    reference, merged, optimizer_state, self.optimizer
                )
            report.aggregation_s = time.perf_counter() - started
            if self.accept is not None and (why := self.accept(merged)) is not None:
                raise AggregationError(f"the aggregate is out of bounds: {why}")
        # Whatever the maths raises (LinAlgError, overflow, a bug), one round's replies must
        # not end the run: the fleet keeps the adapter it has, and nothing is published.
        except Exception as error:
            report.aggregation_failed = f"{type(error).__name__}: {error}"
            report.trained.clear()
            logger.error(
                "round {}: aggregation failed, the global adapter stays as it was: {}",
                server_round,
                report.aggregation_failed,
            )
            return None, None
        self.optimizer_state = optimizer_state
        for agent, reason in result.rejected.items():
            report.dropped[agent] = reason
            report.trained.remove(agent)
            logger.warning("round {}: dropped reply from {}: {}", server_round, agent, reason)
        for agent, reason in result.clipped.items():
            report.clipped[agent] = "; ".join(filter(None, (report.clipped.get(agent), reason)))
            logger.warning("round {}: bounded reply from {}: {}", server_round, agent, reason)
        counted = [
            content
            for content, update in zip(accepted, updates, strict=True)
            if update.client not in result.rejected
        ]
        logger.info(
            "round {}: aggregated {} replies ({}{}), dropped {}, skipped {}, bounded {}",
            server_round,
            len(counted),
            self.aggregation,
            f", {self.optimizer_state.kind} step {self.optimizer_state.step}"
            if self.optimizer_state is not None
            else "",
            sorted(report.dropped) or "none",
            sorted(report.skipped) or "none",
            sorted(report.clipped) or "none",
        )
        return to_record(merged), aggregate_metricrecords(counted, self.weighted_by_key)

    def _check_train_reply(
        self, message: Message, agent: str, reference: Arrays, rows: ReplyRows
    ) -> tuple[str | None, ClientUpdate | None]:
        if message.has_error():
            return f"error reply: {message.error.reason}", None
        content = message.content
        if ARRAYS_KEY not in content.array_records or METRICS_KEY not in content.metric_records:
            return "reply lacks adapter arrays or metrics", None
        examples = content[METRICS_KEY].get(self.weighted_by_key)
        if not isinstance(examples, int):
            return f"'{self.weighted_by_key}' missing or not an integer", None
        try:  # read once, into the round's matrix
            row = rows.add(content.array_records[ARRAYS_KEY])
        except WireError as error:
            return error.reason, None
        update = ClientUpdate(agent, rows.arrays(row), examples, rows, row)
        reason = validate_update(update, reference)
        if reason is None and self.aggregation == "ffa":
            reason = ffa_violation(update, reference)
        return reason, update

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        report = self.report(server_round)
        accepted: list[RecordDict] = []
        for message in replies:
            agent = agent_of(message)
            metrics = MetricRecord()
            if not message.has_error():
                metrics = message.content.metric_records.get(METRICS_KEY) or metrics
            mse, examples = metrics.get(EVAL_MSE), metrics.get(self.weighted_by_key)
            if not isinstance(mse, float) or not np.isfinite(mse) or not isinstance(examples, int):
                reason = message.error.reason if message.has_error() else "no finite eval-mse"
                logger.warning(
                    "round {}: evaluation from {} dropped: {}", server_round, agent, reason
                )
                continue
            report.eval_mse[agent] = mse
            report.eval_examples[agent] = examples
            success, refused = success_of(metrics, report.success_asked)
            if refused is not None:
                logger.warning(
                    "round {}: success from {} ignored (its MSE counts): {}",
                    server_round,
                    agent,
                    refused,
                )
            elif success is not None:
                report.success[agent] = success
            # Example-weighted means of counts mean nothing: success is pooled below instead.
            mse_part = MetricRecord(
                {k: v for k, v in metrics.items() if k not in (SUCCESS_COUNT, SUCCESS_EPISODES)}
            )
            accepted.append(RecordDict({METRICS_KEY: mse_part}))
        if not accepted:
            return None
        aggregated = aggregate_metricrecords(accepted, self.weighted_by_key)
        if report.success:
            aggregated[SUCCESS_COUNT] = sum(r.successes for r in report.success.values())
            aggregated[SUCCESS_EPISODES] = sum(r.episodes for r in report.success.values())
        return aggregated

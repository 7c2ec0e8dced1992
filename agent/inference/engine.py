"""The inference engine: a control loop at the arm's rate, fed by a policy worker thread.

In the spirit of LeRobot's async inference (``lerobot.async_inference``), inside one process:

* the control loop ticks at the robot's fps on the monotonic clock; each tick it pops the next
  action from the ``ActionQueue`` and sends it, or, if the queue is empty, holds the arm (a
  *starved* tick, counted once the episode's first chunk has arrived);
* ``async`` mode: when the queue holds at most ``threshold x chunk`` actions (or is empty:
  must-go) and no chunk is being computed, the newest observation goes to the worker, which
  predicts the next chunk while the arm keeps moving; overlapping steps are merged with the
  configured aggregate, steps already executed are dropped;
* ``sync`` mode (for comparison): a chunk is requested only once the queue is empty, so the arm
  stands still for every chunk's latency: compute, execute, repeat.

The worker takes the active policy version from the ``AdapterSlot`` once per chunk, so a hot
swap lands between two chunks and the loop never waits for it. Every latency is measured on
``time.monotonic`` in this process: observation -> chunk ready, queue depth on every tick,
starved ticks. Each chunk's log line names the adapter version that computed it.

The version *in use* is the one that computed the engine's last chunk: ``on_version_in_use``
hears it whenever it changes. A version swapped in while no episode runs (offer, load or
rollback) is put to use at once by a *probe* chunk on the last policy frame the engine computed
a chunk for (the warm-up's at least), whose actions are dropped: the arm is never read for it
(another job may be recording with it), and the fleet sees a new version in use on an idle arm.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from loguru import logger

from zk0.agent.inference.action_queue import ActionQueue, timed_chunk
from zk0.agent.inference.backends import BackendSelector
from zk0.agent.inference.engine_config import EngineConfig
from zk0.agent.inference.frames import FrameLayout
from zk0.agent.inference.metrics import ChunkRecord, EpisodeResult, Mode
from zk0.agent.inference.realtime import RealTimeArm
from zk0.agent.inference.swap import AdapterSlot, PolicyRuntime, VersionInUse

clock = time.monotonic


@dataclass(frozen=True)
class _Probe:
    """A chunk computed only to put the active version to use; its actions are dropped."""

    frame: dict[str, Any]


@dataclass(frozen=True)
class _Request:
    token: int
    episode: int
    chunk: int
    obs_step: int
    observed_at: float
    observation: dict[str, Any]
    depth: int


class InferenceEngine:
    """Runs episodes on ``arm`` with the policy version ``slot`` holds, on ``backends``."""

    def __init__(
        self,
        arm: RealTimeArm,
        slot: AdapterSlot,
        backends: BackendSelector,
        layout: FrameLayout,
        task: str,
        config: EngineConfig | None = None,
        on_version_in_use: Callable[[int | None], None] | None = None,
    ) -> None:
        self.arm, self.slot, self.backends = arm, slot, backends
        self.layout, self.task = layout, task
        self.config = config or EngineConfig()
        policy_config = backends.policy.config
        self.chunk_size = min(
            self.config.actions_per_chunk or policy_config.n_action_steps, policy_config.chunk_size
        )
        self._noise_shape = (1, policy_config.chunk_size, policy_config.max_action_dim)
        self.queue = ActionQueue(self.config.aggregate)
        self._cond = threading.Condition()
        self._request: _Request | _Probe | None = None
        self._in_flight = False
        self._token = 0
        self._episode: EpisodeResult | None = None
        self._stopping = False
        self._stop_episode = threading.Event()
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._frame: dict[str, Any] | None = None  # the last policy frame a chunk was for
        self._in_use = VersionInUse()
        self._in_use.listen(on_version_in_use)
        slot.add_swap_listener(lambda runtime: self._probe_soon())

    # -- lifecycle and commands -------------------------------------------------------------------
    def start(self) -> InferenceEngine:
        self.slot.start()
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._work, name="policy-worker", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(60.0)
        self._thread = None
        self.slot.stop()

    def __enter__(self) -> InferenceEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def offer_adapter(self, version: int, path: Any, manifest: Any = None) -> None:
        """The distribution subscriber's ``on_new_version``: load off the control path, swap in."""
        self.slot.offer(version, path, manifest)

    def rollback(self) -> PolicyRuntime:
        return self.slot.rollback()

    def end_episode(self) -> None:
        """Ask the running episode to end after its current tick (thread-safe)."""
        self._stop_episode.set()

    def noise(self, episode: int, chunk: int) -> Any:
        """The flow-matching noise of chunk ``chunk`` of episode ``episode``: reproducible."""
        import torch

        rng = np.random.default_rng([self.config.seed, episode, chunk])
        return torch.from_numpy(rng.standard_normal(self._noise_shape).astype(np.float32))

    def predict(self, observation: dict[str, Any], noise: Any) -> tuple[Any, str, int | None]:
        """One chunk for a robot observation with the active version (outside episodes)."""
        runtime = self.slot.active
        frame = self.layout.policy_frame(observation, self.task)
        actions, backend = self.backends.predict(runtime, frame, noise)
        return actions, backend, runtime.version

    def warmup(self, observation: dict[str, Any]) -> None:
        """One untimed chunk, so that the first episode does not pay for lazy initialisation;
        its frame is kept for probe chunks and its version is the one in use."""
        self._probe(self.layout.policy_frame(observation, self.task))

    # -- the version in use -----------------------------------------------------------------------
    @property
    def version_in_use(self) -> int | None:
        """The version that computed the last chunk (None: the base, or no chunk yet)."""
        return self._in_use.version

    @property
    def on_version_in_use(self) -> Callable[[int | None], None] | None:
        return self._in_use.callback

    @on_version_in_use.setter
    def on_version_in_use(self, callback: Callable[[int | None], None] | None) -> None:
        """``callback`` hears the version in use now (once known) and whenever it changes."""
        self._in_use.listen(callback)

    def _probe_soon(self) -> None:
        """Put the active version to use on the kept frame unless an episode will (any thread)."""
        with self._cond:
            idle = self._episode is None and self._thread is not None and not self._stopping
            if idle and self._frame is not None:
                self._request = _Probe(self._frame)  # replaces a probe or a stale chunk
                self._in_flight = True
                self._cond.notify_all()

    def _probe(self, frame: dict[str, Any]) -> None:
        runtime = self.slot.active
        self.backends.predict(runtime, frame, self.noise(0, 0))
        self._frame = frame
        logger.info("probe chunk: adapter {} in use (no episode running)", runtime.label)
        self._in_use.report(runtime.version)

    # -- the control loop -------------------------------------------------------------------------
    def run_episode(
        self,
        index: int,
        horizon_steps: int,
        max_s: float | None = None,
        stop_on_success: bool = True,
        mode: Mode | None = None,
    ) -> EpisodeResult:
        """One closed-loop episode: until success, ``horizon_steps`` executed actions, ``max_s``
        seconds, or ``end_episode()``. ``mode`` overrides the configured mode for this episode."""
        if self._thread is None:
            raise RuntimeError("start() the engine first")
        mode = mode or self.config.mode
        period = self.arm.period_s
        max_s = max_s if max_s is not None else 3 * horizon_steps * period + 30.0
        self._wait_idle()
        self.queue.clear()
        self._stop_episode.clear()
        observation = self.arm.start_episode(index)
        started = clock()
        result = EpisodeResult(index, mode, period, started)
        with self._cond:
            self._token += 1
            self._episode = result
        try:
            self._loop(result, observation, horizon_steps, max_s, stop_on_success)
        finally:
            result.duration_s = clock() - started
            with self._cond:
                self._episode = None
                self._token += 1
        self._wait_idle()
        if self.slot.version != self._in_use.version:  # swapped in after the last chunk
            self._probe_soon()
        return result

    def _loop(
        self,
        result: EpisodeResult,
        observation: dict[str, Any],
        horizon_steps: int,
        max_s: float,
        stop_on_success: bool,
    ) -> None:
        period, started = result.period_s, result.started_at
        limit = 0.0 if result.mode == "sync" else self.config.threshold * self.chunk_size
        self._submit(result.index, 0, observation, started, depth=0)
        chunks_asked = 1
        deadline = started
        while True:
            remaining = deadline - clock()
            if remaining > 0:
                time.sleep(remaining)
            now = clock()
            late = now - deadline
            result.max_late_s = max(result.max_late_s, late)
            if late > period:  # the loop was held up: those ticks never happened
                result.missed_ticks += int(late // period)
                result.missed_at.append((now - started, int(late // period)))
                deadline = now
            self._raise_if_failed()
            depth = self.queue.depth()
            action = self.queue.pop()
            starved = False
            if action is not None:
                self.arm.act(self.layout.action(action.values))
                result.actions += 1
            else:
                self.arm.hold()
                starved = result.first_chunk_s is not None
                result.starved_ticks += starved
            result.ticks += 1
            result.trace_t.append(now - started)
            result.trace_depth.append(depth)
            result.trace_starved.append(starved)
            left = self.queue.depth()
            if left <= limit and not self._busy():
                self._submit(result.index, chunks_asked, self.arm.observe(), clock(), left)
                chunks_asked += 1
            result.success = self.arm.success()
            if (
                (stop_on_success and result.success)
                or result.actions >= horizon_steps
                or now - started >= max_s
                or self._stop_episode.is_set()
            ):
                return
            deadline += period

    def _busy(self) -> bool:
        with self._cond:
            return self._in_flight

    def _wait_idle(self, timeout_s: float = 120.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: not self._in_flight, timeout_s):
                raise TimeoutError(f"the policy worker is still busy after {timeout_s:.0f} s")

    def _submit(
        self, episode: int, chunk: int, observation: dict[str, Any], at: float, depth: int
    ) -> None:
        with self._cond:
            self._request = _Request(
                self._token, episode, chunk, self.queue.next_step, at, observation, depth
            )
            self._in_flight = True
            self._cond.notify_all()

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise RuntimeError(f"the policy worker failed: {failure}") from failure

    # -- the policy worker ------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or self._request is not None)
                if self._stopping:
                    return
                request, self._request = self._request, None
            assert request is not None
            if isinstance(request, _Probe):
                with logger.catch(message="the probe chunk failed"):  # it fails no episode
                    self._probe(request.frame)
            else:
                try:
                    self._compute(request)
                except Exception as error:
                    logger.exception(
                        "chunk {} of episode {} failed", request.chunk, request.episode
                    )
                    self._failure = error
            with self._cond:
                self._in_flight = self._request is not None  # a probe may have been queued
                self._cond.notify_all()

    def _compute(self, request: _Request) -> None:
        runtime = self.slot.active  # one version for the whole chunk
        began = clock()
        frame = self.layout.policy_frame(request.observation, self.task)
        actions, backend = self.backends.predict(
            runtime, frame, self.noise(request.episode, request.chunk)
        )
        self._frame = frame
        self._in_use.report(runtime.version)
        period = self.arm.period_s
        timed = timed_chunk(
            actions[: self.chunk_size],
            request.obs_step,
            request.observed_at + period,
            period,
            request.chunk,
            runtime.version,
        )
        with self._cond:
            episode = self._episode
            if request.token != self._token or episode is None:
                return  # the episode it was for has ended
            report = self.queue.merge(timed)
            ready = clock()
            record = ChunkRecord(
                request.episode,
                request.chunk,
                request.obs_step,
                request.observed_at,
                ready,
                ready - began,
                backend,
                runtime.version,
                request.depth == 0,
                request.depth,
                report.stale,
                report.merged,
                report.appended,
            )
            episode.chunks.append(record)
            if episode.first_chunk_s is None:
                episode.first_chunk_s = ready - episode.started_at
        logger.info(
            "chunk {}.{} adapter {} on {}: obs step {} latency {:.0f} ms (compute {:.0f} ms), "
            "queue {} -> {} (stale {}, merged {}){}",
            request.episode,
            request.chunk,
            runtime.label,
            backend,
            request.obs_step,
            record.latency_s * 1e3,
            record.compute_s * 1e3,
            request.depth,
            report.depth,
            report.stale,
            report.merged,
            " must-go" if record.must_go else "",
        )

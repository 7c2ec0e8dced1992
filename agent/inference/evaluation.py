"""Closed-loop evaluation on the (simulated) arm: episodes, metrics, the queue-depth plot.

``open_session`` builds everything an episode needs (robot in real-time mode, policy and
adapter, backends, engine) and ``evaluate`` runs episodes with it. An episode ends on success,
once the arm has executed the horizon's actions (``episode_time_s x fps``: the same amount of
policy-driven motion in every mode, so sync mode's waits show up as longer episodes), or at a
wall-clock cap.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger

from zk0.agent.inference.backends import BackendName, BackendSelector, InferencePolicy
from zk0.agent.inference.engine import InferenceEngine
from zk0.agent.inference.engine_config import EngineConfig
from zk0.agent.inference.frames import FrameLayout
from zk0.agent.inference.metrics import EpisodeResult, Mode
from zk0.agent.inference.realtime import RealTimeArm, realtime_config
from zk0.agent.inference.simulated import evaluation_scenes
from zk0.agent.inference.swap import AdapterSlot, DatasetStats
from zk0.shared.agent_control import TaskResult
from zk0.shared.config import RobotConfig
from zk0.shared.features import PolicyFeatures
from zk0.shared.normalization import Stats
from zk0.shared.success import SuccessRate

#: The committed base has no statistics file: it was pretrained with its episodes' statistics.
BASE_WITH_TASK_STATS = "tiny-sim-base"


def load_stats(path: Path) -> DatasetStats:
    """A ``normalization.json`` (as adapter artifacts carry) as LeRobot's ``dataset_stats``."""
    from zk0.shared.normalization import loads, to_lerobot

    return to_lerobot(loads(Path(path).read_bytes()))


def base_task_feature_stats(policy_config: Any) -> Stats:
    """The normalization ``tiny-sim-base`` was pretrained with: its training episodes' stats
    (``zk0 base build`` ships them with the base; recomputed from the episodes if missing)."""
    from zk0.agent.base_builder import BASE_STATS_FILE, RECIPE
    from zk0.agent.episode_cache import recorded
    from zk0.agent.training import dataset_stats, open_dataset, split_episodes
    from zk0.shared.normalization import loads
    from zk0.shared.policy_factory import COMMITTED_BASES
    from zk0.shared.sim_variants import BASE_VARIANT

    shipped = COMMITTED_BASES / BASE_WITH_TASK_STATS / BASE_STATS_FILE
    if shipped.is_file():
        return loads(shipped.read_bytes())
    root = recorded("base", BASE_VARIANT, RECIPE.episodes, RECIPE.episode_time_s)
    train, _ = split_episodes(RECIPE.episodes)
    return dataset_stats(open_dataset(root, policy_config, train))


def base_task_stats(policy_config: Any) -> DatasetStats:
    from zk0.shared.normalization import to_lerobot

    return to_lerobot(base_task_feature_stats(policy_config))


@dataclass
class Session:
    engine: InferenceEngine
    arm: RealTimeArm
    slot: AdapterSlot
    backends: BackendSelector
    robot_config: RobotConfig
    info: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def open_session(
    robot_config: RobotConfig,
    policy: str,
    *,
    adapter: Path | None = None,
    stats: DatasetStats | None = None,
    engine_config: EngineConfig | None = None,
    backend: BackendName = "torch",
    wait_for_onnx: bool = True,
    threads: int = 1,
    robot: Any | None = None,
) -> Iterator[Session]:
    """Connect the arm (real-time mode), load policy and adapter, start the engine.

    A daemon that owns the arm passes its ``robot``; the session connects it if needed and
    disconnects it when it closes.
    """
    from zk0.agent.inference.onnx_export import OnnxExport
    from zk0.agent.inference.onnx_graphs import signature_of
    from zk0.agent.robots import make_robot
    from zk0.shared.policy_factory import build_policy

    config = realtime_config(robot_config)
    features = PolicyFeatures.from_robot_config(config)
    loaded = build_policy(policy, features, device="cpu")
    if stats is None and adapter is None and policy == BASE_WITH_TASK_STATS:
        logger.info("normalization of {}: its pretraining episodes' statistics", policy)
        stats = base_task_stats(loaded.policy.config)
    slot = AdapterSlot(loaded, stats)
    steps = engine_config.denoising_steps if engine_config is not None else None
    # The slot took its weights; the inference policy runs the session's step count.
    inference = InferencePolicy(loaded.policy, copy_policy=False, denoising_steps=steps)
    if adapter is not None:
        slot.load(adapter)
    arm = RealTimeArm(make_robot(config) if robot is None else robot, config.fps)
    arm.connect()
    engine: InferenceEngine | None = None
    export: OnnxExport | None = None
    try:
        layout = FrameLayout.for_robot(arm.action_features, loaded.features)
        observation = arm.fresh_observation()
        layout.check(observation)
        if backend != "torch":
            batch = slot.active.preprocessor(layout.policy_frame(observation, config.task))
            signature = signature_of(inference.policy, batch)
            export = OnnxExport(loaded.base, loaded.features, signature)
        backends = BackendSelector(backend, inference, export, threads).start(wait=wait_for_onnx)
        engine = InferenceEngine(arm, slot, backends, layout, config.task, engine_config).start()
        engine.warmup(observation)
        info = {
            "policy": policy,
            "base_id": loaded.base.base_id,
            "adapter_version": slot.version,
            "backend": backend,
            "onnx_folder": str(export.folder) if export is not None else None,
            "fps": config.fps,
            "chunk_actions": engine.chunk_size,
            "engine": engine.config.model_dump(),
        }
        yield Session(engine, arm, slot, backends, config, info)
    finally:
        if engine is not None:
            engine.stop()
        else:
            slot.stop()
        if export is not None:
            export.cancel()
        arm.disconnect()


@dataclass
class EvalReport:
    episodes: list[EpisodeResult]
    info: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        episodes = self.episodes
        latencies = [c.latency_s for e in episodes for c in e.chunks]
        after_first = sum(e.ticks_after_first_chunk for e in episodes)
        starved = sum(e.starved_ticks for e in episodes)
        success = SuccessRate.of_outcomes(e.success for e in episodes)
        backends: dict[str, int] = {}
        for chunk in (c for e in episodes for c in e.chunks):
            backends[chunk.backend] = backends.get(chunk.backend, 0) + 1
        return {
            **self.info,
            "episodes": len(episodes),
            "success_rate": success.rate,
            "success": success.model_dump(),
            "mean_episode_s": float(np.mean([e.duration_s for e in episodes])),
            "chunk_latency_p50_s": _percentile(latencies, 50),
            "chunk_latency_p95_s": _percentile(latencies, 95),
            "starved_ticks": starved,
            "starved_fraction": starved / max(1, after_first),
            "idle_s": sum(e.idle_s for e in episodes),
            "mean_first_chunk_s": float(np.mean([e.first_chunk_s or 0.0 for e in episodes])),
            "missed_ticks": sum(e.missed_ticks for e in episodes),
            "chunks_by_backend": backends,
            "per_episode": [e.summary() for e in episodes],
            "queue_depth_trace": [
                {"t": [round(t, 4) for t in e.trace_t], "depth": e.trace_depth} for e in episodes
            ],
        }

    def task_result(
        self, adapter_version: int | None, labels: Sequence[bool | None] = ()
    ) -> TaskResult:
        """What the agent daemon reports of a ``run_task`` job (``zk0.shared.agent_control``).

        ``labels[i]`` is the operator's verdict on episode ``i`` (None: not labelled); an
        episode counts its label, else the simulator's verdict, else not at all.
        """
        s = self.summary()
        given = list(labels) + [None] * (len(self.episodes) - len(labels))
        success = SuccessRate.of_outcomes(
            label if label is not None else e.success
            for e, label in zip(self.episodes, given, strict=True)
        )
        return TaskResult(
            episodes=s["episodes"],
            successes=success.successes,
            success_rate=success.rate,
            success=success,
            adapter_version=adapter_version,
            mean_episode_s=s["mean_episode_s"],
            chunk_latency_p50_s=s["chunk_latency_p50_s"],
            chunk_latency_p95_s=s["chunk_latency_p95_s"],
            starved_fraction=s["starved_fraction"],
            missed_ticks=s["missed_ticks"],
        )

    def describe(self) -> str:
        s = self.summary()
        success = SuccessRate.model_validate(s["success"])
        rate = "unknown" if success.rate is None else success.describe()
        return (
            f"{s['episodes']} episodes {self.info.get('mode', '')} on "
            f"{'/'.join(s['chunks_by_backend']) or '-'}: success {rate}, "
            f"mean episode {s['mean_episode_s']:.2f} s, chunk latency "
            f"p50 {s['chunk_latency_p50_s'] * 1e3:.0f} ms "
            f"p95 {s['chunk_latency_p95_s'] * 1e3:.0f} ms, "
            f"starved {s['starved_fraction']:.1%} of ticks ({s['idle_s']:.2f} s idle)"
        )


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def evaluate(
    session: Session,
    episodes: int,
    horizon_s: float | None = None,
    mode: Mode | None = None,
    stop: threading.Event | None = None,
) -> EvalReport:
    """``episodes`` closed-loop episodes on the simulated arm's evaluation scenes (never a
    recorded episode's set-up; a real arm ignores the index); a set ``stop`` ends the series
    after the episode in progress."""
    config = session.robot_config
    mode = mode or session.engine.config.mode
    horizon_steps = round((horizon_s or config.episode_time_s) * config.fps)
    results = []
    for index in evaluation_scenes(episodes):
        if stop is not None and stop.is_set():
            break
        result = session.engine.run_episode(index, horizon_steps, mode=mode)
        logger.info(
            "episode {}: success {}, {:.2f} s, {} chunks, {} starved ticks",
            index,
            result.success,
            result.duration_s,
            len(result.chunks),
            result.starved_ticks,
        )
        results.append(result)
    info = {**session.info, "mode": mode, "horizon_steps": horizon_steps}
    return EvalReport(results, info)


def plot_queue_depth(report: EvalReport, path: Path) -> Path:
    """Queue depth per tick for each episode; starved ticks in red, chunk arrivals as ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    episodes = report.episodes
    figure, axes = plt.subplots(len(episodes), 1, figsize=(9, 2.2 * len(episodes)), squeeze=False)
    threshold = report.info.get("engine", {}).get("threshold", 0.5)
    chunk = report.info.get("chunk_actions")
    for axis, episode in zip(axes[:, 0], episodes, strict=True):
        t = np.asarray(episode.trace_t)
        depth = np.asarray(episode.trace_depth)
        axis.step(t, depth, where="post", lw=1.0, label="queue depth")
        starved = np.asarray(episode.trace_starved, dtype=bool)
        if starved.any():
            axis.plot(t[starved], depth[starved], "r.", ms=3, label="starved tick")
        for record in episode.chunks:
            axis.axvline(record.ready_at - episode.started_at, color="0.8", lw=0.5)
        if chunk and episode.mode == "async":
            axis.axhline(threshold * chunk, color="tab:orange", ls="--", lw=0.8, label="threshold")
        axis.set_ylabel(f"ep {episode.index}")
        axis.legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("seconds since episode start (grey: chunk ready)")
    figure.suptitle(
        f"action queue depth, {report.info.get('mode')} mode, {report.info.get('policy')}"
    )
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path

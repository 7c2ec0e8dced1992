"""A canary's evaluation of a version under gate (``zk0.hub.gate``).

The hub offers a canary the version under gate with the version the fleet runs
(``SubscriberStatus.under_gate``). The agent daemon then scores both, in a child process that
holds the compute like a federated round (so the arm's control loop never shares an
interpreter with it), and reports the two scores in its status (``AgentReport.canary``)::

    under_gate (v, p, n) --daemon, arm and compute idle--> python -m zk0.agent.canary (child)
        per version: base + its adapter + its normalization
          -> held-out MSE on this arm's own episodes (every agent)
          -> closed-loop success on the same evaluation scenes (a simulated arm only)
          -> or: operator labels of task episodes run with it (a real arm; none: none)
    <-- one JSON line: CanaryEvaluation --> status.report.canary --> the hub's gate

A real arm never moves by itself here: its success comes only from what operators labelled.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml
from loguru import logger

from zk0.agent.arbiter import AgentState, Arbiter
from zk0.agent.distribution.state import GateTask
from zk0.shared.agent_status import CanaryEvaluation, VersionScore
from zk0.shared.config import AgentConfig, RobotConfig, load_agent_config

if TYPE_CHECKING:
    from zk0.agent.task_labels import TaskEpisodeStore
    from zk0.shared.policy_factory import LoadedPolicy

#: The child's exit within this long after the daemon asks it to stop.
_STOP_S = 10.0


def score_version(
    config: AgentConfig,
    robot: RobotConfig,
    base: LoadedPolicy,
    version: int,
    episodes: int,
    frames: int,
) -> VersionScore:
    """Held-out MSE and success of stored ``version`` on this agent (``episodes`` scenes)."""
    from zk0.agent.distribution.subscriber import ADAPTERS_DIR
    from zk0.agent.inference.simulated import evaluate_policy, evaluation_scenes
    from zk0.agent.training import evaluate_mse, open_dataset, split_episodes
    from zk0.shared.artifact import load_adapter, read_manifest
    from zk0.shared.lora import apply_lora
    from zk0.shared.normalization import NORMALIZATION_FILE, loads, to_lerobot
    from zk0.shared.policy_factory import make_processors
    from zk0.shared.store import AdapterStore

    folder = AdapterStore(config.data_root / ADAPTERS_DIR).path(version)
    manifest = read_manifest(folder)
    model = apply_lora(copy.deepcopy(base.policy), manifest.lora, base.base.name_or_path)
    load_adapter(model, folder, manifest.artifact_id)
    stats = to_lerobot(loads((folder / NORMALIZATION_FILE).read_bytes()))
    pre, post = make_processors(model.base_model.model.config, stats)
    score: dict[str, Any] = {"version": version}
    root = config.dataset_root(robot)
    if (root / "meta" / "info.json").is_file():
        total = int(json.loads((root / "meta" / "info.json").read_text())["total_episodes"])
        if total >= 2:
            dataset = open_dataset(root, model.base_model.model.config, split_episodes(total)[1])
            score["mse"], score["mse_frames"] = evaluate_mse(model, pre, dataset, max_frames=frames)
    if robot.robot.type == "sim_so101":  # the same scenes for both versions: paired
        report = evaluate_policy(robot, model, pre, post, evaluation_scenes(episodes))
        score["successes"], score["episodes"] = report.success.successes, report.success.episodes
    return VersionScore.model_validate(score)  # a real arm: labels, added by the daemon


def evaluate(
    config: AgentConfig, candidate: int, current: int, episodes: int, frames: int
) -> CanaryEvaluation:
    from zk0.shared.features import PolicyFeatures
    from zk0.shared.policy_factory import build_policy

    robot = config.load_robot_config()
    base = build_policy(config.policy, PolicyFeatures.from_robot_config(robot), device="cpu")
    return CanaryEvaluation(
        candidate=score_version(config, robot, base, candidate, episodes, frames),
        current=score_version(config, robot, base, current, episodes, frames),
        complete=True,
    )


class CanaryRun:
    """The daemon's handle on one evaluation child (its pid holds the compute lease)."""

    def __init__(self, config_path: Path, task: GateTask, episodes: int) -> None:
        self.task = task
        command = [sys.executable, "-m", "zk0.agent.canary", "--config", str(config_path)]
        command += ["--candidate", str(task.candidate), "--current", str(task.current)]
        command += ["--episodes", str(episodes)]
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def result(self) -> CanaryEvaluation | str | None:
        """The evaluation, a one-line reason it failed, or None while it runs."""
        if self.process.poll() is None:
            return None
        out = self.process.stdout.read() if self.process.stdout else ""
        if self.process.returncode != 0:
            return f"canary evaluation exited {self.process.returncode}"
        try:
            return CanaryEvaluation.model_validate_json(out.strip().splitlines()[-1])
        except (ValueError, IndexError) as error:
            return f"canary evaluation printed no result ({type(error).__name__})"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(_STOP_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class CanaryFollower:
    """The agent daemon's side: when its subscriber says this agent is a canary of a version
    (``under_gate``), evaluate it once, in a child that holds the compute lease while the arm
    and the compute are idle; ``result`` is the last evaluation (reported to the hub).

    A simulated arm's evaluation is complete when the child ends. A real arm's success comes
    from operator labels, which keep arriving while the canary runs the candidate for real
    work: its counts are refreshed every turn, and the evaluation is complete once the
    candidate has the episodes the hub asked for.
    """

    def __init__(
        self,
        config: AgentConfig,
        robot: RobotConfig,
        labels: TaskEpisodeStore,
        arbiter: Arbiter,
        lock: threading.Lock,
    ) -> None:
        """``robot`` and ``labels``: the daemon's own (its arm, its task episodes in memory)."""
        self.config, self.labels, self.arbiter, self.lock = config, labels, arbiter, lock
        self.simulated = robot.robot.type == "sim_so101"
        self.run: CanaryRun | None = None
        self.result: CanaryEvaluation | None = None
        self._tried: GateTask | None = None

    def check(self, task: GateTask | None) -> None:
        """One turn of the daemon's loop: start, follow or end the evaluation."""
        run = self.run
        if run is not None:
            result = run.result() if task == run.task else "the gate moved on"
            if result is not None:
                self._finish(run, result)
            return
        if task is not None and task == self._tried:
            if not self.simulated and self.result is not None and not self.result.complete:
                self.result = _with_labels(self.labels, self.result, task.episodes)
            return
        if task is None:
            return
        with self.lock:
            if self.arbiter.state is not AgentState.IDLE:
                return  # asked again next turn
            config_file = self.config.data_root / "canary-agent.yaml"
            config_file.write_text(yaml.safe_dump(self.config.model_dump(mode="json")))
            run = CanaryRun(config_file, task, max(task.episodes, self.config.canary_episodes))
            refused = self.arbiter.request_compute(run.pid, 0, "evaluate", time.time())
        if refused is not None:
            run.stop()
            return
        self._tried, self.run = task, run
        logger.info("canary of version {}: evaluating it against version {}",
                    task.candidate, task.current)  # fmt: skip

    def _finish(self, run: CanaryRun, result: CanaryEvaluation | str) -> None:
        run.stop()
        with self.lock:
            self.arbiter.release_compute(run.pid)
        self.run = None
        if isinstance(result, str):  # not retried for this gate: the hub's timeout decides
            logger.warning("canary evaluation of version {}: {}", run.task.candidate, result)
            return
        if not self.simulated:
            result = _with_labels(self.labels, result, run.task.episodes)
        self.result = result
        logger.info("canary evaluation: version {} {}, version {} {}",
                    result.candidate.version, _describe(result.candidate),
                    result.current.version, _describe(result.current))  # fmt: skip

    def owns(self, pid: int) -> bool:
        """Whether ``pid`` is this follower's evaluation child (its lease is no round's)."""
        return self.run is not None and self.run.pid == pid

    def stop(self) -> None:
        if self.run is not None:
            self.run.stop()


def _labelled(labels: TaskEpisodeStore, score: VersionScore) -> VersionScore:
    """``score`` with the success of the task episodes operators labelled under its version."""
    counts = labels.version_counts(score.version)
    return score.model_copy(
        update={"successes": counts.success.successes, "episodes": counts.success.episodes}
    )


def _with_labels(
    labels: TaskEpisodeStore, result: CanaryEvaluation, needed: int
) -> CanaryEvaluation:
    """A real arm's evaluation with today's labels; complete once the candidate has enough."""
    candidate = _labelled(labels, result.candidate)
    return CanaryEvaluation(
        candidate=candidate,
        current=_labelled(labels, result.current),
        complete=candidate.episodes >= needed,
    )


def _describe(score: VersionScore) -> str:
    mse = f"MSE {score.mse:.4g} ({score.mse_frames} frames)" if score.mse is not None else "no MSE"
    return f"{mse}, success {score.successes}/{score.episodes}"


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    config: Annotated[Path, typer.Option(help="The agent's agent.yaml.")],
    candidate: Annotated[int, typer.Option(min=0, help="The version under gate.")],
    current: Annotated[int, typer.Option(min=0, help="The version the fleet runs.")],
    episodes: Annotated[int, typer.Option(min=0, max=1000)] = 10,
    frames: Annotated[int, typer.Option(min=1, max=10_000)] = 64,
) -> None:
    """Score two stored versions on this agent; print one JSON line (``CanaryEvaluation``)."""
    import torch

    agent = load_agent_config(config)
    torch.set_num_threads(agent.torch_threads)
    typer.echo(evaluate(agent, candidate, current, episodes, frames).model_dump_json())


if __name__ == "__main__":
    app()

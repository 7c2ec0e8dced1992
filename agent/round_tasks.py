"""What this arm does in a federated round: statistics, local LoRA training and evaluation.

The round worker (:mod:`zk0.agent.round_worker`) runs these in the agent daemon's warm child
process; a simulated node's ClientApp runs them in its own (Ray keeps that one warm).
:func:`handle` is the one entry: a Flower message in, the reply's content out.

Every reply carries the agent id (``meta`` record) so the hub keys its history by arm, not by
Flower's node id. Only adapter tensors leave the machine, plus counts and metrics; before the
first round, the per-feature statistics the hub combines into the shared normalization.

Evaluation scores the round's adapter on held-out frames (action MSE) and, when the hub asks for
episodes and this node's arm is the simulated one, closed-loop success in simulated time on
scenes no recording used. A real arm never moves for a round: nothing here drives one.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from loguru import logger

from zk0.agent.inference.simulated import evaluate_policy, evaluation_scenes
from zk0.agent.personal_round import attach_to_round
from zk0.agent.round_worker import TaskKind
from zk0.agent.training import (
    TrainConfig,
    dataset_stats,
    evaluate_mse,
    open_dataset,
    split_episodes,
    train_policy,
)
from zk0.shared.adapter_wire import pack, unpack_torch
from zk0.shared.agent_control import ComputeBegin, ComputeEnd
from zk0.shared.agent_status import Phase, skip_message
from zk0.shared.config import ConfigError, RobotConfig, load_robot_config
from zk0.shared.control import ControlError, request
from zk0.shared.features import PolicyFeatures
from zk0.shared.federation import (
    AGENT_ID,
    ARRAYS_KEY,
    CONFIG_KEY,
    EVAL_MSE,
    EXAMPLES,
    META_KEY,
    METRICS_KEY,
    NORMALIZATION,
    STATS_KEY,
    SUCCESS_COUNT,
    SUCCESS_EPISODES,
    SUCCESS_EPISODES_ASKED,
    TASK_SECONDS,
    TRAIN_SECONDS,
    NodeSettings,
    RunSettings,
)
from zk0.shared.lora import adapter_state, apply_lora, load_adapter_state
from zk0.shared.normalization import dumps, loads, to_lerobot
from zk0.shared.policy_factory import LoadedPolicy, build_policy, make_processors


@functools.lru_cache(maxsize=2)
def _base(spec: str, robot_config: str) -> LoadedPolicy:
    """The frozen base, built once per process and copied for every round."""
    logger.info("building the base {} for rounds (once per process)", spec)
    features = PolicyFeatures.from_robot_config(load_robot_config(robot_config))
    return build_policy(spec, features)


def handle(
    kind: TaskKind,
    message: Message,
    run_config: Mapping[str, Any],
    node_config: Mapping[str, Any],
) -> RecordDict:
    """Run one task of a round: the content of its reply (the agent id included)."""
    run = RunSettings.from_flower(dict(run_config), "run config")
    node = NodeSettings.from_node_config(dict(node_config), run)
    torch.set_num_threads(node.torch_threads)
    if kind == "query":
        return _with_agent_id(node, _query(run, node))
    server_round = int(message.content[CONFIG_KEY].get("server-round", 0))  # type: ignore[arg-type]
    with compute_permission(node, server_round, kind):
        start = time.perf_counter()
        task = _train if kind == "train" else _evaluate
        records = task(message, run, node, server_round)
        records[METRICS_KEY][TASK_SECONDS] = time.perf_counter() - start
    return _with_agent_id(node, records)


def _with_agent_id(node: NodeSettings, records: dict[str, Any]) -> RecordDict:
    return RecordDict({META_KEY: ConfigRecord({AGENT_ID: node.agent_id}), **records})


def _episodes(node: NodeSettings) -> tuple[list[int], list[int]]:
    import json

    info = json.loads((node.data_root / "meta" / "info.json").read_text())
    return split_episodes(int(info["total_episodes"]))


def _model(run: RunSettings, message: Message) -> tuple[Any, Any, Any]:
    """Base copy + the global adapter from ``message``; processors on the shared stats."""
    base = _base(run.policy, str(run.robot_config_path))
    peft_model = apply_lora(copy.deepcopy(base.policy), run.lora, base.base.name_or_path)
    state = unpack_torch(message.content.array_records[ARRAYS_KEY], adapter_state(peft_model))
    load_adapter_state(
        peft_model, {name: tensor.to(base.policy.config.device) for name, tensor in state.items()}
    )
    stats = loads(bytes(message.content[CONFIG_KEY][NORMALIZATION]))  # type: ignore[arg-type]
    preprocessor, postprocessor = make_processors(
        peft_model.base_model.model.config, to_lerobot(stats)
    )
    return peft_model, preprocessor, postprocessor


@contextlib.contextmanager
def compute_permission(node: NodeSettings, server_round: int, phase: Phase) -> Iterator[None]:
    """Hold the agent daemon's permission to use the compute (none needed without a daemon).

    The arm and a running policy come first: while the daemon refuses, ask again every
    second; after ``train-wait-s`` give up, and the hub counts this agent skipped this round
    (``zk0.shared.agent_status.skip_message``).
    The daemon hears how this part of the round ended (its ``last_round``).
    """
    if not node.control_socket:
        yield
        return
    socket, pid = Path(node.control_socket), os.getpid()

    def end(outcome: Literal["replied", "failed", "skipped"], reason: str | None = None) -> None:
        with contextlib.suppress(ControlError):
            ending = ComputeEnd(
                pid=pid, round=server_round, phase=phase, outcome=outcome, reason=reason
            )
            request(socket, ending)

    deadline = time.monotonic() + node.train_wait_s
    while True:
        answer = request(socket, ComputeBegin(pid=pid, round=server_round, phase=phase))
        if answer.granted:
            break
        if time.monotonic() >= deadline:
            why = f"busy for {node.train_wait_s:.0f} s ({answer.reason})"
            end("skipped", why)
            raise RuntimeError(skip_message(node.agent_id, why, server_round))
        time.sleep(1.0)
    try:
        yield
    except Exception as error:
        end(
            "failed",
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300],
        )
        raise
    end("replied")


def _query(run: RunSettings, node: NodeSettings) -> dict[str, Any]:
    """Per-feature count, mean, variance, min and max of this agent's training episodes."""
    base = _base(run.policy, str(run.robot_config_path))
    train_episodes, _ = _episodes(node)
    stats = dataset_stats(open_dataset(node.data_root, base.policy.config, train_episodes))
    logger.info("{}: statistics of {} frames", node.agent_id, stats["action"].count)
    return {STATS_KEY: ConfigRecord({NORMALIZATION: dumps(stats)})}


def _train(
    message: Message, run: RunSettings, node: NodeSettings, server_round: int
) -> dict[str, Any]:
    peft_model, preprocessor, _ = _model(run, message)
    personal = attach_to_round(peft_model, run, node, message)  # the arm's local part, if any
    train_episodes, _ = _episodes(node)
    dataset = open_dataset(node.data_root, peft_model.base_model.model.config, train_episodes)
    result = train_policy(
        peft_model,
        preprocessor,
        dataset,
        TrainConfig(
            local_steps=run.local_steps,
            batch_size=run.batch_size,
            lr=run.lr,
            seed=run.seed * 100_003 + server_round,
            freeze_lora_a=run.aggregation == "ffa" and personal is None,  # else attach froze it
        ),
    )
    arrays = pack(adapter_state(peft_model))
    metrics = MetricRecord(
        {
            EXAMPLES: len(dataset),
            "train-loss": result.loss,
            "train-steps": result.steps,
            TRAIN_SECONDS: result.seconds,
            "bytes-sent": arrays.count_bytes(),
        }
    )
    logger.info("{}: round {} trained, loss {:.4f}", node.agent_id, server_round, result.loss)
    if personal is not None:  # the reply holds the shared adapter alone; the local part stays
        personal.commit(peft_model, server_round, message.metadata.run_id)
    return {ARRAYS_KEY: arrays, METRICS_KEY: metrics}


def _evaluate(
    message: Message, run: RunSettings, node: NodeSettings, server_round: int
) -> dict[str, Any]:
    peft_model, preprocessor, postprocessor = _model(run, message)
    attach_to_round(peft_model, run, node, message)  # evaluate what the arm runs: shared + local
    _, held_out = _episodes(node)
    dataset = open_dataset(node.data_root, peft_model.base_model.model.config, held_out)
    mse, frames = evaluate_mse(
        peft_model, preprocessor, dataset, max_frames=run.eval_frames, seed=run.seed
    )
    logger.info("{}: eval MSE {:.5f} on {} held-out frames", node.agent_id, mse, frames)
    metrics = MetricRecord({EXAMPLES: frames, EVAL_MSE: mse})
    asked = int(message.content[CONFIG_KEY].get(SUCCESS_EPISODES_ASKED, 0))  # type: ignore[arg-type]
    robot = _simulated_arm(run, node) if asked > 0 else None
    if robot is not None:
        # The same scenes every round (paired), never a recorded one; noise from the run's seed.
        scenes = evaluation_scenes(asked)
        try:
            report = evaluate_policy(
                robot, peft_model, preprocessor, postprocessor, scenes, seed=run.seed
            )
        except Exception as error:  # the simulator failing must not cost the round its MSE
            logger.warning("{}: closed-loop evaluation failed: {!r}", node.agent_id, error)
        else:
            metrics[SUCCESS_COUNT] = report.success.successes
            metrics[SUCCESS_EPISODES] = report.success.episodes
            logger.info("{}: closed-loop success {}", node.agent_id, report.success.describe())
    return {METRICS_KEY: metrics}


#: (agent, reason) already logged: each reason once per process, not once per round.
_told: set[tuple[str, str]] = set()


def _simulated_arm(run: RunSettings, node: NodeSettings) -> RobotConfig | None:
    """The node's robot config if closed-loop episodes may run on it; else None (logged)."""
    robot, why = None, ""
    if not node.robot_config:
        why = "the node has no robot config"
    else:
        try:
            robot = load_robot_config(node.robot_config)
        except ConfigError as error:
            why = f"its robot config does not load ({error})"
    features = PolicyFeatures.from_robot_config
    if robot is not None and robot.robot.type != "sim_so101":
        # A round runs unattended: a real arm moving by itself could hurt someone.
        why = f"its arm is a {robot.robot.type}, not the simulated one: a round never moves it"
    elif robot is not None and features(robot) != features(load_robot_config(run.robot_config)):
        # The policy was built for the run's cameras and joints: another layout cannot drive it.
        why = f"its robot config ({node.robot_config}) does not fit the run's policy features"
    if not why:
        return robot
    if (node.agent_id, why) not in _told:
        _told.add((node.agent_id, why))
        logger.info("{}: no closed-loop evaluation: {}", node.agent_id, why)
    return None

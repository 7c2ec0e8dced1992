"""``zk0 bench federated --parts control``: does an arm miss control ticks while a round trains
beside it?

A task or recording started during a round runs at once, next to the round worker's training.
The arm here is the product's real-time asynchronous evaluation (``zk0-agent eval``: the policy
racing the clock on the simulated SO-101, one torch thread), the same scenes in every condition:

    alone                      nothing else runs
    training, same priority    a round worker at niceness 0 trains task after task meanwhile
    training, agent default    the same at the agent's ``round_worker_nice``

Each training condition sends the real train task (``zk0.agent.round_worker.ask``) over the
worker's socket, one after another, until the arm's episodes end. Starved ticks are ticks after
the first chunk at which the arm had no action to execute; missed ticks are control periods the
loop itself overran.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from zk0.shared.config import AgentConfig
from zk0.shared.federation import NodeSettings, RunSettings

#: A round's training as the demo's agents run it (tiny base, one torch thread).
TRAINING = RunSettings(policy="tiny-sim-base", local_steps=70, batch_size=8, seed=0)
POLICY = "tiny-sim-base"


def control_ticks(episodes: int) -> dict[str, Any]:
    """Starved and missed ticks of ``episodes`` real-time episodes per condition."""
    from zk0.shared.config import load_robot_config
    from zk0.shared.sim_variants import SIM_ROBOT

    robot = load_robot_config(SIM_ROBOT)
    default_nice = AgentConfig.model_fields["round_worker_nice"].default
    result: dict[str, Any] = {"episodes": episodes, "round_worker_nice_default": default_nice}
    result["alone"] = _arm(robot, episodes)
    with tempfile.TemporaryDirectory(prefix="zk0-bench-ticks-") as work:
        for name, nice in (("training_same_priority", 0), ("training_niced", default_nice)):
            with _training(Path(work), nice) as tasks:
                result[name] = _arm(robot, episodes)
            result[name]["train_tasks_completed"] = tasks["completed"]
            result[name]["nice"] = nice
    return result


def _arm(robot: Any, episodes: int) -> dict[str, Any]:
    from zk0.agent.inference.evaluation import evaluate, open_session

    with open_session(robot, POLICY) as session:
        summary = evaluate(session, episodes).summary()
    keys = ("starved_ticks", "starved_fraction", "missed_ticks", "chunk_latency_p95_s", "success")
    return {key: summary[key] for key in keys}


@contextlib.contextmanager
def _training(work: Path, nice: int) -> Iterator[dict[str, int]]:
    """A round worker at ``nice`` training task after task until the block ends."""
    from zk0.agent.round_worker import ask, worker_process

    socket_path = work / f"worker-{nice}.sock"
    process = worker_process(socket_path, work / f"worker-{nice}.log", "bench", nice)
    node, message = _round(work)
    tasks = {"completed": 0}
    stop = threading.Event()

    def train() -> None:
        while not stop.is_set():
            ask(socket_path, "train", message, TRAINING.to_flower(), node.to_flower(), 600)
            tasks["completed"] += 1

    process.start()
    try:
        deadline = time.monotonic() + 120
        while not socket_path.exists():
            if time.monotonic() > deadline or not process.running:
                raise RuntimeError(f"the round worker did not start: see {process.log_path}")
            time.sleep(0.2)
        trainer = threading.Thread(target=train, daemon=True)
        trainer.start()
        time.sleep(5.0)  # the first task has built its model and is in its optimizer steps
        yield tasks
        stop.set()
        trainer.join(timeout=600)
    finally:
        process.stop()


def _round(work: Path) -> tuple[NodeSettings, Any]:
    """A cached recording as the node's data, and a train message for a fresh adapter."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from zk0.agent.episode_cache import recorded
    from zk0.agent.training import dataset_stats, open_dataset
    from zk0.bench._common import flower_task_identity
    from zk0.shared.adapter_wire import pack
    from zk0.shared.config import load_robot_config
    from zk0.shared.features import PolicyFeatures
    from zk0.shared.federation import ARRAYS_KEY, CONFIG_KEY, NORMALIZATION
    from zk0.shared.lora import adapter_state, apply_lora
    from zk0.shared.normalization import dumps
    from zk0.shared.policy_factory import build_policy
    from zk0.shared.sim_variants import CLIENT_VARIANTS, SIM_ROBOT

    data_root = recorded("bench-ticks", CLIENT_VARIANTS["sim-00"], episodes=4, episode_time_s=4.0)
    features = PolicyFeatures.from_robot_config(load_robot_config(SIM_ROBOT))
    base = build_policy(POLICY, features, device="cpu")
    fresh = apply_lora(copy.deepcopy(base.policy), TRAINING.lora, base.base.name_or_path)
    stats = dumps(dataset_stats(open_dataset(data_root, base.policy.config)))
    config = ConfigRecord({NORMALIZATION: stats, "server-round": 1})
    content = RecordDict({ARRAYS_KEY: pack(adapter_state(fresh)), CONFIG_KEY: config})
    with flower_task_identity():
        message = Message(content, dst_node_id=0, message_type=MessageType.TRAIN)
    node = NodeSettings(agent_id="sim-00", data_root=data_root)
    return node, message

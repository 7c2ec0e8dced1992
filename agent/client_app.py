"""The agent's Flower ClientApp: a thin messenger for statistics, local training and evaluation.

Flower starts one of these per message. Under the agent daemon it hands the task to the
daemon's warm round worker (:mod:`zk0.agent.round_worker`: the base stays built between
messages) and returns its reply; a node without one (Flower's simulation engine, a SuperNode
started by hand) runs the same task here (:func:`zk0.agent.round_tasks.handle`). What a task
does, and what leaves the machine, is in :mod:`zk0.agent.round_tasks`.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from zk0.agent.round_worker import TaskKind, ask
from zk0.shared.federation import (
    CLIENTAPP_START_SECONDS,
    HANDOVER_SECONDS,
    METRICS_KEY,
    TASK_SECONDS,
    NodeSettings,
    RunSettings,
)
from zk0.shared.processes import process_age_s

app = ClientApp()


@app.query()
def query(message: Message, context: Context) -> Message:
    """Per-feature statistics of this agent's training episodes."""
    return _run("query", message, context)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Local LoRA training from the round's adapter: the trained shared adapter."""
    return _run("train", message, context)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Held-out MSE and, on a simulated arm, closed-loop success of the round's adapter."""
    return _run("evaluate", message, context)


def _run(kind: TaskKind, message: Message, context: Context) -> Message:
    started, age_s = time.monotonic(), process_age_s()
    run_config, node_config = dict(context.run_config), dict(context.node_config)
    run = RunSettings.from_flower(run_config, "run config")
    worker = NodeSettings.from_node_config(node_config, run).round_worker
    if worker:
        content = ask(Path(worker), kind, message, run_config, node_config, run.round_timeout_s)
    else:
        from zk0.agent.round_tasks import handle

        content = handle(kind, message, run_config, node_config)
    if METRICS_KEY in content.metric_records:  # where the round's time went, for the hub
        metrics = content.metric_records[METRICS_KEY]
        task_s = float(metrics.get(TASK_SECONDS, 0.0))
        metrics[CLIENTAPP_START_SECONDS] = age_s
        metrics[HANDOVER_SECONDS] = max(0.0, time.monotonic() - started - task_s) if worker else 0.0
    return Message(content=content, reply_to=message)

"""``zk0 bench federated``'s deployment part: where a real round's time goes.

A SuperLink with TLS and node authentication and two SuperNodes on loopback, the product's
ServerApp and ClientApp, two rounds at the bench's settings; once with cold ClientApps (each
builds its own base, as before the round worker) and once with each node's warm round worker,
as the agent daemon runs it. Tests start nodes the same way (:func:`start_supernodes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zk0.agent.round_worker import worker_process
from zk0.agent.supernode import SuperNode
from zk0.hub.superlink import SuperLink, SuperLinkSettings
from zk0.shared.federation import NodeSettings, RunSettings
from zk0.shared.flower_keys import TlsFiles, make_node_keypair, make_tls
from zk0.shared.processes import ManagedProcess, free_port
from zk0.shared.store import AdapterStore


@dataclass
class BenchNode:
    """A SuperNode started on loopback and, when warm, its agent's round worker."""

    supernode: SuperNode
    worker: ManagedProcess | None

    def stop(self) -> None:
        self.supernode.stop()
        if self.worker is not None:
            self.worker.stop()


def start_supernodes(
    link: SuperLink, tls: TlsFiles, datasets: dict[str, Path], work: Path, warm: bool = True
) -> list[BenchNode]:
    """For each agent (id -> dataset): a node key registered with ``link`` (``work/keys``) and
    its SuperNode started on loopback (logs in ``work/logs/<agent>``); ``warm``: with a round
    worker, as the agent daemon runs it (else each ClientApp process builds its own base)."""
    nodes = []
    for agent, root in datasets.items():
        logs = work / "logs" / agent
        worker, socket_path = None, work / "workers" / f"{agent}.sock"
        if warm:
            socket_path.parent.mkdir(parents=True, exist_ok=True)
            worker = worker_process(socket_path, logs / "round-worker.log", agent)
            worker.start()
        link.register(make_node_keypair(work / "keys" / agent), agent)
        settings = NodeSettings(
            agent_id=agent, data_root=root, round_worker=str(socket_path) if warm else ""
        )
        supernode = SuperNode(
            settings,
            superlink=link.address,
            root_certificates=tls.ca_cert,
            private_key=work / "keys" / agent,
            port=free_port(),
            flwr_home=link.flwr_home,
            log_dir=logs,
        )
        supernode.start()
        nodes.append(BenchNode(supernode, worker))
    return nodes


def flower_overhead(
    settings: RunSettings, datasets: dict[str, Path], work: Path, warm: bool, rounds: int = 2
) -> dict[str, Any]:
    """Where a deployment round's time goes (TLS, node auth, 2 SuperNodes), per round: the
    train phase's wall time, the slowest client's optimizer steps, and the rest (the overhead)
    broken down into the ClientApp's process start, the hand-over to the round worker, the
    task's model set-up, and Flower's polling and transport (what remains)."""
    tls = make_tls(work / "tls", ["127.0.0.1"])
    link = SuperLink(
        SuperLinkSettings("127.0.0.1", free_port(), work / "state.db", tls),
        work / "flwr-deploy",
        work / "logs",
    )
    nodes: list[BenchNode] = []
    try:
        link.start()
        agents = {agent: datasets[agent] for agent in ("sim-00", "sim-01")}
        nodes = start_supernodes(link, tls, agents, work, warm=warm)
        store = work / "deploy-store"
        run = settings.model_copy(
            update={
                "num_server_rounds": rounds,
                "min_nodes": 2,
                "store_root": str(store),
                "run_dir": str(work / "run-deploy"),
            }
        )
        result = link.run(run, timeout_s=3600)
        if result.returncode != 0:
            raise RuntimeError(f"deployment run failed: {result.stderr[-500:]}")
    finally:
        for node in nodes:
            node.stop()
        link.stop()
    adapters = AdapterStore(store)
    metrics = [adapters.manifest(v).metrics for v in adapters.versions()[1:]]
    if len(metrics) != rounds:  # Flower's run can end 0 with its ServerApp failed
        why = result.stdout[-1500:]
        raise RuntimeError(f"deployment run stored {len(metrics)} of {rounds} rounds: {why}")

    def mean(key: str) -> float:
        return float(np.mean([float(m[key] or 0) for m in metrics]))

    wall, train = mean("train_wall_s"), mean("slowest_client_train_s")
    start, handover = mean("clientapp_start_s"), mean("handover_s")
    setup = mean("slowest_client_task_s") - train
    overhead = wall - train
    return {
        "round_wall_s": wall,
        "slowest_client_train_s": train,
        "flower_overhead_s_per_round": overhead,
        "flower_overhead_fraction": overhead / wall,
        "breakdown_s": {
            "clientapp_process_start": start,
            "handover_to_round_worker": handover,
            "task_model_setup": setup,
            "polling_and_transport": overhead - start - handover - setup,
        },
    }

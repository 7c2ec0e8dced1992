"""``zk0 demo``: a hub and simulated SO-101 agents on one machine, offline, end to end.

The hub runs here: a Flower SuperLink (TLS, SuperNode authentication, database file) and the
adapter distribution server (ZeroMQ, CURVE). Every agent is its own set of processes, started
through its own CLI exactly as on a robot PC: it records its episodes with the scripted expert
(``zk0-agent record``), runs its adapter subscriber and its Flower SuperNode, and finally runs
closed-loop asynchronous evaluation with the newest adapter it received (``zk0-agent eval``).
Each agent has its own task variant, so the federation has genuinely different data.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from loguru import logger
from rich.console import Console
from rich.table import Table

from zk0.hub.distribution import DistributionServer
from zk0.hub.history import HISTORY_FILE
from zk0.hub.superlink import SuperLink, SuperLinkSettings
from zk0.shared.config import HubKeys
from zk0.shared.distribution.keys import AllowList, create_keypair
from zk0.shared.flower_keys import make_node_keypair, make_tls
from zk0.shared.logs import RUN_DIR_ENV, new_run_dir, setup_logging
from zk0.shared.processes import ManagedProcess, free_port
from zk0.shared.sim_variants import CLIENT_VARIANTS, variant_config
from zk0.shared.store import AdapterStore

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class DemoOptions:
    agents: int = 3
    rounds: int = 3
    episodes: int = 8
    episode_time_s: float = 6.0
    policy: str = "tiny-sim-base"
    local_steps: int = 20
    lr: float = 1e-3
    eval_episodes: int = 2
    outputs: Path = Path("outputs")


@dataclass
class DemoAgent:
    agent_id: str
    folder: Path
    config: Path
    robot_config: Path
    dataset: Path
    processes: list[ManagedProcess]


def _write_yaml(path: Path, content: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def _prepare_agent(
    agent_id: str, run_dir: Path, hub: dict[str, Any], options: DemoOptions
) -> DemoAgent:
    folder = run_dir / "agents" / agent_id
    robot = variant_config(CLIENT_VARIANTS[agent_id], options.episode_time_s)
    robot_yaml = _write_yaml(
        folder / "robot.yaml", robot.model_dump(mode="json", exclude_none=True)
    )
    keys = folder / "keys"
    create_keypair(keys / "curve.key_secret", keys / "curve.key", agent_id)
    make_node_keypair(keys / "supernode")
    config = _write_yaml(
        folder / "agent.yaml",
        {
            "agent_id": agent_id,
            "robot_config": str(robot_yaml),
            "data_root": str(folder / "data"),
            "policy": options.policy,
            "hub": hub["address"],
            "keys": {
                "curve_secret": str(keys / "curve.key_secret"),
                "curve_public": str(keys / "curve.key"),
                "hub_curve_public": hub["curve_public"],
                "supernode_private_key": str(keys / "supernode"),
                "hub_ca_cert": hub["ca_cert"],
            },
        },
    )
    return DemoAgent(agent_id, folder, config, robot_yaml, folder / "data" / "dataset", [])


def _run_all(commands: dict[str, list[str]], env: dict[str, str], log_dir: Path, what: str) -> None:
    """Run one command per agent in parallel; fail with the first agent that failed."""
    running = {
        agent: ManagedProcess(f"{what}[{agent}]", argv, env, log_dir / agent / f"{what}.log")
        for agent, argv in commands.items()
    }
    for process in running.values():
        process.start()
    for agent, process in running.items():
        assert process.process is not None
        if process.process.wait() != 0:
            raise RuntimeError(f"{agent}: {what} failed; see {process.log_path}")


def _wait_for_convergence(
    server: DistributionServer, agents: list[str], version: int, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        applied = {record.agent_id: record.applied for record in server.agents()}
        if all(applied.get(agent) == version for agent in agents):
            return
        time.sleep(0.5)
    raise TimeoutError(f"agents did not all reach version {version}: {applied}")


def run_demo(options: DemoOptions) -> Path:
    run_dir = new_run_dir(options.outputs).resolve()
    setup_logging(run_dir, "hub")
    console = Console()
    env = {
        **os.environ,
        RUN_DIR_ENV: str(run_dir),
        "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    hub_dir = run_dir / "hub"
    tls = make_tls(hub_dir / "tls", ["127.0.0.1"])
    hub_keys = HubKeys(
        curve_secret=hub_dir / "keys" / "hub.key_secret",
        curve_public=hub_dir / "keys" / "hub.key",
        allow_list_dir=hub_dir / "allowed",
    )
    create_keypair(hub_keys.curve_secret, hub_keys.curve_public, "hub")
    flower_port, publish_port, fetch_port = free_port(), free_port(), free_port()
    hub = {
        "address": {
            "host": "127.0.0.1",
            "flower_port": flower_port,
            "publish_port": publish_port,
            "fetch_port": fetch_port,
        },
        "curve_public": str(hub_keys.curve_public),
        "ca_cert": str(tls.ca_cert),
    }
    agent_ids = sorted(CLIENT_VARIANTS)[: options.agents]
    agents = [_prepare_agent(agent_id, run_dir, hub, options) for agent_id in agent_ids]
    allow_list = AllowList(hub_keys.allow_list_dir)
    for agent in agents:
        allow_list.add(agent.agent_id, agent.folder / "keys" / "curve.key")

    with console.status(f"{len(agents)} agents recording {options.episodes} episodes each"):
        _run_all(
            {
                a.agent_id: [
                    str(BIN / "zk0-agent"),
                    "record",
                    "--robot-config",
                    str(a.robot_config),
                    "--episodes",
                    str(options.episodes),
                    "--root",
                    str(a.dataset),
                ]
                for a in agents
            },
            env,
            run_dir / "agents",
            "record",
        )
    console.print(f"[green]recorded[/] {options.episodes} episodes on each of {len(agents)} agents")

    store = AdapterStore(hub_dir / "adapters")
    link = SuperLink(
        SuperLinkSettings("127.0.0.1", flower_port, hub_dir / "superlink.db", tls),
        hub_dir / "flwr-home",
        hub_dir,
    )
    server = DistributionServer(
        store, keys=hub_keys, publish_port=publish_port, fetch_port=fetch_port
    )
    try:
        link.start()
        server.start()
        for agent in agents:
            link.register(agent.folder / "keys" / "supernode.pub", agent.agent_id)
            agent.processes = [
                ManagedProcess(
                    f"subscriber[{agent.agent_id}]",
                    [sys.executable, "-m", "zk0.agent.distribution", "--config", str(agent.config)],
                    env,
                    agent.folder / "subscriber.log",
                ),
                ManagedProcess(
                    f"supernode[{agent.agent_id}]",
                    [
                        str(BIN / "zk0-agent"),
                        "supernode",
                        "--config",
                        str(agent.config),
                        "--dataset",
                        str(agent.dataset),
                        "--port",
                        str(free_port()),
                    ],
                    env,
                    agent.folder / "supernode-cli.log",
                ),
            ]
            for process in agent.processes:
                process.start()
        with console.status(f"{options.rounds} federated LoRA rounds on {options.policy}"):
            result = link.run(
                REPO_ROOT,
                {
                    "policy": options.policy,
                    "num-server-rounds": options.rounds,
                    "min-nodes": len(agents),
                    "local-steps": options.local_steps,
                    "lr": options.lr,
                    "store-root": str(store.root),
                    "run-dir": str(run_dir),
                    "round-timeout-s": 900.0,
                },
                timeout_s=3600,
            )
        if result.returncode != 0:
            raise RuntimeError(f"the federated run failed: {result.stderr.strip()[-400:]}")
        newest = store.latest_version()
        assert newest is not None
        with console.status(f"pushing version {newest} to every agent"):
            _wait_for_convergence(server, agent_ids, newest, timeout_s=120)
        fleet = {record.agent_id: record for record in server.agents()}
    finally:
        for agent in agents:
            for process in agent.processes:
                process.stop()
        server.stop()
        link.stop()

    with console.status("closed-loop async evaluation on every agent"):
        _run_all(
            {
                a.agent_id: [
                    str(BIN / "zk0-agent"),
                    "eval",
                    "--robot-config",
                    str(a.robot_config),
                    "--policy",
                    options.policy,
                    "--adapter",
                    str(a.folder / "data" / "adapters" / "versions" / str(newest)),
                    "--episodes",
                    str(options.eval_episodes),
                    "--mode",
                    "async",
                    "--json",
                    str(a.folder / "eval.json"),
                ]
                for a in agents
            },
            env,
            run_dir / "agents",
            "eval",
        )
    _print_table(console, run_dir, agents, fleet, store, newest)
    return run_dir


def _print_table(
    console: Console,
    run_dir: Path,
    agents: list[DemoAgent],
    fleet: dict[str, Any],
    store: AdapterStore,
    newest: int,
) -> None:
    history = json.loads((run_dir / HISTORY_FILE).read_text())
    table = Table(title=f"zk0 demo: {len(agents)} simulated SO-101 agents, version {newest}")
    for column in (
        "agent",
        "episodes",
        "eval MSE round 0 -> last",
        "success",
        "adapter",
        "MB received",
    ):
        table.add_column(column, justify="right" if column != "agent" else "left")
    for agent in agents:
        series = history["clients"].get(agent.agent_id, [None])
        evaluation = json.loads((agent.folder / "eval.json").read_text())
        record = fleet.get(agent.agent_id)
        info = json.loads((agent.dataset / "meta" / "info.json").read_text())
        moved = sum(
            int(store.manifest(v).metrics.get("bytes_sent") or 0) for v in store.versions()[1:]
        )
        table.add_row(
            agent.agent_id,
            str(info["total_episodes"]),
            f"{series[0]:.4f} -> {series[-1]:.4f}" if series[-1] is not None else "-",
            f"{evaluation.get('success_rate', 0):.0%}",
            f"v{record.applied if record else '-'}",
            f"{moved / len(agents) / 1e6:.2f}",
        )
    console.print(table)
    console.print(f"run folder  {run_dir}")
    console.print(f"history     {run_dir / HISTORY_FILE}")
    console.print(f"chart       {run_dir / 'eval_mse_chart.png'}")
    logger.info("demo finished: {}", run_dir)

"""``zk0 demo``: a hub and simulated SO-101 agents on one machine, offline, end to end.

Everything runs as it would on real machines, through the same commands and daemons:

1. Enrolment: ``zk0-hub keys init``; per agent ``zk0-agent keys init`` (CURVE and SuperNode
   key pairs) and ``zk0-hub keys add`` (allow-list and Flower SuperNode registration).
2. The daemons: ``zk0-hub run`` (Flower SuperLink with TLS, SuperNode authentication and a
   database, the adapter distribution server, the run scheduler) and one ``zk0-agent run``
   per agent (its own task variant: the federation has genuinely different data). The demo
   supervises them as systemd would: a daemon that dies is started again.
3. Each agent records its episodes with the scripted teleoperator (``record`` on its control
   socket). The hub starts a federated run by itself once every agent reports enough new
   episodes; each round's version is pushed to every agent over ZeroMQ and hot-swapped into
   its running policy.
4. Each agent runs closed-loop asynchronous evaluation with the version in use (``run_task``).

``--chaos-kill-round N`` SIGKILLs the first agent while it trains in round N: the round
completes with the others, the demo restarts the agent, and it catches up with the newest
version.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from loguru import logger
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from zk0.hub.history import HISTORY_FILE
from zk0.shared.control import ControlError, request
from zk0.shared.logs import RUN_DIR_ENV, new_run_dir, setup_logging
from zk0.shared.processes import ManagedProcess, Supervised, free_port
from zk0.shared.sim_variants import CLIENT_VARIANTS, variant_config

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
    chaos_kill_round: int | None = None
    timeout_s: float = 3600.0


@dataclass
class Daemon:
    """One supervised daemon and its control socket."""

    name: str
    config: Path
    socket: Path
    supervised: Supervised
    killed: int = 0

    def ask(self, command: str, **args: Any) -> dict[str, Any]:
        return request(self.socket, command, **args)

    def status(self) -> dict[str, Any] | None:
        try:
            return self.ask("status", timeout_s=5.0)
        except ControlError:
            return None  # starting, restarting, or busy for a moment

    @property
    def pid(self) -> int | None:
        child = self.supervised.child
        return child.process.pid if child is not None and child.process is not None else None


@dataclass
class Demo:
    options: DemoOptions
    run_dir: Path
    sockets: Path
    env: dict[str, str]
    hub: Daemon | None = None
    agents: list[Daemon] = field(default_factory=list)

    def _cli(self, *argv: str) -> str:
        result = subprocess.run(
            [str(BIN / argv[0]), *argv[1:]],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:3])} failed: {result.stderr.strip()[-400:]}")
        return result.stdout

    def _daemon(self, name: str, program: str, config: Path, socket: Path, log: Path) -> Daemon:
        argv = [str(BIN / program), "run", "--config", str(config)]
        supervised = Supervised(
            lambda: ManagedProcess(name, argv, self.env, log), min_backoff_s=0.5, max_backoff_s=5
        )
        supervised.start()
        return Daemon(name, config, socket, supervised)

    # -- the steps ------------------------------------------------------------------------------
    def start_hub(self) -> None:
        folder = self.run_dir / "hub"
        config = _write_yaml(
            folder / "hub.yaml",
            {
                "bind_host": "127.0.0.1",
                "flower_port": free_port(),
                "publish_port": free_port(),
                "fetch_port": free_port(),
                "store_root": str(folder / "adapters"),
                "state_dir": str(folder / "state"),
                "control_socket": str(self.sockets / "hub.sock"),
                "policy": self.options.policy,
                "heartbeat_s": 0.5,
                "keys": {
                    "curve_secret": str(folder / "keys" / "hub.key_secret"),
                    "curve_public": str(folder / "keys" / "hub.key"),
                    "allow_list_dir": str(folder / "allowed"),
                },
                "tls": {
                    "ca_cert": str(folder / "tls" / "ca.crt"),
                    "server_cert": str(folder / "tls" / "server.crt"),
                    "server_key": str(folder / "tls" / "server.key"),
                },
                "runs": {
                    "trigger": "episodes",
                    "min_new_episodes": self.options.episodes,
                    "min_agents": self.options.agents,
                    "rounds": self.options.rounds,
                    "round_timeout_s": 900.0,
                    "run_config": {"local-steps": self.options.local_steps, "lr": self.options.lr},
                },
            },
        )
        self._cli("zk0-hub", "keys", "init", "--config", str(config))
        self.hub = self._daemon(
            "zk0-hub", "zk0-hub", config, self.sockets / "hub.sock", folder / "daemon.log"
        )
        self.hub_config = yaml.safe_load(config.read_text())

    def enrol_and_start_agent(self, agent_id: str) -> None:
        folder = self.run_dir / "agents" / agent_id
        robot = variant_config(CLIENT_VARIANTS[agent_id], self.options.episode_time_s)
        robot_yaml = _write_yaml(
            folder / "robot.yaml", robot.model_dump(mode="json", exclude_none=True)
        )
        hub, keys = self.hub_config, folder / "keys"
        config = _write_yaml(
            folder / "agent.yaml",
            {
                "agent_id": agent_id,
                "robot_config": str(robot_yaml),
                "data_root": str(folder / "data"),
                "policy": self.options.policy,
                "control_socket": str(self.sockets / f"{agent_id}.sock"),
                "train_wait_s": 300.0,
                "hub": {
                    "host": "127.0.0.1",
                    "flower_port": hub["flower_port"],
                    "publish_port": hub["publish_port"],
                    "fetch_port": hub["fetch_port"],
                },
                "keys": {
                    "curve_secret": str(keys / "curve.key_secret"),
                    "curve_public": str(keys / "curve.key"),
                    "hub_curve_public": hub["keys"]["curve_public"],
                    "supernode_private_key": str(keys / "supernode"),
                    "hub_ca_cert": hub["tls"]["ca_cert"],
                },
            },
        )
        self._cli("zk0-agent", "keys", "init", "--config", str(config))
        self._cli(
            "zk0-hub",
            "keys",
            "add",
            agent_id,
            str(keys / "curve.key"),
            "--supernode-key",
            str(keys / "supernode.pub"),
            "--config",
            str(self.hub.config),  # type: ignore[union-attr]
        )
        self.agents.append(
            self._daemon(
                agent_id,
                "zk0-agent",
                config,
                self.sockets / f"{agent_id}.sock",
                folder / "daemon.log",
            )
        )

    def supervise(self) -> None:
        """One supervision turn: restart any daemon that died."""
        for daemon in [self.hub, *self.agents]:
            if daemon is not None:
                daemon.supervised.check()

    def wait(
        self, condition: Callable[[], bool], what: str, timeout_s: float, tick: Callable[[], None]
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"demo: timed out after {timeout_s:.0f} s waiting for {what}")
            self.supervise()
            tick()
            time.sleep(0.5)

    def stop(self) -> None:
        for daemon in [*self.agents, self.hub]:
            if daemon is not None:
                daemon.supervised.stop()


def _write_yaml(path: Path, content: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description:<34}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def run_demo(options: DemoOptions) -> Path:
    run_dir = new_run_dir(options.outputs).resolve()
    setup_logging(run_dir, "demo", console=False)
    console = Console()
    # Unix socket paths are short (107 bytes): the daemons' control sockets live in /tmp.
    with tempfile.TemporaryDirectory(prefix="zk0-demo-") as sockets:
        env = {
            **os.environ,
            RUN_DIR_ENV: str(run_dir),
            "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        demo = Demo(options, run_dir, Path(sockets), env)
        try:
            results = _run(demo, console)
        finally:
            demo.stop()
    _print_table(console, run_dir, results)
    return run_dir


def _run(demo: Demo, console: Console) -> dict[str, Any]:
    options = demo.options
    agent_ids = sorted(CLIENT_VARIANTS)[: options.agents]
    with console.status("starting the hub (SuperLink, distribution, scheduler)"):
        demo.start_hub()
        hub = demo.hub
        assert hub is not None
        demo.wait(lambda: hub.status() is not None, "the hub", 120, lambda: None)
    with console.status(f"enrolling and starting {len(agent_ids)} agents"):
        for agent_id in agent_ids:
            demo.enrol_and_start_agent(agent_id)

        def every_agent_up() -> bool:
            return all(agent.status() is not None for agent in demo.agents)

        demo.wait(every_agent_up, "the agents", 600, lambda: None)
    console.print(f"[green]hub and {len(agent_ids)} agents up[/], run folder", soft_wrap=True)
    console.print(str(demo.run_dir), soft_wrap=True)

    with _progress(console) as bars:
        recording = {
            a.name: bars.add_task(f"{a.name} recording", total=options.episodes, note="")
            for a in demo.agents
        }
        for agent in demo.agents:
            agent.ask("record", episodes=options.episodes)

        def recorded() -> bool:
            done = True
            for agent in demo.agents:
                status = agent.status()
                episodes = status["dataset"]["episodes"] if status else 0
                bars.update(recording[agent.name], completed=episodes)
                done &= status is not None and status["state"] != "recording" and episodes > 0
            return done

        demo.wait(recorded, "the recordings", options.timeout_s, lambda: None)

        rounds = bars.add_task("federated LoRA rounds", total=options.rounds, note="")
        victim = demo.agents[0]

        def federated() -> bool:
            status = hub.status()
            if status is None:
                return False
            run = status.get("run")
            if run is not None:
                bars.update(rounds, completed=run["completed_rounds"], note=f"run {run['index']}")
            last = status.get("last_run")
            if last is not None and last.get("returncode") not in (0, None):
                raise RuntimeError(f"the federated run failed: {last.get('error')}")
            return run is None and status["runs_completed"] >= 1

        def chaos() -> None:
            if options.chaos_kill_round is None or victim.killed:
                return
            status = victim.status()
            training = status.get("training") if status else None
            if training and training["round"] == options.chaos_kill_round:
                assert victim.pid is not None
                os.kill(victim.pid, signal.SIGKILL)
                victim.killed += 1
                logger.warning("chaos: SIGKILLed {} in round {}", victim.name, training["round"])
                bars.update(rounds, note=f"SIGKILLed {victim.name} in round {training['round']}")

        demo.wait(federated, "the federated run", options.timeout_s, chaos)
        bars.update(rounds, completed=options.rounds)

        status = hub.status()
        assert status is not None
        newest = status["current_version"]
        pushed = bars.add_task(f"pushing v{newest} to every agent", total=len(agent_ids), note="")

        def converged() -> bool:
            in_use = [a.status() for a in demo.agents]
            count = sum(1 for s in in_use if s is not None and s["in_use"] == newest)
            bars.update(pushed, completed=count)
            return count == len(agent_ids)

        demo.wait(converged, f"every agent on v{newest}", 300, lambda: None)

        evaluating = bars.add_task(
            "closed-loop async evaluation", total=len(agent_ids) * options.eval_episodes, note=""
        )
        jobs = {
            a.name: a.ask("run_task", episodes=options.eval_episodes)["job"] for a in demo.agents
        }

        def evaluated() -> bool:
            done, episodes = True, 0
            for agent in demo.agents:
                job = (agent.status() or {}).get("job") or {}
                if job.get("id") != jobs[agent.name]["id"] or job["state"] == "running":
                    done = False
                    episodes += len(job.get("progress", []))
                elif job["state"] == "failed":
                    raise RuntimeError(f"{agent.name}: evaluation failed: {job['error']}")
                else:
                    episodes += options.eval_episodes
            bars.update(evaluating, completed=episodes)
            return done

        demo.wait(evaluated, "the evaluations", options.timeout_s, lambda: None)
    agents = {}
    for agent in demo.agents:
        status = agent.status()
        assert status is not None
        agents[agent.name] = {**status, "restarts": agent.supervised.restarts}
    return {"hub": hub.status(), "agents": agents, "newest": newest}


def _print_table(console: Console, run_dir: Path, results: dict[str, Any]) -> None:
    federated_run = Path(results["hub"]["last_run"]["run_dir"])
    history = json.loads((federated_run / HISTORY_FILE).read_text())
    (run_dir / "demo_results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    agents = results["agents"]
    table = Table(
        title=f"zk0 demo: {len(agents)} simulated SO-101 agents, newest version {results['newest']}"
    )
    columns = ("agent", "episodes", "eval MSE round 0 -> last", "success", "adapter", "MB in")
    for column in (*columns, "restarts"):
        table.add_column(column, justify="left" if column == "agent" else "right")
    for agent_id, status in agents.items():
        series = [v for v in history["clients"].get(agent_id, []) if v is not None]
        evaluation = status["job"]["result"]
        rate = evaluation.get("success_rate")
        table.add_row(
            agent_id,
            str(status["dataset"]["episodes"]),
            f"{series[0]:.4f} -> {series[-1]:.4f}" if series else "-",
            "-" if rate is None else f"{rate:.0%}",
            f"v{status['in_use']}",
            f"{status['bytes_received'] / 1e6:.2f}",
            str(status["restarts"]),
        )
    console.print(table)
    for label, path in (
        ("run folder", run_dir),
        ("history", federated_run / HISTORY_FILE),
        ("chart", federated_run / "eval_mse_chart.png"),
    ):
        console.print(f"{label:<11} {path}", soft_wrap=True)  # paths stay whole, to copy
    logger.info("demo finished: {}", run_dir)

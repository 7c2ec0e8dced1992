"""The demo's fleet on one machine: a hub and simulated agents, enrolled and started through
the same commands and daemons as on real machines, each supervised as systemd would (a daemon
that dies is started again). ``zk0.hub.demo`` drives it."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from zk0.shared.config import (
    AgentConfig,
    AgentKeys,
    CanaryConfig,
    HubAddress,
    HubConfig,
    HubKeys,
    HubTls,
    RunsConfig,
)
from zk0.shared.control import Command, ControlError, request
from zk0.shared.dashboard_config import DashboardConfig
from zk0.shared.processes import ManagedProcess, Supervised, free_port
from zk0.shared.sim_variants import CLIENT_VARIANTS, variant_config
from zk0.shared.validation import WireModel

BIN = Path(sys.executable).parent


class DemoOptions(BaseModel):
    """What ``zk0 demo`` runs (its command-line options are these fields)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    agents: Annotated[
        int, Field(ge=1, le=len(CLIENT_VARIANTS), description="Simulated SO-101 agents.")
    ] = 3
    # Sized so that the arms measurably learn their variants within the demo's ~15 minutes on a
    # 2-core CPU (tiny-sim-base succeeds 0/20 on them before any round).
    rounds: Annotated[int, Field(ge=1, description="Federated LoRA rounds.")] = 6
    episodes: Annotated[int, Field(ge=2, description="Episodes each agent records.")] = 12
    episode_time_s: float = 8.0
    policy: Annotated[str, Field(description="The base policy (a zk0 base or a Hub id).")] = (
        "tiny-sim-base"
    )
    local_steps: int = 70
    batch_size: int = 16
    lr: float = 1e-3
    eval_episodes: Annotated[
        int,
        Field(
            ge=0,
            le=1000,
            description="Closed-loop episodes per agent (simulated time, never-recorded scenes, "
            "the same for every version) before the first round and after the last.",
        ),
    ] = 10
    mid_eval_episodes: Annotated[
        int, Field(ge=0, le=1000, description="Closed-loop episodes per agent in between.")
    ] = 1
    outputs: Annotated[Path, Field(description="Root of the run folders.")] = Path("outputs")
    chaos_kill_round: Annotated[
        int | None,
        Field(description="SIGKILL the first agent while it trains in this round (it restarts)."),
    ] = None
    inject_bad_version: Annotated[
        bool,
        Field(
            description="Gate every version on a canary (the last agent), and after the run "
            "publish a broken one (B x -1) through that gate: it must be rejected, reach no "
            "other agent, and the canary go back.",
        ),
    ] = False
    keep_serving: Annotated[
        bool,
        Field(
            description="After the table, leave the hub, its dashboard and the agents running "
            "until Ctrl-C.",
        ),
    ] = False
    timeout_s: float = 3600.0

    @property
    def canary_episodes(self) -> int:
        """Closed-loop episodes a canary scores each version on (kept small: every round
        waits for them)."""
        return max(2, self.mid_eval_episodes)

    @property
    def canary(self) -> CanaryConfig:
        if not self.inject_bad_version:
            return CanaryConfig()
        return CanaryConfig(
            agents=[sorted(CLIENT_VARIANTS)[self.agents - 1]],
            min_episodes=self.canary_episodes,
            timeout_s=600.0,
        )


@dataclass
class Daemon:
    """One supervised daemon and its control socket."""

    name: str
    config: Path
    socket: Path
    supervised: Supervised
    killed: int = 0

    def ask[R: WireModel](self, command: Command[R], timeout_s: float = 10.0) -> R:
        return request(self.socket, command, timeout_s)

    def answer[R: WireModel](self, command: Command[R]) -> R | None:
        """The daemon's answer, or None while it starts, restarts or is busy for a moment."""
        try:
            return self.ask(command, timeout_s=5.0)
        except ControlError:
            return None


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

    def _daemon(self, name: str, program: str, config: Path, log: Path) -> Daemon:
        argv = [str(BIN / program), "run", "--config", str(config)]
        socket = self.sockets / ("hub.sock" if program == "zk0-hub" else f"{name}.sock")
        supervised = Supervised(
            lambda: ManagedProcess(name, argv, self.env, log), min_backoff_s=0.5, max_backoff_s=5
        )
        supervised.start()
        return Daemon(name, config, socket, supervised)

    # -- the steps ------------------------------------------------------------------------------
    def start_hub(self) -> Daemon:
        folder = self.run_dir / "hub"
        self.hub_config = loopback_hub_config(
            folder,
            control_socket=self.sockets / "hub.sock",
            policy=self.options.policy,
            runs=RunsConfig(
                trigger="episodes",
                min_new_episodes=self.options.episodes,
                min_agents=self.options.agents,
                run_config={
                    "num-server-rounds": self.options.rounds,
                    "round-timeout-s": 900.0,
                    "local-steps": self.options.local_steps,
                    "batch-size": self.options.batch_size,
                    "lr": self.options.lr,
                    "success-episodes": self.options.eval_episodes,
                    "mid-success-episodes": self.options.mid_eval_episodes,
                },
            ),
            canary=self.options.canary,
        )
        config = write_config(folder / "hub.yaml", self.hub_config)
        self._cli("zk0-hub", "keys", "init", "--config", str(config))
        self.hub = self._daemon("zk0-hub", "zk0-hub", config, folder / "daemon.log")
        return self.hub

    def enrol_and_start_agent(self, agent_id: str) -> None:
        folder = self.run_dir / "agents" / agent_id
        robot = variant_config(CLIENT_VARIANTS[agent_id], self.options.episode_time_s)
        robot_yaml = write_config(folder / "robot.yaml", robot)
        agent = agent_config(
            self.hub_config,
            agent_id,
            robot_yaml,
            folder,
            policy=self.options.policy,
            control_socket=self.sockets / f"{agent_id}.sock",
            train_wait_s=300.0,
            canary_episodes=self.options.canary_episodes,
        )
        config = write_config(folder / "agent.yaml", agent)
        assert agent.keys is not None and agent.keys.supernode_private_key is not None
        self._cli("zk0-agent", "keys", "init", "--config", str(config))
        self._cli(
            "zk0-hub",
            "keys",
            "add",
            agent_id,
            str(agent.keys.curve_public),
            "--supernode-key",
            str(agent.keys.supernode_private_key.with_suffix(".pub")),
            "--config",
            str(self.hub.config),  # type: ignore[union-attr]
        )
        self.agents.append(self._daemon(agent_id, "zk0-agent", config, folder / "daemon.log"))

    def supervise(self) -> None:
        """One supervision turn: restart any daemon that died."""
        for daemon in [self.hub, *self.agents]:
            if daemon is not None:
                daemon.supervised.check()

    def wait(
        self,
        condition: Callable[[], bool],
        what: str,
        timeout_s: float,
        tick: Callable[[], None] = lambda: None,
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


def write_config(path: Path, config: BaseModel) -> Path:
    """``config`` as the YAML file its loader reads (``load_hub_config`` and the like)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    content = config.model_dump(mode="json", exclude_none=True)
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def loopback_hub_config(folder: Path, **settings: Any) -> HubConfig:
    """A hub on this machine's loopback, on free ports, with its store, state, keys and TLS
    files under ``folder`` (keys made by ``zk0-hub keys init``); ``settings``: further fields."""
    return HubConfig(
        bind_host="127.0.0.1",
        flower_port=free_port(),
        publish_port=free_port(),
        fetch_port=free_port(),
        store_root=folder / "adapters",
        state_dir=folder / "state",
        keys=HubKeys(
            curve_secret=folder / "keys" / "hub.key_secret",
            curve_public=folder / "keys" / "hub.key",
            allow_list_dir=folder / "allowed",
        ),
        tls=HubTls(
            ca_cert=folder / "tls" / "ca.crt",
            server_cert=folder / "tls" / "server.crt",
            server_key=folder / "tls" / "server.key",
        ),
        **{"heartbeat_s": 0.5, "dashboard": DashboardConfig(port=free_port()), **settings},
    )


def agent_config(
    hub: HubConfig, agent_id: str, robot_config: Path, folder: Path, **settings: Any
) -> AgentConfig:
    """An agent on this machine enrolled with ``hub``: its data, keys and the hub's addresses
    under ``folder`` (keys made by ``zk0-agent keys init``); ``settings``: further fields."""
    assert hub.keys is not None and hub.tls is not None
    keys = folder / "keys"
    return AgentConfig(
        agent_id=agent_id,
        robot_config=robot_config,
        data_root=folder / "data",
        hub=HubAddress(
            host="127.0.0.1",
            flower_port=hub.flower_port,
            publish_port=hub.publish_port,
            fetch_port=hub.fetch_port,
        ),
        keys=AgentKeys(
            curve_secret=keys / "curve.key_secret",
            curve_public=keys / "curve.key",
            hub_curve_public=hub.keys.curve_public,
            supernode_private_key=keys / "supernode",
            hub_ca_cert=hub.tls.ca_cert,
        ),
        **settings,
    )

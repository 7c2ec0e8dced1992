"""The hub's Flower SuperLink, in the two ways zk0 runs federations.

* ``SuperLink``: a deployment, with TLS, SuperNode authentication and state in a database file.
  Order matters (Flower 1.42): SuperLink up, agents' node keys registered, then SuperNodes
  connect.
* ``SimulationSuperLink``: Flower's simulation engine on a SuperLink of our own, on a free
  loopback port. (Left to itself, ``flwr run`` starts a managed local SuperLink on a fixed
  port that outlives the run and serves later runs with the first one's environment.)

A run is submitted with ``flwr run`` through a connection zk0 writes into
``$FLWR_HOME/config.toml``; the same connection registers keys.
"""

from __future__ import annotations

import subprocess
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from zk0.hub.flower_app import CLIENT_APP, write_flower_app
from zk0.shared.federation import RunSettings, flower_config_arg
from zk0.shared.flower_keys import TlsFiles
from zk0.shared.processes import ManagedProcess, accepts, flower_env, free_port, wait_for_port

CONNECTION = "zk0"
#: Addresses a server binds to that a client cannot dial; the hub's own ``flwr`` dials loopback.
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def dial_host(bind_host: str) -> str:
    return "127.0.0.1" if bind_host in WILDCARD_HOSTS else bind_host


@dataclass(frozen=True)
class SuperLinkSettings:
    host: str
    port: int
    database: Path
    tls: TlsFiles
    node_auth: bool = True


class _ManagedSuperLink(ABC):
    """A ``flower-superlink`` child, the connection to it, and ``flwr`` commands through it."""

    def __init__(
        self, host: str, port: int, argv: list[str], flwr_home: Path, log_dir: Path
    ) -> None:
        self.host, self.port, self.flwr_home = host, port, flwr_home
        self.env = flower_env(flwr_home)
        binary = str(Path(sys.executable).parent / "flower-superlink")
        argv = [
            binary,
            *argv,
            "--host",
            host,
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",
        ]
        self.process = ManagedProcess("flower-superlink", argv, self.env, log_dir / "superlink.log")

    @property
    def address(self) -> str:
        """Where ``flwr`` (and a readiness check) dials this SuperLink."""
        return f"{dial_host(self.host)}:{self.port}"

    def accepts(self) -> bool:
        return accepts(dial_host(self.host), self.port)

    @abstractmethod
    def connection_toml(self) -> str:
        """This SuperLink's lines of its connection in ``config.toml``, after the address."""

    def write_connection(self) -> None:
        """The ``zk0`` connection in ``$FLWR_HOME/config.toml``, through which ``flwr`` talks to
        this SuperLink (needed before any ``flwr`` command)."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f"[superlink]\ndefault = '{CONNECTION}'\n\n[superlink.{CONNECTION}]\n"
            f"address = '{self.address}'\n{self.connection_toml()}"
        )

    def start(self, timeout_s: float = 60.0) -> None:
        """Start it and wait until it listens (tests and benches; the hub daemon supervises
        ``process`` instead)."""
        self.write_connection()
        wait_for_port(dial_host(self.host), self.port, self.process.start(), timeout_s)

    def run(
        self, settings: RunSettings, timeout_s: float, client_app: str = CLIENT_APP
    ) -> subprocess.CompletedProcess[str]:
        """Submit the zk0 Flower App and stream it to completion (``flwr run --stream``)."""
        return self.flwr(*self.run_args(settings, client_app), timeout_s=timeout_s)

    def run_args(self, settings: RunSettings, client_app: str = CLIENT_APP) -> list[str]:
        """``flwr`` arguments that submit the zk0 Flower App with ``settings`` and stream its
        log. The app is written (from the package) into this SuperLink's Flower home."""
        app = write_flower_app(self.flwr_home / "zk0-app", client_app)
        return [
            "run",
            str(app),
            CONNECTION,
            "--stream",
            "--run-config",
            flower_config_arg(settings.to_flower()),
            *self.run_options(),
        ]

    def run_options(self) -> list[str]:
        """Further ``flwr run`` options this kind of SuperLink needs."""
        return []

    def flwr(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        """A ``flwr`` command (the venv's) through this SuperLink's connection; one that runs
        past ``timeout_s`` is killed and returns 124, as timeout(1) does."""
        argv = [str(Path(sys.executable).parent / "flwr"), *args]
        try:
            return subprocess.run(
                argv, env=self.env, capture_output=True, text=True, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(argv, 124, "", f"flwr timed out after {timeout_s} s")

    def stop(self) -> None:
        self.process.stop()


class SuperLink(_ManagedSuperLink):
    """A deployment SuperLink: TLS, SuperNode authentication, state in a database file."""

    def __init__(self, settings: SuperLinkSettings, flwr_home: Path, log_dir: Path) -> None:
        self.settings = settings
        tls = settings.tls
        argv = [
            "--ssl-ca-certfile",
            str(tls.ca_cert),
            "--ssl-certfile",
            str(tls.server_cert),
            "--ssl-keyfile",
            str(tls.server_key),
            "--database",
            str(settings.database),
        ]
        if settings.node_auth:
            argv.append("--enable-supernode-auth")
        super().__init__(settings.host, settings.port, argv, flwr_home, log_dir)

    def connection_toml(self) -> str:
        return f"root-certificates = '{self.settings.tls.ca_cert.resolve()}'\n"

    def register(self, public_key: Path, name: str) -> None:
        """Admit the SuperNode holding ``public_key``'s private half (an agent's node key)."""
        result = self.flwr("supernode", "register", str(public_key), CONNECTION, "--name", name)
        if result.returncode != 0 and "already" not in result.stdout + result.stderr:
            raise RuntimeError(
                f"registering {name}'s node key failed: {result.stderr.strip()[-300:]}"
            )
        logger.info("registered SuperNode key of {}", name)


class SimulationSuperLink(_ManagedSuperLink):
    """Flower's simulation engine (``num_supernodes`` simulated nodes) on loopback."""

    def __init__(
        self, num_supernodes: int, flwr_home: Path, log_dir: Path, cpus_per_client: int = 1
    ) -> None:
        self.num_supernodes, self.cpus_per_client = num_supernodes, cpus_per_client
        super().__init__(
            "127.0.0.1", free_port(), ["--insecure", "--simulation"], flwr_home, log_dir
        )

    def connection_toml(self) -> str:
        return "insecure = true\n"

    def run_options(self) -> list[str]:
        federation = {
            "num-supernodes": self.num_supernodes,
            "client-resources-num-cpus": self.cpus_per_client,
        }
        return ["--federation-config", flower_config_arg(federation)]

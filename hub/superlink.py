"""The hub's Flower SuperLink: TLS, SuperNode authentication, state in a database file.

Order matters (Flower 1.42): SuperLink up, agents' node keys registered, then SuperNodes
connect. A run is submitted with ``flwr run`` through a connection named in
``$FLWR_HOME/config.toml``; the same connection registers keys.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from zk0.shared.federation import flower_config_arg
from zk0.shared.flower_keys import TlsFiles
from zk0.shared.processes import ManagedProcess, flower_env, wait_for_port

CONNECTION = "zk0"


@dataclass(frozen=True)
class SuperLinkSettings:
    host: str
    port: int
    database: Path
    tls: TlsFiles
    node_auth: bool = True


class SuperLink:
    def __init__(self, settings: SuperLinkSettings, flwr_home: Path, log_dir: Path) -> None:
        self.settings = settings
        self.flwr_home = flwr_home
        self.env = flower_env(flwr_home)
        tls = settings.tls
        argv = [
            str(Path(sys.executable).parent / "flower-superlink"),
            "--ssl-ca-certfile",
            str(tls.ca_cert),
            "--ssl-certfile",
            str(tls.server_cert),
            "--ssl-keyfile",
            str(tls.server_key),
            "--database",
            str(settings.database),
            "--host",
            settings.host,
            "--port",
            str(settings.port),
            "--disable-runtime-dependency-installation",
        ]
        if settings.node_auth:
            argv.append("--enable-supernode-auth")
        self.process = ManagedProcess("flower-superlink", argv, self.env, log_dir / "superlink.log")

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    def start(self, timeout_s: float = 60.0) -> None:
        self._write_connection()
        wait_for_port(self.settings.host, self.settings.port, self.process.start(), timeout_s)

    def _write_connection(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f"[superlink]\ndefault = '{CONNECTION}'\n\n[superlink.{CONNECTION}]\n"
            f"address = '{self.address}'\n"
            f"root-certificates = '{self.settings.tls.ca_cert.resolve()}'\n"
        )

    def register(self, public_key: Path, name: str) -> None:
        """Admit the SuperNode holding ``public_key``'s private half (an agent's node key)."""
        result = self._flwr("supernode", "register", str(public_key), CONNECTION, "--name", name)
        if result.returncode != 0 and "already" not in result.stdout + result.stderr:
            raise RuntimeError(
                f"registering {name}'s node key failed: {result.stderr.strip()[-300:]}"
            )
        logger.info("registered SuperNode key of {}", name)

    def run(
        self, app_dir: Path, run_config: dict[str, Any], timeout_s: float
    ) -> subprocess.CompletedProcess[str]:
        """Submit the zk0 Flower App and stream it to completion (``flwr run --stream``)."""
        return self._flwr(
            "run",
            str(app_dir),
            CONNECTION,
            "--stream",
            "--run-config",
            flower_config_arg(run_config),
            timeout_s=timeout_s,
        )

    def _flwr(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        flwr = str(Path(sys.executable).parent / "flwr")
        return subprocess.run(
            [flwr, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def stop(self) -> None:
        self.process.stop()

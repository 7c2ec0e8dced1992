"""The agent's Flower SuperNode: connects to the hub's SuperLink over TLS with its node key and
carries the agent's :class:`~zk0.shared.federation.NodeSettings` as its node config."""

from __future__ import annotations

import sys
from pathlib import Path

from zk0.shared.federation import NodeSettings, flower_config_arg
from zk0.shared.processes import ManagedProcess, flower_env


class SuperNode:
    def __init__(
        self,
        settings: NodeSettings,
        *,
        superlink: str,
        root_certificates: Path,
        private_key: Path,
        port: int,
        flwr_home: Path,
        log_dir: Path,
    ) -> None:
        node = settings.model_copy(update={"data_root": settings.data_root.resolve()})
        argv = [
            str(Path(sys.executable).parent / "flower-supernode"),
            "--superlink",
            superlink,
            "--root-certificates",
            str(root_certificates),
            "--auth-supernode-private-key",
            str(private_key),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--node-config",
            flower_config_arg(node.to_flower()),
        ]
        self.process = ManagedProcess(
            f"flower-supernode[{settings.agent_id}]",
            argv,
            flower_env(flwr_home),
            log_dir / "supernode.log",
        )

    def start(self) -> None:
        self.process.start()

    def stop(self) -> None:
        self.process.stop()

"""The agent's Flower SuperNode: connects to the hub's SuperLink over TLS with its node key."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from zk0.shared.federation import flower_config_arg
from zk0.shared.processes import ManagedProcess, flower_env


class SuperNode:
    def __init__(
        self,
        *,
        agent_id: str,
        superlink: str,
        root_certificates: Path,
        private_key: Path,
        data_root: Path,
        port: int,
        flwr_home: Path,
        log_dir: Path,
        node_options: dict[str, Any] | None = None,
    ) -> None:
        """``node_options``: further node config (``control-socket``, ``train-wait-s``, ...)."""
        node_config = flower_config_arg(
            {"agent-id": agent_id, "data-root": str(data_root.resolve()), **(node_options or {})}
        )
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
            node_config,
        ]
        self.process = ManagedProcess(
            f"flower-supernode[{agent_id}]", argv, flower_env(flwr_home), log_dir / "supernode.log"
        )

    def start(self) -> None:
        self.process.start()

    def stop(self) -> None:
        self.process.stop()

"""Settings of a federated run, shared by the hub's ServerApp and the agents' ClientApp.

They arrive as Flower's run config (``[tool.flwr.app.config]`` in pyproject.toml, overridden
with ``flwr run --run-config``) and node config (``flower-supernode --node-config``); both are
validated here, at the edge, so a typo fails the run with one line instead of deep in a round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from zk0.shared.config import AGENT_ID_PATTERN, ConfigError
from zk0.shared.lora import LoraSpec

# Record names in the messages between ServerApp and ClientApp.
ARRAYS_KEY = "arrays"  # ArrayRecord: adapter tensors (PEFT names)
METRICS_KEY = "metrics"  # MetricRecord: num-examples, losses, eval-mse, ...
CONFIG_KEY = "config"  # ConfigRecord from the hub: server-round, normalization
META_KEY = "meta"  # ConfigRecord in every reply: agent-id
STATS_KEY = "stats"  # ConfigRecord in a query reply: normalization (JSON bytes)
AGENT_ID = "agent-id"
EXAMPLES = "num-examples"
EVAL_MSE = "eval-mse"
TRAIN_SECONDS = "train-seconds"
NORMALIZATION = "normalization"

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROBOT_CONFIG = REPO_ROOT / "robot_configs" / "sim_so101.yaml"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def flower_config_arg(values: dict[str, Any]) -> str:
    """Flower's ``--run-config``/``--node-config`` syntax: ``key=value`` pairs, TOML values."""
    return " ".join(f"{key}={_toml_value(value)}" for key, value in values.items())


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @classmethod
    def parse(cls, raw: dict[str, Any], where: str) -> Any:
        """Validate Flower's dashed keys (``local-steps``) as fields (``local_steps``)."""
        try:
            return cls.model_validate({key.replace("-", "_"): value for key, value in raw.items()})
        except ValidationError as error:
            first = error.errors()[0]
            field = ".".join(str(part) for part in first["loc"]).replace("_", "-")
            raise ConfigError(f"{where}: {field}: {first['msg']}") from None


class RunSettings(_Settings):
    """One federated run: which base, how many rounds, how clients train and are aggregated."""

    policy: str = "tiny-sim-base"
    robot_config: str = ""
    num_server_rounds: int = Field(default=3, ge=1, le=10_000)
    local_steps: int = Field(default=20, ge=1)
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=1e-4, gt=0)
    aggregation: Literal["fedavg", "svd", "ffa"] = "fedavg"
    lora_rank: int = Field(default=16, ge=1)
    lora_alpha: float = Field(default=32.0, gt=0)
    lora_dropout: float = Field(default=0.1, ge=0, lt=1)
    min_nodes: int = Field(default=2, ge=1)
    fraction_train: float = Field(default=1.0, gt=0, le=1)
    round_timeout_s: float = Field(default=600.0, gt=0)
    eval_frames: int = Field(default=24, ge=1)
    seed: int = 0
    store_root: str = ""
    run_dir: str = ""
    sim_data_root: str = ""

    @property
    def lora(self) -> LoraSpec:
        return LoraSpec(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout)

    @property
    def robot_config_path(self) -> Path:
        return Path(self.robot_config) if self.robot_config else DEFAULT_ROBOT_CONFIG

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> RunSettings:
        settings: RunSettings = cls.parse(dict(run_config), "run config")
        return settings


class NodeSettings(_Settings):
    """One SuperNode: which agent it is and where that agent's dataset lives."""

    agent_id: str = Field(pattern=AGENT_ID_PATTERN)
    data_root: Path
    #: CPU threads for torch in the ClientApp. One by default: on a robot PC the arm's control
    #: loop and policy come first, and oversubscribed cores make torch 10-80x slower.
    torch_threads: int = Field(default=1, ge=1, le=256)
    #: The agent daemon's control socket: ask it before using the compute (empty: no daemon,
    #: e.g. a SuperNode started on its own).
    control_socket: str = ""
    train_wait_s: float = Field(default=120.0, ge=0)

    @field_validator("data_root")
    @classmethod
    def _exists(cls, value: Path) -> Path:
        if not (value / "meta" / "info.json").is_file():
            raise ValueError(f"{value} is not a LeRobot dataset (no meta/info.json)")
        return value

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any], run: RunSettings) -> NodeSettings:
        """Deployment nodes name their agent id and data root; simulated ones get a partition."""
        raw = dict(node_config)
        if "partition-id" in raw and "agent-id" not in raw:
            if not run.sim_data_root:
                raise ConfigError("run config: sim-data-root is required in simulation")
            agent_id = f"sim-{int(raw['partition-id']):02d}"
            raw = {"agent-id": agent_id, "data-root": str(Path(run.sim_data_root) / agent_id)}
        keys = ("agent-id", "data-root", "torch-threads", "control-socket", "train-wait-s")
        known: dict[str, Any] = {key: raw[key] for key in keys if key in raw}
        settings: NodeSettings = cls.parse(known, "node config")
        return settings

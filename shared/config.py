"""Configuration models, validated at the edge and loaded from YAML.

Every model forbids unknown keys, so a typo in a robot's YAML fails at start-up with one line
naming the file and the field instead of being silently ignored on a real arm.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from zk0.shared.adapter_bounds import AdapterBounds
from zk0.shared.dashboard_config import DashboardConfig
from zk0.shared.distribution.limits import DistributionLimits
from zk0.shared.validation import ConfigError as ConfigError
from zk0.shared.validation import load_yaml_model
from zk0.shared.video import VideoConfig

#: LeRobot's convention for SmolVLA checkpoints: cameras feed these keys, missing ones are
#: declared as ``empty_cameras``. The tiny bases use camera1 = front, camera2 = wrist.
POLICY_IMAGE_KEYS = (
    "observation.images.camera1",
    "observation.images.camera2",
    "observation.images.camera3",
)
AGENT_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
REAL_ROBOT_TYPES = ("so100_follower", "so101_follower")
ROBOT_TYPES = (*REAL_ROBOT_TYPES, "sim_so101", "synthetic")
#: LeRobot's SO-100/SO-101 follower reports these six motors (5 in degrees, gripper 0..100).
SO_ARM_JOINTS = (
    "shoulder_pan",
    "shoulder_lift",
    "elbow_flex",
    "wrist_flex",
    "wrist_roll",
    "gripper",
)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CameraConfig(StrictModel):
    """One physical (or simulated) camera and the policy input it feeds."""

    type: Literal["opencv", "sim", "synthetic"] = "opencv"
    index_or_path: int | str | None = None
    width: Annotated[int, Field(gt=0, le=4096)]
    height: Annotated[int, Field(gt=0, le=4096)]
    fps: Annotated[int, Field(gt=0, le=240)] = 30
    policy_key: str

    @field_validator("policy_key")
    @classmethod
    def _known_policy_key(cls, value: str) -> str:
        if value not in POLICY_IMAGE_KEYS:
            raise ValueError(f"must be one of {', '.join(POLICY_IMAGE_KEYS)}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _opencv_needs_device(self) -> Self:
        if self.type == "opencv" and self.index_or_path is None:
            raise ValueError("an opencv camera needs index_or_path (e.g. 0 or /dev/video0)")
        return self


class ArmConfig(StrictModel):
    """A LeRobot robot or teleoperator: its registered type, its id and its serial port."""

    type: str
    id: Annotated[str, Field(min_length=1, max_length=64)]
    port: str | None = None
    calibration_dir: Path | None = None


class RobotConfig(StrictModel):
    """What an agent needs to know about its arm: follower, leader, cameras, timing, task."""

    robot: ArmConfig
    leader: ArmConfig | None = None
    cameras: dict[str, CameraConfig]
    fps: Annotated[int, Field(gt=0, le=240)] = 30
    task: str
    max_task_chars: Annotated[int, Field(gt=0, le=1000)] = 30
    episode_time_s: Annotated[float, Field(gt=0)] = 20.0
    reset_time_s: Annotated[float, Field(ge=0)] = 5.0
    video: VideoConfig = Field(default_factory=VideoConfig)
    #: Backend-specific options (e.g. the simulated arm's task variant); validated by the backend.
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("robot")
    @classmethod
    def _known_robot(cls, robot: ArmConfig) -> ArmConfig:
        if robot.type not in ROBOT_TYPES:
            raise ValueError(f"type must be one of {', '.join(ROBOT_TYPES)}, got {robot.type!r}")
        if robot.type in REAL_ROBOT_TYPES and not robot.port:
            raise ValueError(f"port is required for a real arm ({robot.type})")
        return robot

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if not self.cameras:
            raise ValueError("cameras: at least one camera is required")
        keys = [camera.policy_key for camera in self.cameras.values()]
        if len(set(keys)) != len(keys):
            raise ValueError(f"cameras: two cameras feed the same policy key ({sorted(keys)})")
        if not self.task.strip():
            raise ValueError("task: must not be empty")
        if len(self.task) > self.max_task_chars:
            raise ValueError(
                f"task: {len(self.task)} characters, more than max_task_chars={self.max_task_chars}"
            )
        if self.leader is not None and self.robot.type in REAL_ROBOT_TYPES and not self.leader.port:
            raise ValueError("leader: port is required for a real leader arm")
        return self

    @property
    def joint_names(self) -> tuple[str, ...]:
        """Motor names in the order LeRobot's SO follower reports them (state and action)."""
        return SO_ARM_JOINTS

    def image_shapes(self) -> dict[str, tuple[int, int, int]]:
        """Policy image key -> (channels, height, width) as this arm delivers it."""
        return {c.policy_key: (3, c.height, c.width) for c in self.cameras.values()}


def dataset_root_for(data_root: Path, robot: RobotConfig) -> Path:
    return Path(data_root) / "datasets" / robot.robot.id


class HubAddress(StrictModel):
    host: str = "127.0.0.1"
    flower_port: Annotated[int, Field(gt=0, lt=65536)] = 9092
    publish_port: Annotated[int, Field(gt=0, lt=65536)] = 5556
    fetch_port: Annotated[int, Field(gt=0, lt=65536)] = 5557


class AgentKeys(StrictModel):
    curve_secret: Path
    curve_public: Path
    hub_curve_public: Path
    #: Flower SuperNode authentication (ECDSA, OpenSSH format) and the hub's TLS CA certificate.
    supernode_private_key: Path | None = None
    hub_ca_cert: Path | None = None


class AgentCompute(StrictModel):
    """How an agent shares its workstation with federated rounds (agent.yaml; the agent daemon
    hands the same fields to its SuperNode's ClientApp as node config)."""

    #: How long a federated round waits for the arm and the compute before the agent skips it
    #: (the hub counts it as dropped): recording and a running policy come first.
    train_wait_s: Annotated[float, Field(ge=0)] = 120.0
    #: CPU threads for torch in training and inference: the control loop needs cores too, and
    #: oversubscribed cores make torch 10-80x slower.
    torch_threads: Annotated[int, Field(ge=1, le=256)] = 1


class AgentConfig(AgentCompute):
    """One robot workstation. ``agent_id`` names the arm in logs, keys, Flower and eval history."""

    agent_id: str = Field(pattern=AGENT_ID_PATTERN)
    robot_config: Path
    data_root: Path
    hub: HubAddress = HubAddress()
    keys: AgentKeys | None = None
    policy: str = "lerobot/smolvla_base"
    #: The daemon's local control socket (its CLI and its round worker); default
    #: ``<data_root>/agent.sock``.
    control_socket: Path | None = None
    distribution_limits: DistributionLimits = Field(default_factory=DistributionLimits)
    #: How far a version may move the base before the agent refuses to run it.
    adapter_bounds: AdapterBounds = AdapterBounds()
    #: Canary rollout: closed-loop episodes per version when this (simulated) arm evaluates a
    #: version under gate; at least the hub's ``canary.min_episodes``.
    canary_episodes: Annotated[int, Field(ge=0, le=1000)] = 10
    #: CPU niceness of the round worker (``nice``, 0-19): where training and the control loop
    #: or a running policy want the same cores, the scheduler serves the arm first (0: equal
    #: priority). ``zk0 bench federated --parts control`` counts an arm's ticks beside training.
    round_worker_nice: Annotated[int, Field(ge=0, le=19)] = 10

    def load_robot_config(self) -> RobotConfig:
        return load_robot_config(self.robot_config)

    @property
    def control_socket_path(self) -> Path:
        return self.control_socket or self.data_root / "agent.sock"

    def dataset_root(self, robot: RobotConfig) -> Path:
        """The arm's LeRobot dataset: ``<data_root>/datasets/<robot id>``."""
        return dataset_root_for(self.data_root, robot)


class HubKeys(StrictModel):
    curve_secret: Path
    curve_public: Path
    #: Admitted agents' CURVE keys (``<agent id>.key``); their Flower SuperNode public keys
    #: live in its ``supernodes/`` subfolder (``<agent id>.pub``, see ``zk0.hub.enrolment``).
    allow_list_dir: Path


class HubTls(StrictModel):
    """The SuperLink's TLS files (``zk0-hub keys init`` makes them with a private CA).

    Agents need ``ca_cert`` (their ``keys.hub_ca_cert``); the server certificate must name,
    in its SAN, the address agents dial."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


#: Run-config keys the hub sets itself from other fields; ``runs.run_config`` may not set them.
HUB_SET_RUN_KEYS = {
    "policy": "policy",
    "min-nodes": "runs.min_agents",
    "store-root": "store_root",
    "run-dir": "(a fresh run folder per run)",
    "gate-timeout-s": "canary.timeout_s (when canaries are configured)",
}


class RunsConfig(StrictModel):
    """When the hub starts a federated run, and with which Flower run config.

    ``episodes``: as soon as ``min_agents`` online agents each report at least
    ``min_new_episodes`` episodes recorded since their last round. ``schedule``: every
    ``every_s`` seconds, if ``min_agents`` agents are online. ``manual``: only on
    ``zk0-hub start-run``. Never while a run is active, nor within ``cooldown_s`` of the
    last run's end (a manual start skips only the cooldown).
    """

    trigger: Literal["episodes", "schedule", "manual"] = "episodes"
    min_new_episodes: Annotated[int, Field(ge=0)] = 20
    #: Online agents needed to start a run; also the run's ``min-nodes``.
    min_agents: Annotated[int, Field(ge=1)] = 2
    every_s: Annotated[float, Field(gt=0)] | None = None
    cooldown_s: Annotated[float, Field(ge=0)] = 60.0
    #: The run's settings (``num-server-rounds``, ``round-timeout-s``, ``local-steps``, ``lr``,
    #: ...): ``zk0.shared.federation.RunSettings``, whose defaults apply to what is not given.
    #: Keys dashed, as Flower spells them, or with underscores.
    run_config: dict[str, str | int | float | bool] = Field(default_factory=dict)

    @field_validator("run_config")
    @classmethod
    def _known_run_keys(
        cls, value: dict[str, str | int | float | bool]
    ) -> dict[str, str | int | float | bool]:
        # Imported here: zk0.shared.federation imports this module.
        from zk0.shared.federation import RunSettings

        known = sorted(key for key in RunSettings.flower_keys() if key not in HUB_SET_RUN_KEYS)
        dashed = {key.replace("_", "-"): item for key, item in value.items()}
        for key in dashed:
            if key in HUB_SET_RUN_KEYS:
                raise ValueError(f"{key!r} is set by the hub from {HUB_SET_RUN_KEYS[key]}")
            if key not in known:
                raise ValueError(
                    f"unknown Flower run-config key {key!r} (known: {', '.join(known)})"
                )
        try:  # the values too: a bad lr fails here, not an hour later in the first round
            RunSettings.from_flower(dashed, "run config")
        except ConfigError as error:
            raise ValueError(str(error).removeprefix("run config: ")) from None
        return dashed

    @model_validator(mode="after")
    def _schedule_needs_period(self) -> Self:
        if self.trigger == "schedule" and self.every_s is None:
            raise ValueError("every_s is required when trigger is schedule")
        return self


class CanaryConfig(StrictModel):
    """Eval-gated canary rollout (``canary:`` in hub.yaml; ``zk0.hub.gate``).

    With canaries (``agents`` or a ``fraction``), a version a round produces goes to them alone;
    each evaluates it against the version the fleet runs and reports; the hub promotes it to the
    fleet or rejects it (the canaries then go back). Without canaries, every version goes to
    every agent at once.
    """

    agents: list[Annotated[str, Field(pattern=AGENT_ID_PATTERN)]] = Field(
        default_factory=list, description="Agent ids that receive every version first."
    )
    fraction: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="Besides `agents`: this fraction of the known fleet (rounded up), drawn per "
        "version.",
    )  # fmt: skip
    min_episodes: int = Field(
        default=10, ge=0, le=10_000,
        description="Closed-loop episodes needed per canary (0: a gate on held-out MSE alone).",
    )  # fmt: skip
    margin_pp: float = Field(
        default=5.0, ge=0.0, le=100.0,
        description="Reject when the upper end of the candidate's 95 % success interval lies "
        "more than this many points below the current version's rate.",
    )  # fmt: skip
    mse_margin: float = Field(
        default=0.05, ge=0.0, le=10.0,
        description="Reject when the candidate's MSE exceeds the current's by over this fraction.",
    )  # fmt: skip
    timeout_s: float = Field(
        default=1800.0, gt=0.0, le=7 * 86400.0,
        description="Reject when the canaries have not all reported by then.",
    )  # fmt: skip

    @property
    def enabled(self) -> bool:
        return bool(self.agents) or self.fraction > 0


class HubConfig(StrictModel):
    """The hub server: where it listens, where it keeps adapters, keys and its state."""

    bind_host: str = "127.0.0.1"
    flower_port: Annotated[int, Field(gt=0, lt=65536)] = 9092
    publish_port: Annotated[int, Field(gt=0, lt=65536)] = 5556
    fetch_port: Annotated[int, Field(gt=0, lt=65536)] = 5557
    store_root: Path
    keys: HubKeys | None = None
    tls: HubTls | None = None
    policy: str = "lerobot/smolvla_base"
    heartbeat_s: Annotated[float, Field(gt=0)] = 1.0
    #: SuperLink database, Flower home, enrolment registry and (by default) the control socket.
    #: Default ``<store_root>/../hub-state``: derived from this file alone (not systemd's
    #: ``$STATE_DIRECTORY``), so ``zk0-hub status`` run by an operator finds the daemon's socket.
    state_dir: Path | None = None
    #: The daemon's control socket (``zk0-hub status``); default ``<state dir>/hub.sock``.
    control_socket: Path | None = None
    runs: RunsConfig = Field(default_factory=RunsConfig)
    distribution_limits: DistributionLimits = Field(default_factory=DistributionLimits)
    canary: CanaryConfig = Field(default_factory=CanaryConfig)
    dashboard: DashboardConfig = Field(default_factory=DashboardConfig)

    @model_validator(mode="after")
    def _distinct_ports(self) -> Self:
        ports = [self.flower_port, self.publish_port, self.fetch_port, self.dashboard.port]
        if len(set(ports)) != len(ports):
            raise ValueError(f"ports must differ (flower, publish, fetch, dashboard): {ports}")
        return self

    @property
    def hub_state_dir(self) -> Path:
        return self.state_dir or self.store_root.parent / "hub-state"

    @property
    def control_socket_path(self) -> Path:
        return self.control_socket or self.hub_state_dir / "hub.sock"


#: The robot configs shipped in the package (``robot_configs/`` in the source tree).
SHIPPED_ROBOT_CONFIGS = "zk0.robot_configs"
#: What a run, a bench or a command falls back to: the simulated SO-101.
DEFAULT_ROBOT_CONFIG = "sim_so101"


def shipped_robot_configs() -> list[str]:
    """Names of the robot configs shipped with zk0 (``sim_so101``, ``so101``, ...)."""
    folder = files(SHIPPED_ROBOT_CONFIGS)
    return sorted(
        entry.name.removesuffix(".yaml")
        for entry in folder.iterdir()
        if entry.name.endswith(".yaml")
    )


def robot_config_path(name_or_path: str | Path) -> Path:
    """A robot config file: a path as given, or the name of one shipped with zk0.

    A bare name (``sim_so101``, no folder, no ``.yaml``) that is not a file here means the
    shipped config of that name, so commands work the same from a source checkout, a wheel or
    the image.
    """
    text = str(name_or_path)
    if Path(text).exists() or "/" in text or text.endswith((".yaml", ".yml")):
        return Path(text)
    shipped = files(SHIPPED_ROBOT_CONFIGS) / f"{text}.yaml"
    if not isinstance(shipped, Path) or not shipped.is_file():
        known = ", ".join(shipped_robot_configs())
        raise ConfigError(f"{text}: no such file, nor a robot config shipped with zk0 ({known})")
    return shipped


def load_robot_config(path: str | Path) -> RobotConfig:
    """A robot config from a file, or by the name of a shipped one (see ``robot_config_path``)."""
    return load_yaml_model(robot_config_path(path), RobotConfig)


def load_agent_config(path: Path) -> AgentConfig:
    return load_yaml_model(path, AgentConfig)


def load_hub_config(path: Path) -> HubConfig:
    return load_yaml_model(path, HubConfig)

"""Settings of a federated run and of each SuperNode: declared once here, serialised from here.

They travel as Flower's flat configs: the run config (``flwr run --run-config``, which the hub
writes from :class:`RunSettings`) and each SuperNode's node config (``flower-supernode
--node-config``, which the agent daemon writes from :class:`NodeSettings`). Each model turns
itself into that config (:meth:`FlowerSettings.to_flower`) and back
(:meth:`FlowerSettings.from_flower`), validating at the edge, so a typo fails the run with one
line instead of deep in a round. Flower spells keys with dashes (``local-steps``); the models
with underscores (``local_steps``); nothing else spells them.
"""

from __future__ import annotations

from collections.abc import Mapping
from copy import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator

from zk0.shared.adapter_bounds import AdapterBounds
from zk0.shared.config import (
    AGENT_ID_PATTERN,
    DEFAULT_ROBOT_CONFIG,
    AgentCompute,
    ConfigError,
    StrictModel,
    robot_config_path,
)
from zk0.shared.lora import LoraSpec
from zk0.shared.validation import describe
from zk0.shared.wire_delta import WireEncoding

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
#: Reply metrics, where a round's time goes on the agent (seconds): the whole task (model set-up
#: included; ``train-seconds`` is the optimizer steps alone), the ClientApp process's start until
#: it ran, and the hand-over to the round worker and back (0 without one).
TASK_SECONDS = "task-seconds"
CLIENTAPP_START_SECONDS = "clientapp-start-seconds"
HANDOVER_SECONDS = "handover-seconds"
NORMALIZATION = "normalization"
#: Evaluate config: closed-loop episodes the hub asks for this round (0: none).
SUCCESS_EPISODES_ASKED = "success-episodes-asked"
#: Evaluate reply metrics (ints): successes and episodes run on the simulated arm. Absent where
#: no episode ran (a real arm, no robot config, none asked).
SUCCESS_COUNT = "success-count"
SUCCESS_EPISODES = "success-episodes"
#: Train config, optional: the hub's version number of the adapter the message carries (an arm
#: records it with its local revision in the personalized mode; absent: not recorded).
FLEET_VERSION = "fleet-version"

FlowerValue = str | int | float | bool


def _toml_value(value: FlowerValue) -> str:
    if isinstance(value, bool | int | float):
        return str(value).lower() if isinstance(value, bool) else repr(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def flower_config_arg(values: Mapping[str, FlowerValue]) -> str:
    """Flower's ``--run-config``/``--node-config`` syntax: ``key=value`` pairs, TOML values."""
    return " ".join(f"{key}={_toml_value(value)}" for key, value in values.items())


def flower_key(field: str) -> str:
    return field.replace("_", "-")


class FlowerSettings(StrictModel):
    """Settings that travel as one of Flower's flat configs (dashed keys, TOML scalars)."""

    @classmethod
    def from_flower(cls, raw: Mapping[str, Any], where: str) -> Self:
        """Validate Flower's dashed keys (``local-steps``) as fields (``local_steps``)."""
        try:
            return cls.model_validate({key.replace("-", "_"): value for key, value in raw.items()})
        except ValidationError as error:
            raise ConfigError(f"{where}: {describe(error, dashed=True)}") from None

    def to_flower(self) -> dict[str, FlowerValue]:
        """The config Flower carries: every field, dashed, paths as text."""
        values: dict[str, FlowerValue] = {}
        for name, value in self.model_dump().items():
            values[flower_key(name)] = str(value) if isinstance(value, Path) else value
        return values

    @classmethod
    def flower_keys(cls) -> list[str]:
        return [flower_key(name) for name in cls.model_fields]


def _help(text: str) -> Any:
    return Field(description=text)


def _field_of(model: type[BaseModel], name: str) -> Any:
    """A field declared as ``model``'s ``name`` is (default, bounds and help): one declaration."""
    return copy(model.model_fields[name])


class RunSettings(FlowerSettings):
    """One federated run: which base, how many rounds, how clients train and are aggregated.

    The defaults here are the run's defaults everywhere: the Flower App the hub submits carries
    them (``zk0.hub.flower_app``) and ``runs.run_config`` in hub.yaml overrides them.
    """

    policy: Annotated[str, _help("Base policy: a Hub id, a checkpoint folder or a zk0 base.")] = (
        "tiny-sim-base"
    )
    robot_config: Annotated[
        str, _help("Robot config whose cameras and joints shape the policy (file or name).")
    ] = DEFAULT_ROBOT_CONFIG
    num_server_rounds: Annotated[int, Field(ge=1, le=10_000, description="Rounds per run.")] = 3
    local_steps: Annotated[int, Field(ge=1, description="Optimizer steps per client round.")] = 20
    batch_size: Annotated[int, Field(ge=1, description="Frames per training batch.")] = 8
    lr: Annotated[float, Field(gt=0, description="Learning rate of the LoRA factors.")] = 1e-4
    aggregation: Annotated[
        Literal["fedavg", "svd", "ffa"], _help("How client adapters are merged.")
    ] = "fedavg"
    # int8: a version is its parent plus an int8 difference, half the bytes (zk0.shared.wire_delta)
    wire_encoding: Annotated[
        WireEncoding, _help("How versions travel to the arms that hold their parent.")
    ] = "bf16"
    # Robust aggregation (zk0.hub.robust), for every mode: replies are scored by their update's
    # norm, and its distance and direction to the fleet's median update, clipped, rejected,
    # their self-reported example counts capped; the shared normalization statistics get the
    # same count cap and outlier test. The defaults leave honest replies of comparable size
    # untouched.
    clip_norm_factor: Annotated[
        float,
        Field(
            ge=0,
            le=1000,
            description="Clip a reply's update norm to this many times the median reply's "
            "(0: off; >= 2 never clips either of two replies).",
        ),
    ] = 3.0
    reject_distance_factor: Annotated[
        float,
        Field(
            ge=0,
            le=1000,
            description="Drop a reply (3 or more) whose update lies farther from the fleet's "
            "median update than this many times the typical distance (0: off, else >= 2, "
            "which always keeps the majority).",
        ),
    ] = 4.0
    min_relative_cosine: Annotated[
        float,
        Field(
            ge=0,
            le=1,
            description="Drop a reply (3 or more) whose update's cosine with the fleet's median "
            "update is below this share of the median reply's cosine: a reversed step or "
            "noise at an honest norm (0: off; <= 1 always keeps the majority).",
        ),
    ] = 0.3
    order_statistic: Annotated[
        Literal["none", "trimmed-mean", "median"],
        _help(
            "Combine replies coordinate-wise by a trimmed mean or median, ignoring example "
            "counts, for fleets that expect faulty arms (none: the mode's weighted mean)."
        ),
    ] = "none"
    trim_fraction: Annotated[
        float,
        Field(
            ge=0,
            lt=0.5,
            description="Share of replies the trimmed mean drops at each end, per coordinate.",
        ),
    ] = 0.3
    max_client_share: Annotated[
        float,
        Field(
            gt=0,
            le=1,
            description="Largest share of a round's weight (and of the shared statistics' "
            "count) one agent's example count can claim; binding with 2/share agents or more, "
            "else twice the equal share 2/agents (two agents weigh as reported).",
        ),
    ] = 0.25
    stats_outlier_z: Annotated[
        float,
        Field(
            ge=0,
            description="Drop an agent's normalization statistics (3 or more agents) whose mean "
            "or std lies more than this many robust z-scores from the others' (0: off).",
        ),
    ] = 10.0
    # What the hub stores (zk0.shared.adapter_bounds): a merged adapter out of these bounds is
    # neither published nor trained on; the round keeps the previous adapter.
    max_relative_norm: float = _field_of(AdapterBounds, "max_relative_norm")
    max_growth: float = _field_of(AdapterBounds, "max_growth")
    # The server optimizer on the aggregated delta (zk0.hub.server_optimizer), with Flower's
    # update rules: FedAvgM (server_learning_rate, server_momentum), FedAdam (eta, beta_1,
    # beta_2, tau). One η for both: each optimizer reads only its own fields.
    server_optimizer: Annotated[
        Literal["none", "fedavgm", "fedadam"],
        _help("Server optimizer on the aggregated adapter delta: none, fedavgm or fedadam."),
    ] = "none"
    server_lr: Annotated[
        float,
        Field(
            gt=0,
            le=10,
            description="Server learning rate η (FedAdam moves a weight up to ~η a step).",
        ),
    ] = 1.0
    server_momentum: Annotated[
        float, Field(ge=0, lt=1, description="FedAvgM's momentum β: v = β·v + Δ.")
    ] = 0.9
    server_beta1: Annotated[
        float, Field(ge=0, lt=1, description="FedAdam's first-moment decay β1.")
    ] = 0.9
    server_beta2: Annotated[
        float, Field(ge=0, lt=1, description="FedAdam's second-moment decay β2.")
    ] = 0.99
    server_tau: Annotated[
        float, Field(gt=0, le=1, description="FedAdam's adaptivity τ, added to √v.")
    ] = 1e-3
    # LoraSpec's own fields (default, bounds, help), flat as Flower's run config needs them.
    lora_rank: int = _field_of(LoraSpec, "rank")
    lora_alpha: float = _field_of(LoraSpec, "alpha")
    lora_dropout: float = _field_of(LoraSpec, "dropout")
    # Personalized mode (zk0.agent.personal_round): every arm also trains a local LoRA adapter
    # (alpha = 2 x rank) that never leaves it; the shared adapter is aggregated as without it.
    # The default, chosen by `zk0 bench learning` (README, "Which federated mode"): the only
    # mode that beat each arm training alone on closed-loop success there.
    personal_rank: Annotated[
        int,
        Field(ge=0, le=64, description="Rank of each arm's local adapter, never sent (0: off)."),
    ] = 4
    min_nodes: Annotated[int, Field(ge=1, description="SuperNodes a round needs.")] = 2
    fraction_train: Annotated[
        float, Field(gt=0, le=1, description="Share of nodes asked to train.")
    ] = 1.0
    round_timeout_s: Annotated[
        float, Field(gt=0, description="How long a round waits for replies.")
    ] = 600.0
    eval_frames: Annotated[int, Field(ge=1, description="Held-out frames per evaluation.")] = 24
    # Closed-loop evaluation in simulated time (zk0.agent.inference.simulated), on nodes whose
    # arm is the simulated one; a real arm never moves for a round. Episodes cost seconds each,
    # so rounds in between may ask for fewer than the two ends that frame the run.
    success_episodes: Annotated[
        int,
        Field(
            ge=0,
            le=1000,
            description="Closed-loop episodes per simulated agent at round 0 and the last round "
            "(0: no closed-loop evaluation).",
        ),
    ] = 0
    mid_success_episodes: Annotated[
        int,
        Field(
            ge=0,
            le=1000,
            description="Closed-loop episodes per simulated agent at the rounds in between "
            "(needs success-episodes > 0).",
        ),
    ] = 0
    seed: Annotated[int, _help("Seed of training batches, evaluation frames and scenes.")] = 0
    store_root: Annotated[str, _help("The hub's adapter store (empty: in the run folder).")] = ""
    run_dir: Annotated[str, _help("Folder of this run's history and logs (empty: a new one).")] = ""
    gate_timeout_s: Annotated[
        float,
        Field(
            ge=0,
            le=7 * 86400,
            description="Set by the hub from canary.timeout_s: a round's version waits for the "
            "canary gate (0: no gate, every version goes to the fleet at once).",
        ),
    ] = 0.0
    sim_data_root: Annotated[
        str, _help("Simulation only: folder of one dataset per simulated agent.")
    ] = ""

    @field_validator("server_optimizer")
    @classmethod
    def _optimizer_needs_a_stable_basis(cls, value: str, info: ValidationInfo) -> str:
        # Refused rather than applied to ΔW: svd re-factors B and A in a new basis every round,
        # so a momentum of the factors would add up vectors of unrelated bases.
        if value != "none" and info.data.get("aggregation") == "svd":
            raise ValueError(
                f"{value} cannot follow aggregation svd (svd re-factors the LoRA factors in a "
                "new basis every round, so server momentum on them is meaningless); "
                "use aggregation fedavg or ffa, or server-optimizer none"
            )
        return value

    @field_validator("reject_distance_factor")
    @classmethod
    def _rejection_keeps_the_majority(cls, value: float) -> float:
        # Fewer than half the replies lie above twice their median distance: below 2, the
        # honest majority itself could be dropped.
        if 0 < value < 2:
            raise ValueError(f"must be 0 (off) or at least 2, got {value:g}")
        return value

    def success_episodes_at(self, server_round: int) -> int:
        """Closed-loop episodes round ``server_round`` asks of each agent (0 = start)."""
        if server_round in (0, self.num_server_rounds):
            return self.success_episodes
        return self.mid_success_episodes

    @field_validator("mid_success_episodes")
    @classmethod
    def _mid_needs_the_ends(cls, value: int, info: ValidationInfo) -> int:
        # success-episodes 0 means no closed-loop evaluation at all: a run that measures the
        # rounds between but not the start and the end could show no change, only a trend.
        if value and not info.data.get("success_episodes"):
            raise ValueError(
                "needs success-episodes > 0 (round 0 and the last round are always measured "
                "when any round is)"
            )
        return value

    @property
    def lora(self) -> LoraSpec:
        return LoraSpec(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout)

    @property
    def adapter_bounds(self) -> AdapterBounds:
        return AdapterBounds(max_relative_norm=self.max_relative_norm, max_growth=self.max_growth)

    @property
    def robot_config_path(self) -> Path:
        return robot_config_path(self.robot_config)


#: Local revisions an arm keeps by default (personalized mode): enough to roll back a few rounds.
PERSONAL_KEEP = 5


class NodeSettings(FlowerSettings, AgentCompute):
    """One SuperNode: which agent it is, where its dataset lives, how it shares the compute."""

    agent_id: str = Field(pattern=AGENT_ID_PATTERN)
    data_root: Path
    #: The agent daemon's control socket: ask it before using the compute (empty: no daemon,
    #: e.g. a SuperNode started on its own or a simulated node).
    control_socket: str = ""
    #: The agent daemon's warm round worker (``zk0.agent.round_worker``): the ClientApp hands
    #: each task to it (empty: the ClientApp runs the task itself, e.g. a simulated node).
    round_worker: str = ""
    #: The agent's own arm (a file or a shipped name such as ``sim_so101``); empty: unknown.
    #: Only a simulated arm runs closed-loop evaluation episodes in a round.
    robot_config: str = ""
    #: Personalized mode: where this arm keeps its local adapter's revisions (the agent daemon's
    #: ``<data_root>/personal``); empty: none, the shared adapter alone.
    personal_dir: str = ""
    #: Local revisions the arm keeps besides the current one (rollback needs an earlier one).
    #: A simulated node keeps every revision of its run: a bench measures each round's.
    personal_keep: int = Field(default=PERSONAL_KEEP, ge=2, le=1000)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], run: RunSettings) -> NodeSettings:
        """Deployment nodes name their agent id and data root; simulated ones get a partition.

        A simulated node ``sim-NN`` reads its dataset from ``<sim-data-root>/sim-NN`` and its
        arm's robot config from ``<sim-data-root>/sim-NN.yaml`` when that file exists (else it
        has none, and runs no closed-loop episodes); it keeps its local adapter (personalized
        mode) in ``<sim-data-root>/sim-NN.personal``.
        """
        raw = dict(node_config)
        if "partition-id" in raw and "agent-id" not in raw:
            if not run.sim_data_root:
                raise ConfigError("run config: sim-data-root is required in simulation")
            agent_id = f"sim-{int(raw['partition-id']):02d}"
            root = Path(run.sim_data_root)
            robot = root / f"{agent_id}.yaml"
            raw = {
                "agent-id": agent_id,
                "data-root": str(root / agent_id),
                "robot-config": str(robot) if robot.is_file() else "",
                "personal-dir": str(root / f"{agent_id}.personal"),
                "personal-keep": max(PERSONAL_KEEP, run.num_server_rounds + 1),
            }
        # Flower adds keys of its own (partition ids, counts): read only ours.
        settings = cls.from_flower(
            {k: v for k, v in raw.items() if k in cls.flower_keys()}, "node config"
        )
        if not (settings.data_root / "meta" / "info.json").is_file():
            raise ConfigError(
                f"node config: data-root: {settings.data_root} is not a LeRobot dataset "
                "(no meta/info.json: has this agent recorded any episode?)"
            )
        return settings

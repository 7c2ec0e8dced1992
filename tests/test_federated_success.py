"""Closed-loop success in federated evaluation: what a round asks, what the hub accepts and
records, and what an agent runs (episodes on the simulated arm only; a real arm never moves)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from loguru import logger

from conftest import GRID
from zk0.hub.history import EvalHistory
from zk0.hub.strategy import LoRAFedAvg
from zk0.shared.adapter_wire import pack
from zk0.shared.config import ConfigError
from zk0.shared.federation import (
    AGENT_ID,
    ARRAYS_KEY,
    CONFIG_KEY,
    EVAL_MSE,
    EXAMPLES,
    META_KEY,
    METRICS_KEY,
    NORMALIZATION,
    SUCCESS_COUNT,
    SUCCESS_EPISODES,
    SUCCESS_EPISODES_ASKED,
    NodeSettings,
    RunSettings,
)
from zk0.shared.success import SuccessRate

RUN = RunSettings(num_server_rounds=3, success_episodes=10, mid_success_episodes=4)


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING", format="{message}")
    yield lines
    logger.remove(sink)


def _eval_reply(agent: str, mse: float, examples: int, **success: Any) -> Message:
    metrics = MetricRecord({EXAMPLES: examples, EVAL_MSE: mse, **success})
    content = RecordDict({METRICS_KEY: metrics, META_KEY: ConfigRecord({AGENT_ID: agent})})
    return Message(content, dst_node_id=0, message_type=MessageType.EVALUATE)


# -- settings -------------------------------------------------------------------------------


def test_round_zero_and_the_last_ask_success_episodes_the_rounds_between_fewer() -> None:
    assert [RUN.success_episodes_at(r) for r in range(4)] == [10, 4, 4, 10]
    assert RunSettings().success_episodes_at(0) == 0  # off unless asked for
    with pytest.raises(ConfigError, match="success-episodes"):
        RunSettings.from_flower({"success-episodes": 1001}, "run config")
    with pytest.raises(ConfigError, match="mid-success-episodes"):
        RunSettings.from_flower({"mid-success-episodes": -1}, "run config")
    with pytest.raises(ConfigError, match=r"mid-success-episodes: .*needs success-episodes > 0"):
        RunSettings.from_flower({"mid-success-episodes": 2}, "run config")


def test_a_simulated_node_reads_its_robot_config_beside_its_dataset(tmp_path: Path) -> None:
    for agent in ("sim-00", "sim-01"):
        (tmp_path / agent / "meta").mkdir(parents=True)
        (tmp_path / agent / "meta" / "info.json").write_text("{}")
    (tmp_path / "sim-00.yaml").write_text("robot: {}\n")  # read when evaluating, not here
    run = RunSettings(sim_data_root=str(tmp_path))
    with_config = NodeSettings.from_node_config({"partition-id": 0}, run)
    assert with_config.robot_config == str(tmp_path / "sim-00.yaml")
    assert NodeSettings.from_node_config({"partition-id": 1}, run).robot_config == ""


# -- strategy -------------------------------------------------------------------------------


@pytest.mark.usefixtures("task_identity")
def test_each_evaluation_message_asks_its_rounds_episodes() -> None:
    strategy = LoRAFedAvg(success_episodes=RUN.success_episodes_at, min_available_nodes=2)
    shared = ConfigRecord({NORMALIZATION: b"{}"})
    for server_round, asked in ((0, 10), (1, 4), (3, 10)):
        messages = list(strategy.configure_evaluate(server_round, ArrayRecord(), shared, GRID))
        assert len(messages) == 2
        for message in messages:
            assert message.content[CONFIG_KEY][SUCCESS_EPISODES_ASKED] == asked
            assert message.content[CONFIG_KEY]["server-round"] == server_round
        assert strategy.report(server_round).success_asked == asked
    assert SUCCESS_EPISODES_ASKED not in shared  # the shared config (also training's) untouched


@pytest.mark.usefixtures("task_identity")
def test_success_counts_are_bounded_per_agent_and_the_mse_still_counts(
    warnings: list[str],
) -> None:
    strategy = LoRAFedAvg(success_episodes=lambda r: 10, min_available_nodes=2)
    list(strategy.configure_evaluate(0, ArrayRecord(), ConfigRecord(), GRID))
    replies = [
        _eval_reply("good", 0.5, 10, **{SUCCESS_COUNT: 7, SUCCESS_EPISODES: 10}),
        _eval_reply("fewer", 0.5, 10, **{SUCCESS_COUNT: 1, SUCCESS_EPISODES: 4}),
        _eval_reply("real-arm", 0.2, 30),  # no episodes: not measured, no warning
        _eval_reply("boaster", 0.1, 10, **{SUCCESS_COUNT: 12, SUCCESS_EPISODES: 10}),
        _eval_reply("greedy", 0.1, 10, **{SUCCESS_COUNT: 11, SUCCESS_EPISODES: 11}),
        _eval_reply("negative", 0.1, 10, **{SUCCESS_COUNT: -1, SUCCESS_EPISODES: 5}),
        _eval_reply("fraction", 0.1, 10, **{SUCCESS_COUNT: 2.0, SUCCESS_EPISODES: 5}),
        _eval_reply("half", 0.1, 10, **{SUCCESS_COUNT: 2}),
    ]
    aggregated = strategy.aggregate_evaluate(0, replies)
    report = strategy.report(0)
    assert report.success == {"good": SuccessRate.of(7, 10), "fewer": SuccessRate.of(1, 4)}
    assert len(report.eval_mse) == len(replies)  # every MSE counted
    refused = {"boaster", "greedy", "negative", "fraction", "half"}
    assert {w.split()[4] for w in warnings if "success from" in w} == refused
    assert not any("real-arm" in w for w in warnings)
    assert aggregated is not None
    # Success is pooled over the measured agents, not example-weighted like the MSE.
    assert (aggregated[SUCCESS_COUNT], aggregated[SUCCESS_EPISODES]) == (8, 14)
    assert aggregated[EVAL_MSE] == pytest.approx((0.5 * 20 + 0.2 * 30 + 0.1 * 50) / 100)


@pytest.mark.usefixtures("task_identity")
def test_success_not_asked_is_not_accepted() -> None:
    strategy = LoRAFedAvg(min_available_nodes=2)  # asks for no episodes
    list(strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), GRID))
    claimed = {SUCCESS_COUNT: 1, SUCCESS_EPISODES: 1}
    strategy.aggregate_evaluate(1, [_eval_reply("a", 0.3, 5, **claimed)])
    assert strategy.report(1).success == {} and strategy.report(1).eval_mse == {"a": 0.3}


# -- history --------------------------------------------------------------------------------


def _history() -> EvalHistory:
    history = EvalHistory("fedavg")
    history.add_round(
        0,
        {"sim-00": 1.0, "sim-01": 2.0, "arm-01": 3.0},
        {"sim-00": 10, "sim-01": 10, "arm-01": 10},
        success={"sim-00": SuccessRate.of(1, 10), "sim-01": SuccessRate.of(0, 10)},
        success_asked=10,
    )
    history.add_round(1, {"sim-00": 0.8, "arm-01": 2.5}, {"sim-00": 10, "arm-01": 10})
    history.add_round(
        2,
        {"sim-00": 0.5, "sim-01": 1.0, "arm-01": 2.0},
        {"sim-00": 10, "sim-01": 10, "arm-01": 10},
        success={"sim-00": SuccessRate.of(7, 10), "sim-01": SuccessRate.of(3, 6)},
        success_asked=10,
    )
    return history


def test_history_records_success_per_agent_and_the_pooled_fleet(tmp_path: Path) -> None:
    history = _history()
    history_path, chart_path = history.write(tmp_path)
    data = json.loads(history_path.read_text())
    assert data["rounds"] == [0, 1, 2] and data["clients"]["sim-01"] == [2.0, None, 1.0]
    assert data["success"]["arm-01"] == [None, None, None]  # a real arm: never measured
    assert data["success"]["sim-00"][1] is None  # a round that asked for no episodes
    assert SuccessRate.model_validate(data["success"]["sim-00"][2]) == SuccessRate.of(7, 10)
    assert data["success_average"][1] is None
    assert SuccessRate.model_validate(data["success_average"][2]) == SuccessRate.of(10, 16)
    assert data["success_asked"] == [10, 0, 10]
    assert EvalHistory.from_dict(data) == history
    assert chart_path.stat().st_size > 10_000

    summary = "\n".join(history.summary_lines())
    assert "success round 0" in summary and "success round 2" in summary
    assert SuccessRate.of(7, 10).describe() in summary  # sim-00 at the last round
    assert SuccessRate.of(10, 16).describe() in summary  # the fleet at the last round


def test_history_without_success_keeps_the_mse_table_and_reads_old_files(tmp_path: Path) -> None:
    history = EvalHistory("svd")
    history.add_round(0, {"a": 1.0}, {"a": 4})
    history.add_round(1, {"a": 0.5}, {"a": 4})
    assert history.summary_lines()[0].split() == ["agent", "round", "0", "round", "1", "change"]
    _, chart = history.write(tmp_path)
    assert chart.stat().st_size > 10_000
    old = {"rounds": [0, 1], "clients": {"a": [1.0, 0.5]}, "average": [1.0, 0.5]}
    read = EvalHistory.from_dict(old)
    assert read.success == {"a": [None, None]} and read.success_asked == [0, 0]


# -- the agent's evaluation: episodes on the simulated arm only ------------------------------


@pytest.fixture(scope="module")
def agent_round() -> tuple[RunSettings, Path, Message]:
    """A short recorded dataset, the run, and a round-0 evaluate message (fresh adapter)."""
    from zk0.agent import round_tasks
    from zk0.agent.episode_cache import recorded
    from zk0.agent.training import dataset_stats, open_dataset
    from zk0.shared.lora import adapter_state, apply_lora
    from zk0.shared.normalization import dumps
    from zk0.shared.sim_variants import CLIENT_VARIANTS

    data_root = recorded("fed-success", CLIENT_VARIANTS["sim-00"], episodes=2, episode_time_s=1.0)
    run = RunSettings(policy="tiny-sim-base", eval_frames=2, seed=3)
    base = round_tasks._base(run.policy, str(run.robot_config_path))
    peft_model = apply_lora(copy.deepcopy(base.policy), run.lora, base.base.name_or_path)
    stats = dataset_stats(open_dataset(data_root, base.policy.config))
    with pytest.MonkeyPatch.context() as patch:  # a module-scoped fixture cannot use the fixture
        for name in ("_task_id", "_run_id", "_node_id"):
            patch.setattr(TaskIdentity, name, 1)
        config = ConfigRecord({NORMALIZATION: dumps(stats), SUCCESS_EPISODES_ASKED: 2})
        arrays = pack(adapter_state(peft_model))
        content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})
        message = Message(content, dst_node_id=0, message_type=MessageType.EVALUATE)
    return run, data_root, message


def _robot_yaml(folder: Path, name: str, config: Any) -> str:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return str(path)


@pytest.mark.usefixtures("task_identity")
def test_the_simulated_arm_runs_the_asked_episodes_a_real_one_none(
    agent_round: tuple[RunSettings, Path, Message], tmp_path: Path
) -> None:
    from zk0.agent.round_tasks import _evaluate
    from zk0.shared.config import load_robot_config
    from zk0.shared.sim_variants import CLIENT_VARIANTS, variant_config

    run, data_root, message = agent_round
    # Half a simulated second (15 control periods): one chunk per episode.
    sim = _robot_yaml(tmp_path, "sim", variant_config(CLIENT_VARIANTS["sim-00"], 0.5))
    node = NodeSettings(agent_id="sim-00", data_root=data_root, robot_config=sim)
    metrics = _evaluate(message, run, node, 0)[METRICS_KEY]
    count, episodes = metrics[SUCCESS_COUNT], metrics[SUCCESS_EPISODES]
    assert isinstance(count, int) and isinstance(episodes, int)
    assert episodes == 2 and 0 <= count <= episodes
    assert isinstance(metrics[EVAL_MSE], float)

    synthetic = _robot_yaml(tmp_path, "synthetic", load_robot_config("synthetic"))
    for robot_config in (synthetic, ""):  # an arm that is not the simulated one; none at all
        node = NodeSettings(agent_id="arm-01", data_root=data_root, robot_config=robot_config)
        metrics = _evaluate(message, run, node, 0)[METRICS_KEY]
        assert SUCCESS_COUNT not in metrics and SUCCESS_EPISODES not in metrics
        assert isinstance(metrics[EVAL_MSE], float)

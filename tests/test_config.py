"""Robot, agent and hub configs: the shipped files load; bad files fail with one clear line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from zk0.agent.robots import robot_options
from zk0.shared.config import (
    ConfigError,
    load_agent_config,
    load_hub_config,
    load_robot_config,
    shipped_robot_configs,
)
from zk0.shared.features import PolicyFeatures

REPO = Path(__file__).resolve().parents[1]
GOOD_ROBOT = """
robot: {type: so101_follower, id: arm1, port: /dev/ttyACM0}
leader: {type: so101_leader, id: lead1, port: /dev/ttyACM1}
cameras:
  front: {index_or_path: 0, width: 640, height: 480, policy_key: observation.images.camera1}
  wrist: {index_or_path: 2, width: 640, height: 480, policy_key: observation.images.camera2}
task: pick the cube
"""


@pytest.mark.parametrize("name", ["so100.yaml", "so101.yaml", "sim_so101.yaml"])
def test_shipped_robot_configs_load_at_30_fps_with_two_cameras(name: str) -> None:
    robot = load_robot_config(REPO / "robot_configs" / name)
    assert robot.fps == 30
    features = PolicyFeatures.from_robot_config(robot)
    assert (features.state_dim, features.action_dim) == (6, 6)
    assert sorted(features.images) == ["observation.images.camera1", "observation.images.camera2"]


BAD_ROBOT_FILES = {
    "unknown key": (GOOD_ROBOT + "colour: red\n", "colour"),
    "wrong type": (GOOD_ROBOT.replace("width: 640", "width: wide", 1), "cameras.front.width"),
    "fps zero": (GOOD_ROBOT + "fps: 0\n", "fps"),
    "negative camera fps": (
        GOOD_ROBOT.replace("height: 480,", "height: 480, fps: -5,", 1),
        "cameras.front.fps",
    ),
    "missing port": (GOOD_ROBOT.replace(", port: /dev/ttyACM0", ""), "port is required"),
    "missing leader port": (GOOD_ROBOT.replace(", port: /dev/ttyACM1", ""), "leader"),
    "duplicate camera key": (
        GOOD_ROBOT.replace("camera2", "camera1"),
        "two cameras feed the same policy key",
    ),
    "duplicate camera name": (
        GOOD_ROBOT.replace("  wrist:", "  front:"),
        "duplicate",
    ),
    "task too long": (
        GOOD_ROBOT.replace("pick the cube", "pick the cube and place it in the far bin"),
        "max_task_chars=30",
    ),
    "empty task": (GOOD_ROBOT.replace("pick the cube", "'  '"), "task: must not be empty"),
    "unknown robot": (GOOD_ROBOT.replace("so101_follower", "ur5"), "robot: type must be one of"),
    "bad policy key": (GOOD_ROBOT.replace("camera2", "wrist"), "cameras.wrist.policy_key"),
    "opencv without device": (GOOD_ROBOT.replace("index_or_path: 0, ", ""), "index_or_path"),
    "not a mapping": ("- just\n- a list\n", "expected a mapping"),
    "not yaml": ("robot: [unclosed\n", "line 2"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROBOT_FILES))
def test_bad_robot_file_fails_with_one_line_naming_file_and_field(
    case: str, tmp_path: Path
) -> None:
    text, expected = BAD_ROBOT_FILES[case]
    path = tmp_path / f"{case.replace(' ', '_')}.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_robot_config(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    assert expected in message


def test_task_limit_is_configurable_not_truncated(tmp_path: Path) -> None:
    long_task = "pick the cube and place it in the far bin"
    path = tmp_path / "robot.yaml"
    path.write_text(GOOD_ROBOT.replace("pick the cube", long_task) + "max_task_chars: 60\n")
    assert load_robot_config(path).task == long_task


def test_agent_config_resolves_paths_next_to_its_file(tmp_path: Path) -> None:
    (tmp_path / "robot.yaml").write_text(GOOD_ROBOT)
    (tmp_path / "agent.yaml").write_text(
        textwrap.dedent(
            """
            agent_id: arm-01
            robot_config: robot.yaml
            data_root: data
            hub: {host: 127.0.0.1, flower_port: 9092}
            """
        )
    )
    agent = load_agent_config(tmp_path / "agent.yaml")
    assert agent.data_root == tmp_path / "data"
    assert agent.load_robot_config().robot.id == "arm1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("agent_id: Arm 1\nrobot_config: r.yaml\ndata_root: d\n", "agent_id"),
        ("agent_id: a1\ndata_root: d\n", "robot_config"),
        (
            "agent_id: a1\nrobot_config: r.yaml\ndata_root: d\nhub: {flower_port: 70000}\n",
            "hub.flower_port",
        ),
    ],
)
def test_bad_agent_file(text: str, expected: str, tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_agent_config(path)


def test_hub_ports_must_differ(tmp_path: Path) -> None:
    path = tmp_path / "hub.yaml"
    path.write_text("store_root: store\nflower_port: 5556\n")
    with pytest.raises(ConfigError, match="must differ"):
        load_hub_config(path)


def test_agent_cli_reports_bad_file_as_one_line(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("agent_id: a1\nrobot_config: missing.yaml\ndata_root: d\n")
    result = subprocess.run(
        [sys.executable, "-m", "zk0.agent.cli", "config", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "missing.yaml: no such file" in result.stderr


@pytest.mark.parametrize(
    "content",
    [
        "robot: {type: synthetic, id: r}\ntask: caf\xe9\n".encode("latin-1"),  # not UTF-8
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)),  # a binary file
    ],
)
def test_a_file_that_is_not_utf8_text_is_one_line_naming_it(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "robot.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_robot_config(path)
    assert str(caught.value).startswith(f"{path}: not a UTF-8 text file")
    assert "\n" not in str(caught.value)


def test_shipped_robot_configs_are_found_by_name_wherever_zk0_is_installed() -> None:
    assert shipped_robot_configs() == ["sim_so101", "so100", "so101", "synthetic"]
    assert load_robot_config("synthetic") == load_robot_config(
        REPO / "robot_configs/synthetic.yaml"
    )
    with pytest.raises(ConfigError, match=r"sim_so10: no such file, nor a robot config shipped"):
        load_robot_config("sim_so10")


@pytest.mark.parametrize(
    ("robot", "options", "message"),
    [
        (
            "synthetic",
            "options: {realtime: true, colour: red}",
            "options.colour: Extra inputs are not permitted",
        ),
        (
            "sim_so101",
            "options: {seed: many}",
            "options.seed: Input should be a valid integer, unable to parse string as an integer",
        ),
        ("so101", "options: {seed: 1}", "options.seed: Extra inputs are not permitted"),
    ],
)
def test_config_check_refuses_robot_options_as_recording_does(
    tmp_path: Path, robot: str, options: str, message: str
) -> None:
    text = (REPO / "robot_configs" / f"{robot}.yaml").read_text().split("\noptions:")[0]
    robot_yaml = tmp_path / "robot.yaml"
    robot_yaml.write_text(f"{text}\n{options}\n")
    agent = tmp_path / "agent.yaml"
    agent.write_text(f"agent_id: a1\nrobot_config: {robot_yaml}\ndata_root: d\n")
    result = subprocess.run(
        [sys.executable, "-m", "zk0.agent.cli", "config", "check", "--config", str(agent)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2, result.stdout
    kind = load_robot_config(robot).robot.type
    assert result.stderr.strip() == f"error: {robot_yaml}: {message} ({kind})"
    # Recording refuses the same file with the same words.
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        robot_options(load_robot_config(robot_yaml))

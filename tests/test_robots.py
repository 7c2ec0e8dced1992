"""Robot backends: the simulated SO-101 and its expert, the synthetic robot, real-arm errors."""

from __future__ import annotations

import os
import pty
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import REPO_ROOT, SIM_ROBOT
from zk0.agent.robots import RobotSetupError, make_robot, make_teleoperator
from zk0.shared.config import SO_ARM_JOINTS, ConfigError, RobotConfig, load_robot_config

BIN = REPO_ROOT / ".venv" / "bin"
JOINT_KEYS = [f"{joint}.pos" for joint in SO_ARM_JOINTS]


def _sim_config(**options: Any) -> RobotConfig:
    config = load_robot_config(SIM_ROBOT)
    return config.model_copy(update={"options": {**config.options, **options}})


@pytest.fixture(scope="module")
def sim_arm() -> Any:
    robot = make_robot(load_robot_config(SIM_ROBOT))
    expert = make_teleoperator(robot.config, robot)
    robot.connect()
    expert.connect()
    yield robot, expert
    robot.disconnect()


def test_sim_arm_reports_what_the_real_follower_reports(sim_arm: Any) -> None:
    robot, _ = sim_arm
    assert list(robot.action_features) == JOINT_KEYS
    assert list(robot.observation_features) == [*JOINT_KEYS, "camera1", "camera2"]
    robot.start_episode(0)
    observation = robot.get_observation()
    assert [key for key in observation if key.endswith(".pos")] == JOINT_KEYS
    assert all(-180.0 <= observation[key] <= 180.0 for key in JOINT_KEYS[:5])
    assert 0.0 <= observation["gripper.pos"] <= 100.0
    for key in ("camera1", "camera2"):  # front, wrist: 128x96 as in sim_so101.yaml
        assert observation[key].shape == (96, 128, 3) and observation[key].dtype == np.uint8
        assert observation[key].std() > 5  # a rendered scene, not a blank frame
    assert not np.array_equal(observation["camera1"], observation["camera2"])
    stamps = robot.capture_stamps()
    assert set(stamps) == {"state", "camera1", "camera2"}
    assert len({stamp.counter for stamp in stamps.values()}) == 1  # all of the same state


def test_sim_actions_move_the_joints_in_degrees(sim_arm: Any) -> None:
    robot, _ = sim_arm
    robot.start_episode(1)
    start = robot.clock.now()
    target = {key: 0.0 for key in JOINT_KEYS} | {"shoulder_pan.pos": 20.0, "gripper.pos": 30.0}
    for _ in range(30):
        sent = robot.send_action(target)
    assert robot.clock.now() - start == pytest.approx(1.0, abs=1e-6)  # 30 steps at 30 fps
    assert sent["shoulder_pan.pos"] == pytest.approx(20.0, abs=1e-6)
    observation = robot.get_observation()
    assert observation["shoulder_pan.pos"] == pytest.approx(20.0, abs=2.0)
    assert observation["gripper.pos"] == pytest.approx(30.0, abs=5.0)


def test_scripted_expert_picks_and_places(sim_arm: Any) -> None:
    robot, expert = sim_arm
    robot.start_episode(2)
    expert.start_episode(2)
    successes = []
    for _ in range(8 * 30):
        robot.get_observation()
        robot.send_action(expert.get_action())
        successes.append(expert.success())
        if expert.episode_done:
            break
    assert expert.episode_done, "the expert should finish within the config's 8 s"
    assert successes[-1] is True and successes[0] is False


def test_cameras_render_the_snapshot_not_the_live_scene(sim_arm: Any) -> None:
    robot, _ = sim_arm
    camera = robot.cameras["camera1"]
    scene = robot.scene
    robot.start_episode(3)
    version = 10_000
    camera.submit(scene.snapshot(version))
    scene.reset(robot.options.variant(4))  # the live scene moves on before the render is done
    frame, stamp = camera.frame_for(version, timeout_s=30)
    assert stamp.counter == version and camera.is_connected
    camera.submit(scene.snapshot(version + 1))
    moved, _ = camera.frame_for(version + 1, timeout_s=30)
    scene.reset(robot.options.variant(3))
    camera.submit(scene.snapshot(version + 2))
    again, _ = camera.frame_for(version + 2, timeout_s=30)
    assert np.array_equal(frame, again)  # the picture of the snapshot's state...
    assert not np.array_equal(frame, moved)  # ...not of the scene as it was when drawn
    assert camera._thread is not None and camera._thread.name == "sim-camera-camera1"


def test_task_variants_give_different_episodes() -> None:
    left = _sim_config(seed=1, cube_region={"x": [0.15, 0.2], "y": [-0.1, -0.05]})
    right = _sim_config(seed=1, cube_region={"x": [0.25, 0.3], "y": [0.05, 0.1]})
    a, b = make_robot(left).options.variant(0), make_robot(right).options.variant(0)
    assert a.cube_xy[1] < -0.04 and b.cube_xy[1] > 0.04
    assert make_robot(left).options.variant(0) == a  # a pure function of (seed, episode)
    assert make_robot(_sim_config(seed=2)).options.variant(0) != make_robot(
        _sim_config(seed=3)
    ).options.variant(0)
    jitter = make_robot(_sim_config(light_jitter=0.5, camera_jitter_m=0.02)).options
    looks = {(v.light_scale, v.camera_offset) for v in map(jitter.variant, range(5))}
    assert len(looks) == 5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cube_region": {"x": [0.1, 0.2]}}, "options.cube_region: x: [0.1, 0.2] leaves"),
        ({"light_jitter": 2}, "options.light_jitter"),
        ({"colour": "red"}, "options.colour"),
        (
            {
                "cube_region": {"x": [0.2, 0.2], "y": [0, 0]},
                "goal_region": {"x": [0.2, 0.22], "y": [0, 0.01]},
            },
            "options: cube_region and goal_region leave no goal",  # the model as a whole
        ),
    ],
)
def test_bad_sim_options_are_one_clear_line(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        make_robot(_sim_config(**options))
    text = str(error.value)
    assert "\n" not in text and text.startswith(message) and text.endswith("(sim_so101)")


def test_synthetic_robot_stamps_every_frame_and_injects_faults() -> None:
    config = load_robot_config(REPO_ROOT / "robot_configs" / "synthetic.yaml")
    config = config.model_copy(
        update={"options": {"realtime": False, "duplicate_frames": [2], "stall_frames": [3]}}
    )
    robot = make_robot(config)
    leader = make_teleoperator(config, robot)
    robot.connect()
    leader.connect()
    robot.start_episode(0)
    stamps = []
    for k in range(5):
        robot.clock.sleep_until(k / 30)
        observation = robot.get_observation()
        robot.send_action(leader.get_action())
        stamps.append(robot.capture_stamps()["camera1"])
    assert observation["camera1"].shape == (96, 128, 3)
    assert [s.counter for s in stamps] == [0, 1, 1, 2, 3]  # frame 2 delivered twice
    assert stamps[3].t == pytest.approx(3 / 30 + 0.1, abs=1e-3)  # stalled 0.1 s past its time
    robot.disconnect()


def _real_config(tmp_path: Path, port: str, calibration_dir: Path) -> RobotConfig:
    config = load_robot_config(REPO_ROOT / "robot_configs" / "so101.yaml")
    robot = config.robot.model_copy(update={"port": port, "calibration_dir": calibration_dir})
    return config.model_copy(update={"robot": robot})


def test_real_arm_on_a_missing_port_is_one_line_never_a_prompt(tmp_path: Path) -> None:
    config = (REPO_ROOT / "robot_configs" / "so101.yaml").read_text()
    missing = tmp_path / "ttyACM9"
    (tmp_path / "so101.yaml").write_text(config.replace("/dev/ttyACM0", str(missing)))
    result = subprocess.run(
        [
            *(str(BIN / "zk0-agent"), "record", "--robot-config", str(tmp_path / "so101.yaml")),
            *("--root", str(tmp_path / "ds"), "--episodes", "1"),
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "ZK0_OUTPUTS": str(tmp_path / "outputs")},
        check=False,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: robot.port {missing} does not exist: is the so101_follower (so101_follower_01) "
        "plugged in and powered? (`lerobot-find-port` shows which port it is on)"
    )
    assert not (tmp_path / "ds").exists()


def test_real_arm_without_calibration_says_how_to_calibrate(tmp_path: Path) -> None:
    controller, device = pty.openpty()  # a serial port that exists, with no motors behind it
    try:
        config = _real_config(tmp_path, os.ttyname(device), tmp_path / "calibration")
        with pytest.raises(RobotSetupError, match="no calibration for so101_follower_01") as error:
            make_robot(config)
        assert "lerobot-calibrate --robot.type=so101_follower" in str(error.value)
        # With a calibration file, what is missing next is said in one line too: the motor
        # driver (an optional LeRobot extra), or, where it is installed, the motors' answer.
        (tmp_path / "calibration").mkdir()
        (tmp_path / "calibration" / "so101_follower_01.json").write_text("{}")
        with pytest.raises(RobotSetupError, match=r"Feetech motor driver|no answer") as error:
            make_robot(config).connect()
        assert "\n" not in str(error.value)
    finally:
        os.close(controller)
        os.close(device)


def test_leader_must_fit_the_robot() -> None:
    config = load_robot_config(SIM_ROBOT)
    leader = config.leader.model_copy(update={"type": "so101_leader"})  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="cannot drive a sim_so101; use scripted_expert"):
        make_teleoperator(config.model_copy(update={"leader": leader}), None)

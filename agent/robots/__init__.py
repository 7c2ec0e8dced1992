"""Robot backends behind LeRobot's interface, built from a robot config.

=================  =============================================  ==========================
``robot.type``     robot (LeRobot ``Robot``)                       teleoperator (``leader``)
=================  =============================================  ==========================
so100_follower     LeRobot's SO follower, OpenCV cameras          so100_leader / so101_leader
so101_follower     (``real.ZK0SOFollower``)                       (``real.ZK0SOLeader``)
sim_so101          MuJoCo SO-101 (``sim_so101.SimSO101``)         scripted_expert
synthetic          instant synthetic cameras (``synthetic``)      synthetic_leader
=================  =============================================  ==========================

Backends are imported on demand: building a synthetic robot never loads MuJoCo or the motor
driver.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from zk0.agent.robots.base import (
    STATE_STREAM,
    Clock,
    FrameStamp,
    RecordingRobot,
    RecordingTeleop,
    RobotSetupError,
    VirtualClock,
    WallClock,
    parse_options,
)
from zk0.shared.config import REAL_ROBOT_TYPES, ConfigError, RobotConfig

LEADERS = {
    "so100_follower": ("so100_leader", "so101_leader"),
    "so101_follower": ("so100_leader", "so101_leader"),
    "sim_so101": ("scripted_expert",),
    "synthetic": ("synthetic_leader",),
}

__all__ = [
    "LEADERS",
    "STATE_STREAM",
    "Clock",
    "FrameStamp",
    "RecordingRobot",
    "RecordingTeleop",
    "RobotSetupError",
    "VirtualClock",
    "WallClock",
    "make_robot",
    "make_teleoperator",
    "robot_options",
]


class NoOptions(BaseModel):
    """Real arms take no ``options:`` (their settings are LeRobot's, in the robot config)."""

    model_config = {"extra": "forbid"}


def robot_options(config: RobotConfig) -> BaseModel:
    """``config.options`` validated by its backend's model: what building the robot does (each
    backend calls this), without building it (``zk0-agent config check``)."""
    kind = config.robot.type
    model: type[BaseModel] = NoOptions
    if kind == "sim_so101":
        from zk0.agent.robots.sim_so101 import SimOptions

        model = SimOptions
    elif kind == "synthetic":
        from zk0.agent.robots.synthetic import SyntheticOptions

        model = SyntheticOptions
    return parse_options(model, config.options, kind)


def make_robot(config: RobotConfig) -> Any:
    """The follower ``config.robot`` describes, not yet connected."""
    kind = config.robot.type
    if kind in REAL_ROBOT_TYPES:
        from zk0.agent.robots.real import ZK0SOFollower

        return ZK0SOFollower(config)
    if kind == "sim_so101":
        from zk0.agent.robots.sim_so101 import SimSO101

        return SimSO101(config)
    if kind == "synthetic":
        from zk0.agent.robots.synthetic import SyntheticRobot

        return SyntheticRobot(config)
    raise ConfigError(f"robot.type: no backend for {kind!r}")


def make_teleoperator(config: RobotConfig, robot: Any) -> Any:
    """The teleoperator ``config.leader`` describes, for ``robot`` (not yet connected)."""
    leader = config.leader
    allowed = LEADERS[config.robot.type]
    if leader is None:
        raise ConfigError(f"leader: recording needs a leader ({' or '.join(allowed)})")
    if leader.type not in allowed:
        raise ConfigError(
            f"leader.type: {leader.type!r} cannot drive a {config.robot.type}; "
            f"use {' or '.join(allowed)}"
        )
    if leader.type == "scripted_expert":
        from zk0.agent.robots.scripted_expert import ScriptedExpert

        return ScriptedExpert(leader, robot)
    if leader.type == "synthetic_leader":
        from zk0.agent.robots.synthetic import SyntheticLeader

        return SyntheticLeader(leader, robot)
    from zk0.agent.robots.real import ZK0SOLeader

    return ZK0SOLeader(leader)

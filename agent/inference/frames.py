"""Between the robot's dictionaries and the policy's tensors.

A LeRobot robot reports ``{"shoulder_pan.pos": deg, ..., "camera1": HxWx3 uint8}`` and takes
``{"shoulder_pan.pos": deg, ...}``. The policy takes the frame a LeRobot dataset yields
(``observation.state`` in joint order, ``observation.images.<camera>`` as CxHxW floats in
[0, 1], ``task``) and returns a chunk of action vectors in the same joint order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from zk0.shared.features import STATE_KEY, PolicyFeatures

IMAGE_PREFIX = "observation.images."


@dataclass(frozen=True)
class FrameLayout:
    """Which robot keys feed which policy inputs, and the action's joint order."""

    joints: tuple[str, ...]
    #: robot observation key -> policy image key
    cameras: dict[str, str]

    @classmethod
    def for_robot(cls, action_features: Sequence[str], features: PolicyFeatures) -> FrameLayout:
        cameras = {key.removeprefix(IMAGE_PREFIX): key for key in features.images}
        joints = tuple(action_features)
        if len(joints) != features.action_dim or len(joints) != features.state_dim:
            raise ValueError(
                f"the arm has {len(joints)} joints but the policy takes state "
                f"{features.state_dim} and gives action {features.action_dim}"
            )
        return cls(joints=joints, cameras=cameras)

    def check(self, observation: dict[str, Any]) -> None:
        missing = [k for k in (*self.joints, *self.cameras) if k not in observation]
        if missing:
            raise ValueError(f"the robot's observation lacks {missing}")

    def policy_frame(self, observation: dict[str, Any], task: str) -> dict[str, Any]:
        """The raw (un-normalized, unbatched) frame the policy's preprocessor takes."""
        import torch

        frame: dict[str, Any] = {
            STATE_KEY: torch.tensor(
                [float(observation[j]) for j in self.joints], dtype=torch.float32
            )
        }
        for robot_key, policy_key in self.cameras.items():
            image = torch.from_numpy(np.ascontiguousarray(observation[robot_key]))
            frame[policy_key] = image.permute(2, 0, 1).to(torch.float32).div_(255.0)
        frame["task"] = task
        return frame

    def action(self, values: NDArray[np.floating]) -> dict[str, float]:
        return {joint: float(v) for joint, v in zip(self.joints, values, strict=True)}

    def state(self, observation: dict[str, Any]) -> NDArray[np.float64]:
        return np.array([float(observation[j]) for j in self.joints])

"""The policy's input and output features, derived from a robot config (or a checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from zk0.shared.config import POLICY_IMAGE_KEYS, RobotConfig

STATE_KEY = "observation.state"
ACTION_KEY = "action"


@dataclass(frozen=True)
class PolicyFeatures:
    """Shapes a SmolVLA policy is built for: proprioceptive state, action, camera images."""

    state_dim: int
    action_dim: int
    #: policy image key (``observation.images.cameraN``) -> (channels, height, width)
    images: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.state_dim <= 0 or self.action_dim <= 0:
            raise ValueError(f"state and action dims must be positive, got {self}")
        unknown = set(self.images) - set(POLICY_IMAGE_KEYS)
        if unknown:
            raise ValueError(f"unknown image keys {sorted(unknown)}")
        if not self.images:
            raise ValueError("a SmolVLA policy needs at least one camera")

    @classmethod
    def from_robot_config(cls, robot: RobotConfig) -> PolicyFeatures:
        joints = len(robot.joint_names)
        return cls(state_dim=joints, action_dim=joints, images=robot.image_shapes())

    @classmethod
    def from_lerobot(
        cls, input_features: dict[str, Any], output_features: dict[str, Any]
    ) -> PolicyFeatures:
        """From a SmolVLA config's ``input_features``/``output_features`` (``PolicyFeature``)."""
        images: dict[str, tuple[int, int, int]] = {
            key: (int(feature.shape[0]), int(feature.shape[1]), int(feature.shape[2]))
            for key, feature in input_features.items()
            if key.startswith("observation.images.")
        }
        return cls(
            state_dim=int(input_features[STATE_KEY].shape[0]),
            action_dim=int(output_features[ACTION_KEY].shape[0]),
            images=dict(sorted(images.items())),
        )

    def to_lerobot(self) -> tuple[dict[str, Any], dict[str, Any]]:
        from lerobot.configs.types import FeatureType, PolicyFeature

        inputs: dict[str, Any] = {STATE_KEY: PolicyFeature(FeatureType.STATE, (self.state_dim,))}
        for key, shape in sorted(self.images.items()):
            inputs[key] = PolicyFeature(FeatureType.VISUAL, shape)
        outputs = {ACTION_KEY: PolicyFeature(FeatureType.ACTION, (self.action_dim,))}
        return inputs, outputs

    def as_dict(self) -> dict[str, Any]:
        return {
            "state_dim": self.state_dim,
            "action_dim": self.action_dim,
            "images": {key: list(shape) for key, shape in sorted(self.images.items())},
        }

    def check_robot(self, robot: RobotConfig) -> None:
        """Fail clearly when ``robot`` cannot feed a policy built for these features."""
        mine = PolicyFeatures.from_robot_config(robot)
        if mine.state_dim != self.state_dim or mine.action_dim != self.action_dim:
            raise ValueError(
                f"the arm has {mine.state_dim} joints but the policy expects state "
                f"{self.state_dim} and action {self.action_dim}"
            )
        missing = set(mine.images) - set(self.images)
        if missing:
            raise ValueError(
                f"cameras feed {sorted(missing)}, which the policy does not take "
                f"(it takes {sorted(self.images)})"
            )

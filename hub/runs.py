"""The hub daemon's federated runs, one at a time, and their book-keeping.

:class:`FederatedRun` is ``flwr run APP zk0 --stream`` (the zk0 ServerApp) through the hub's
SuperLink, with its output in ``<run folder>/hub/flwr-run.log``: a child process started from
the main thread and polled by the main loop (never waited on), so that the loop keeps
answering its control socket and pinging the watchdog during a run of hours. It is stopped
(``flwr stop``, then the process) on the daemon's SIGTERM or at its deadline.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loguru import logger

from zk0.hub.history import HISTORY_FILE
from zk0.hub.scheduler import RunPlan
from zk0.hub.superlink import CONNECTION
from zk0.hub.supervisor import HubSuperLink, log_tail
from zk0.shared.fsutil import atomic_write_bytes
from zk0.shared.logs import RUN_DIR_ENV
from zk0.shared.processes import ManagedProcess

RUN_LOG = Path("hub") / "flwr-run.log"
RUN_FILE = "hub-run.json"
#: In the state folder: run numbers and the last run, so that run 7 stays run 7 in the logs
#: after a restart.
RUNS_FILE = "hub-runs.json"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class RunOutcome:
    index: int
    run_dir: Path
    returncode: int
    ended_at: str
    error: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "run_dir": str(self.run_dir),
            "returncode": self.returncode,
            "ended_at": self.ended_at,
            "error": self.error,
        }


class FederatedRun:
    """One ``flwr run`` of the zk0 App through the hub's SuperLink, polled by the main loop."""

    def __init__(
        self,
        index: int,
        plan: RunPlan,
        run_dir: Path,
        run_config: dict[str, Any],
        link: HubSuperLink,
        app_dir: Path,
        timeout_s: float,
    ) -> None:
        self.index, self.plan, self.run_dir = index, plan, run_dir
        self.run_config, self.timeout_s = run_config, timeout_s
        self.link = link
        self.started_at = now_iso()
        self._deadline = time.monotonic() + timeout_s
        flwr = str(Path(sys.executable).parent / "flwr")
        argv = [flwr, *link.run_args(app_dir, run_config)]
        self.process = ManagedProcess(f"flwr-run[{index}]", argv, link.env, run_dir / RUN_LOG)
        self._timed_out = False
        self._completed = 0

    def start(self) -> FederatedRun:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "index": self.index,
            "started_at": self.started_at,
            "trigger": self.plan.trigger,
            "reason": self.plan.reason,
            "agents": list(self.plan.agents),
            "run_config": self.run_config,
        }
        (self.run_dir / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")
        self.process.start()
        logger.info(
            "run {} started ({}: {}), {} rounds, min-nodes {}, folder {}",
            self.index,
            self.plan.trigger,
            self.plan.reason,
            self.plan.rounds,
            self.plan.min_nodes,
            self.run_dir,
        )
        return self

    def poll(self, now: float) -> RunOutcome | None:
        """The outcome once ``flwr run`` has exited (stopping it at its deadline), else None."""
        process = self.process.process
        assert process is not None, "poll() before start()"
        if process.poll() is None:
            if now < self._deadline:
                return None
            logger.error(
                "run {} passed its {:.0f} s deadline; stopping it", self.index, self.timeout_s
            )
            self._timed_out = True
            self.stop()
        returncode = process.returncode
        error = None
        if self._timed_out:
            error = f"timed out after {self.timeout_s:.0f} s"
        elif returncode != 0:
            error = (
                log_tail(self.run_dir / RUN_LOG, lines=2) or f"flwr run exited with {returncode}"
            )
        outcome = RunOutcome(self.index, self.run_dir, returncode, now_iso(), error)
        if error is None:
            logger.info("run {} finished: {}", self.index, self.run_dir)
        else:
            logger.error("run {} failed (exit {}): {}", self.index, returncode, error)
        return outcome

    def flower_run_id(self) -> int | None:
        """The SuperLink's id of this run, as ``flwr run`` printed it."""
        try:
            text = (self.run_dir / RUN_LOG).read_text(errors="replace")
        except OSError:
            return None
        found = re.search(r"Successfully started run (\d+)", text)
        return int(found.group(1)) if found else None

    def stop(self) -> None:
        """Abandon the run: stop it on the SuperLink (best effort) and end ``flwr run``."""
        run_id = self.flower_run_id()
        if run_id is not None and self.process.running:
            # Killing ``flwr run`` alone would leave the ServerApp running on the SuperLink.
            try:
                result = self.link.flwr("stop", str(run_id), CONNECTION, timeout_s=15.0)
            except subprocess.TimeoutExpired:
                logger.warning("flwr stop {} did not answer", run_id)
            else:
                if result.returncode != 0:
                    text = " ".join((result.stderr or result.stdout).split())  # rich boxes
                    logger.warning("flwr stop {} failed: {}", run_id, text[-200:])
        self.process.stop(timeout_s=5.0)

    def completed_rounds(self) -> int:
        """Rounds done so far, from the history the ServerApp rewrites after every round."""
        try:
            history = json.loads((self.run_dir / HISTORY_FILE).read_text())
            self._completed = max((int(r) for r in history.get("rounds", [])), default=0)
        except (OSError, ValueError, TypeError, AttributeError):
            pass  # not written yet, or caught while the ServerApp rewrites it: keep the last
        return self._completed

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "started_at": self.started_at,
            "run_dir": str(self.run_dir),
            "rounds": self.plan.rounds,
            "completed_rounds": self.completed_rounds(),
            "min_nodes": self.plan.min_nodes,
            "trigger": self.plan.trigger,
            "agents": list(self.plan.agents),
        }


def run_folder(logs_root: Path, index: int) -> Path:
    """A fresh folder for run ``index``: ``<logs>/<stamp>-run<N>``, or under ``runs/`` of the
    folder a parent process handed down in ``$ZK0_RUN_DIR``."""
    inherited = os.environ.get(RUN_DIR_ENV)
    base = Path(inherited) / "runs" if inherited else logs_root
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return (base / f"{stamp}-run{index}").resolve()


class RunBook:
    """Run counters and the last run's outcome, kept in the state folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.runs_started = self.runs_completed = self.runs_failed = 0
        self.last_run: RunOutcome | None = None

    def load(self) -> None:
        try:
            saved = json.loads(self.path.read_text())
            self.runs_started = int(saved.get("runs_started", 0))
            self.runs_completed = int(saved.get("runs_completed", 0))
            self.runs_failed = int(saved.get("runs_failed", 0))
            last = saved.get("last_run")
            if last:
                self.last_run = RunOutcome(
                    int(last["index"]),
                    Path(last["run_dir"]),
                    int(last["returncode"]),
                    str(last["ended_at"]),
                    last.get("error"),
                )
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            logger.warning("{}: unreadable ({}); run numbers start over", self.path, error)

    def finished(self, outcome: RunOutcome) -> None:
        self.last_run = outcome
        if outcome.error is None:
            self.runs_completed += 1
        else:
            self.runs_failed += 1
        self.save()

    def as_dict(self) -> dict[str, Any]:
        return {
            "runs_started": self.runs_started,
            "runs_completed": self.runs_completed,
            "runs_failed": self.runs_failed,
            "last_run": self.last_run.as_dict() if self.last_run else None,
        }

    def save(self) -> None:
        body = json.dumps(self.as_dict(), indent=1) + "\n"
        atomic_write_bytes(self.path, body.encode())

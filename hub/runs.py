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
from datetime import UTC, datetime
from pathlib import Path

from loguru import logger
from pydantic import BaseModel, ValidationError

from zk0.hub.history import HISTORY_FILE
from zk0.hub.scheduler import RunPlan
from zk0.hub.superlink import CONNECTION, SuperLink
from zk0.shared.config import HubConfig
from zk0.shared.federation import RunSettings
from zk0.shared.fsutil import atomic_write_bytes
from zk0.shared.hub_control import RunOutcome, RunView
from zk0.shared.logs import RUN_DIR_ENV
from zk0.shared.processes import ManagedProcess, log_tail

RUN_LOG = Path("hub") / "flwr-run.log"
RUN_FILE = "hub-run.json"
#: In the state folder: run numbers and the last run, so that run 7 stays run 7 in the logs
#: after a restart.
RUNS_FILE = "hub-runs.json"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run_settings(config: HubConfig, run_dir: Path, rounds: int | None = None) -> RunSettings:
    """A run's settings: ``runs.run_config`` over RunSettings' defaults, plus what the hub sets
    itself (the base, ``min-nodes`` from ``runs.min_agents``, the store, the run folder)."""
    values = {
        **config.runs.run_config,
        "policy": config.policy,
        "min-nodes": config.runs.min_agents,
        "store-root": str(config.store_root.resolve()),
        "run-dir": str(run_dir),
        "gate-timeout-s": config.canary.timeout_s if config.canary.enabled else 0.0,
    }
    if rounds is not None:
        values["num-server-rounds"] = rounds
    return RunSettings.from_flower(values, "hub run config")


def run_timeout_s(settings: RunSettings) -> float:
    """How long a whole run may take: waiting for nodes, statistics and round-0 evaluation,
    then training and evaluation in every round, each bounded by the round timeout in the
    ServerApp, and each round's wait for the canary gate (its timeout and a minute); plus some
    slack."""
    rounds = settings.num_server_rounds
    gate_s = settings.gate_timeout_s + 60.0 if settings.gate_timeout_s else 0.0
    return (3 + 2 * rounds) * settings.round_timeout_s + rounds * gate_s + 300.0


class FederatedRun:
    """One ``flwr run`` of the zk0 App through the hub's SuperLink, polled by the main loop."""

    def __init__(self, index: int, plan: RunPlan, settings: RunSettings, link: SuperLink) -> None:
        self.index, self.plan, self.settings = index, plan, settings
        self.run_dir = Path(settings.run_dir)
        self.timeout_s = run_timeout_s(settings)
        self.link = link
        self.started_at = now_iso()
        self._deadline = time.monotonic() + self.timeout_s
        flwr = str(Path(sys.executable).parent / "flwr")
        argv = [flwr, *link.run_args(settings)]
        self.process = ManagedProcess(f"flwr-run[{index}]", argv, link.env, self.run_dir / RUN_LOG)
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
            "run_config": self.settings.to_flower(),
        }
        (self.run_dir / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")
        self.process.start()
        logger.info(
            "run {} started ({}: {}), {} rounds, min-nodes {}, folder {}",
            self.index,
            self.plan.trigger,
            self.plan.reason,
            self.settings.num_server_rounds,
            self.settings.min_nodes,
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
        outcome = RunOutcome(
            index=self.index,
            run_dir=str(self.run_dir),
            returncode=returncode,
            ended_at=now_iso(),
            error=error,
        )
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

    def abandoned(self, why: str, returncode: int = -15) -> RunOutcome:
        """The outcome of a run that did not end by itself (stopped, or never started)."""
        return RunOutcome(
            index=self.index,
            run_dir=str(self.run_dir),
            returncode=returncode,
            ended_at=now_iso(),
            error=why,
        )

    def view(self) -> RunView:
        return RunView(
            index=self.index,
            started_at=self.started_at,
            run_dir=str(self.run_dir),
            rounds=self.settings.num_server_rounds,
            completed_rounds=self.completed_rounds(),
            min_nodes=self.settings.min_nodes,
            trigger=self.plan.trigger,
            agents=list(self.plan.agents),
        )


def runs_root(logs_root: Path) -> Path:
    """Where run folders go: ``<logs>``, or ``runs/`` of the folder a parent process handed
    down in ``$ZK0_RUN_DIR``."""
    inherited = os.environ.get(RUN_DIR_ENV)
    return (Path(inherited) / "runs" if inherited else logs_root).resolve()


def run_folder(logs_root: Path, index: int) -> Path:
    """A fresh folder for run ``index``: ``<runs root>/<stamp>-run<N>``."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return runs_root(logs_root) / f"{stamp}-run{index}"


class RunBook(BaseModel):
    """Run counters and the last run's outcome, kept in the state folder (``hub-runs.json``)."""

    runs_started: int = 0
    runs_completed: int = 0
    runs_failed: int = 0
    last_run: RunOutcome | None = None

    @classmethod
    def load(cls, path: Path) -> RunBook:
        try:
            return cls.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return cls()
        except (OSError, ValidationError) as error:
            logger.warning("{}: unreadable ({}); run numbers start over", path, error)
            return cls()

    def finished(self, outcome: RunOutcome, path: Path) -> None:
        self.last_run = outcome
        if outcome.error is None:
            self.runs_completed += 1
        else:
            self.runs_failed += 1
        self.save(path)

    def save(self, path: Path) -> None:
        atomic_write_bytes(path, self.model_dump_json(indent=1).encode() + b"\n")

"""``zk0-hub run``: the hub daemon (systemd ``zk0-hub.service``, ``Type=notify``).

Start-up: the control socket (refusing to start beside a live hub), the Flower SuperLink (TLS,
SuperNode authentication, database and Flower home in the state folder), registration of
every enrolled SuperNode key (``zk0.hub.enrolment``), the adapter distribution server; then
``READY=1``, sent only once the SuperLink accepts connections and both ZeroMQ sockets are
bound. The main loop turns at least four times a second and never blocks for long: it answers
control requests, supervises the SuperLink (restarted with a back-off when it exits), polls
the run in progress, asks the scheduler (``zk0.hub.scheduler``) whether to start one,
registers newly enrolled node keys in a background thread, pings the watchdog and keeps
``STATUS=`` current ("run 2 round 1/3, 3 agents online, current v4"). SIGTERM abandons a run
in progress (``flwr stop``, then ``flwr run`` and the SuperLink are stopped), stops the
distribution server, removes the control socket and exits 0.

Folders: the state folder (``HubConfig.hub_state_dir``) holds ``superlink.db``,
``flwr-home/``, ``supernodes.json`` (registered node ids), ``hub-runs.json`` (run counters and
the last run) and ``hub.sock``. Logs go to ``$LOGS_DIRECTORY`` (systemd), else
``$ZK0_OUTPUTS``, else ``outputs/``: the daemon's own folder ``<stamp>/hub/`` (``hub.log``,
``superlink.log``) and one folder per run (``<stamp>-run<N>/``: ``hub-run.json``,
``hub/flwr-run.log``, ``hub/hub.log`` of the ServerApp, ``eval_mse_history.json``, the chart).
A parent that hands down ``$ZK0_RUN_DIR`` (the demo) gets everything inside that folder
instead, runs under ``runs/``.

Control commands (``zk0.shared.control`` on the control socket; one JSON object each way):

``status``
    ``{"hub": {pid, started_at, config, state_dir, log_dir, trigger},
    "superlink": {address, up, state, pid, restarts, last_exit},
    "distribution": {bind_host, publish_port, fetch_port},
    "current_version": int | null, "versions": [int],
    "run": null | {index, started_at, run_dir, rounds, completed_rounds, min_nodes, trigger,
    agents}, "next_run": str (why no run starts now), "runs_started": int,
    "runs_completed": int, "runs_failed": int,
    "last_run": null | {index, run_dir, returncode, ended_at, error},
    "agents": [{agent_id, online, applied, in_use, state, episodes, last_seen_s, converged}],
    "converged": bool (every online agent runs the current version),
    "enrolled": {agent_id: node id | null}}``
``start_run`` (``rounds``: optional int)
    Starts a run now, whatever the trigger and cooldown; refused while one is in progress or
    the SuperLink is down. Returns the run as in ``status``.
``register_keys``
    Registers every enrolled SuperNode key not yet registered and unregisters withdrawn ones,
    now (a few seconds: one ``flwr`` call per key); refused while the SuperLink is down.
    Returns ``{registered: [agent], unregistered: [agent], failed: {agent: error},
    enrolled: {agent: node id}}``.
"""

from __future__ import annotations

import faulthandler
import os
import threading
import time
from pathlib import Path
from typing import Any

from loguru import logger

from zk0.hub.distribution import DistributionServer
from zk0.hub.enrolment import REGISTRY_FILE, Enrolment
from zk0.hub.runs import RUNS_FILE, FederatedRun, RunBook, RunOutcome, now_iso, run_folder
from zk0.hub.scheduler import AgentView, Idle, ManualRequest, RunPlan, decide
from zk0.hub.superlink import CONNECTION, SuperLinkSettings
from zk0.hub.supervisor import HubSuperLink, SuperLinkSupervisor
from zk0.shared.config import ConfigError, HubConfig, HubKeys
from zk0.shared.control import ControlServer, RefusedError
from zk0.shared.federation import REPO_ROOT
from zk0.shared.flower_keys import TlsFiles
from zk0.shared.logs import OUTPUTS_ENV, new_run_dir, setup_logging
from zk0.shared.sdnotify import Watchdog, credential_path, handle_sigterm, notify, service_dirs
from zk0.shared.store import AdapterStore

#: The longest a loop turn waits for control requests: the loop's pace.
LOOP_WAIT_S = 0.25
#: How often the loop looks for node keys to (un)register and refreshes ``STATUS=``.
KEY_CHECK_S = 2.0
STATUS_EVERY_S = 1.0


def _security(config: HubConfig, config_path: Path) -> tuple[HubKeys, TlsFiles]:
    """The key files the daemon needs, through systemd's credentials; one line if one is
    missing."""
    if config.keys is None:
        raise ConfigError(f"{config_path}: keys: required by zk0-hub run (zk0-hub keys init)")
    if config.tls is None:
        raise ConfigError(
            f"{config_path}: tls: required by zk0-hub run (ca_cert, server_cert, server_key; "
            "zk0-hub keys init makes the files)"
        )
    files = {
        "keys.curve_secret": config.keys.curve_secret,
        "keys.curve_public": config.keys.curve_public,
        "tls.ca_cert": config.tls.ca_cert,
        "tls.server_cert": config.tls.server_cert,
        "tls.server_key": config.tls.server_key,
    }
    found = {name: credential_path(path) for name, path in files.items()}
    for name, path in found.items():
        if not path.is_file():
            raise ConfigError(f"{config_path}: {name}: {path}: no such file (zk0-hub keys init)")
    if not (REPO_ROOT / "pyproject.toml").is_file():
        raise ConfigError(f"{REPO_ROOT}: no pyproject.toml, so no Flower App to run")
    keys = config.keys.model_copy(
        update={
            "curve_secret": found["keys.curve_secret"],
            "curve_public": found["keys.curve_public"],
        }
    )
    tls = TlsFiles(found["tls.ca_cert"], found["tls.server_cert"], found["tls.server_key"])
    return keys, tls


class HubService:
    def __init__(self, config: HubConfig, config_path: Path) -> None:
        self.config, self.config_path = config, Path(config_path)
        self.keys, self.tls = _security(config, self.config_path)
        self.state_dir = config.hub_state_dir
        self.store = AdapterStore(config.store_root)
        self.logs_root, _ = service_dirs(
            Path(os.environ.get(OUTPUTS_ENV, "outputs")), self.state_dir
        )
        self.log_dir = new_run_dir(self.logs_root)
        self.watchdog = Watchdog.from_env()
        self.started_at = now_iso()
        self.database = self.state_dir / "superlink.db"
        settings = SuperLinkSettings(config.bind_host, config.flower_port, self.database, self.tls)
        link = HubSuperLink(settings, self.state_dir / "flwr-home", self.log_dir / "hub")
        self.supervisor = SuperLinkSupervisor(link)
        self.enrolment = Enrolment(
            self.keys.allow_list_dir, self.state_dir / REGISTRY_FILE, link.flwr
        )
        self.control: ControlServer | None = None
        self.distribution: DistributionServer | None = None
        self.run: FederatedRun | None = None
        self.book = RunBook(self.state_dir / RUNS_FILE)
        self.last_started = time.monotonic()  # the schedule trigger counts from the hub's start
        self.last_ended: float | None = None
        self.next_run = "starting"
        self._key_thread: threading.Thread | None = None
        self._next_key_check = 0.0
        self._status_at = 0.0
        self._status_line = ""

    # -- lifecycle -------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Run until SIGTERM (then exit 0 through ``SystemExit``) or Ctrl-C."""
        faulthandler.enable()  # the watchdog's SIGABRT then shows where every thread hung
        stop = handle_sigterm()
        setup_logging(self.log_dir, "hub")
        try:
            self._start()
            self._status_line = self._status_text()
            notify(READY=1, STATUS=self._status_line)
            logger.info("hub ready: {}", self._status_line)
            while not stop.is_set():
                self._turn()
        except (ValueError, RuntimeError, TimeoutError, OSError) as error:
            logger.error("hub failed: {}", error)  # one line: the CLI repeats it
            raise
        except Exception:
            logger.exception("hub failed")  # a bug: systemd restarts the hub
            raise
        finally:
            self._shutdown()

    def _start(self) -> None:
        config = self.config
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.book.load()
        self.control = ControlServer(
            config.control_socket_path,
            {
                "status": self._cmd_status,
                "start_run": self._cmd_start_run,
                "register_keys": self._cmd_register_keys,
            },
            "zk0-hub",
        ).start()
        if not self.database.exists():
            self.enrolment.forget()
        self.supervisor.start()
        self._sync_keys()
        self.distribution = DistributionServer(
            self.store,
            keys=self.keys,
            bind_host=config.bind_host,
            publish_port=config.publish_port,
            fetch_port=config.fetch_port,
            heartbeat_s=config.heartbeat_s,
        ).start()

    def _shutdown(self) -> None:
        notify(STOPPING=1)
        if self.run is not None:
            logger.warning("abandoning run {} (the hub is stopping)", self.run.index)
            self.run.stop()
            self._finished(
                RunOutcome(
                    self.run.index, self.run.run_dir, -15, now_iso(), "abandoned: hub stopped"
                )
            )
        if self.control is not None:
            self.control.close()
        if self.distribution is not None:
            self.distribution.stop()
        self.supervisor.stop()
        if self._key_thread is not None:
            self._key_thread.join(timeout=2.0)
        logger.info("hub stopped")
        logger.complete()

    # -- the loop ----------------------------------------------------------------------------

    def _turn(self) -> None:
        assert self.control is not None
        self.control.serve(LOOP_WAIT_S)
        now = time.monotonic()
        self.supervisor.check(now)
        if self.run is not None and (outcome := self.run.poll(now)) is not None:
            self._finished(outcome)
        decision = self._decide(now)
        if isinstance(decision, RunPlan):
            self._start_run(decision, now)
        else:
            self.next_run = decision.reason
        self._keys_in_background(now)
        self.watchdog.progress()
        if now - self._status_at >= STATUS_EVERY_S:
            self._status_at = now
            line = self._status_text()
            if line != self._status_line:
                self._status_line = line
                notify(STATUS=line)

    def _decide(self, now: float, request: ManualRequest | None = None) -> RunPlan | Idle:
        if not self.supervisor.up:
            return Idle(f"the SuperLink is {self.supervisor.state}")
        return decide(
            self.config.runs,
            self._agent_views(),
            run_active=self.run is not None,
            last_started=self.last_started,
            last_ended=self.last_ended,
            now=now,
            request=request,
        )

    def _agent_views(self) -> list[AgentView]:
        if self.distribution is None:
            return []
        now = time.time()
        return [
            AgentView(r.agent_id, r.online(now, self.config.heartbeat_s), r.episodes)
            for r in self.distribution.agents()
        ]

    def _start_run(self, plan: RunPlan, now: float) -> FederatedRun:
        index = self.book.runs_started + 1
        run_dir = run_folder(self.logs_root, index)
        runs = self.config.runs
        run_config: dict[str, Any] = {
            "policy": self.config.policy,
            "num-server-rounds": plan.rounds,
            "min-nodes": plan.min_nodes,
            "round-timeout-s": runs.round_timeout_s,
            "store-root": str(self.config.store_root.resolve()),
            "run-dir": str(run_dir),
            **runs.run_config,
        }
        # Waiting for nodes, statistics, round-0 evaluation, then training and evaluation in
        # every round: each bounded by the round timeout in the ServerApp; plus some slack.
        timeout_s = (3 + 2 * plan.rounds) * runs.round_timeout_s + 300.0
        run = FederatedRun(
            index, plan, run_dir, run_config, self.supervisor.link, REPO_ROOT, timeout_s
        )
        self.book.runs_started = index
        self.last_started = now
        try:
            self.run = run.start()
        except OSError as error:  # e.g. the logs folder is full: a failed run, not a dead hub
            logger.error("run {} could not start: {}", index, error)
            self._finished(RunOutcome(index, run_dir, -1, now_iso(), f"not started: {error}"))
            return run
        self.book.save()
        return run

    def _finished(self, outcome: RunOutcome) -> None:
        self.run = None
        self.last_ended = time.monotonic()
        self.book.finished(outcome)

    # -- node keys -----------------------------------------------------------------------------

    def _sync_keys(self) -> dict[str, Any]:
        try:
            return self.enrolment.sync(CONNECTION).as_dict()
        except Exception as error:  # a bad key file must not take the hub down
            logger.exception("node key registration failed")
            return {"registered": [], "unregistered": [], "failed": {"*": str(error)}}

    def _keys_in_background(self, now: float) -> None:
        """Register newly enrolled node keys off the loop (each ``flwr`` call takes ~1 s)."""
        if now < self._next_key_check or not self.supervisor.up:
            return
        self._next_key_check = now + KEY_CHECK_S
        if self._key_thread is not None and self._key_thread.is_alive():
            return
        if self.enrolment.pending(now):
            self._key_thread = threading.Thread(
                target=self._sync_keys, name="zk0-enrolment", daemon=True
            )
            self._key_thread.start()

    # -- control commands ----------------------------------------------------------------------

    def _cmd_register_keys(self, args: dict[str, Any]) -> dict[str, Any]:
        if not self.supervisor.up:
            raise RefusedError(
                f"the SuperLink is {self.supervisor.state}; keys are registered once it is up"
            )
        return self._sync_keys()

    def _cmd_start_run(self, args: dict[str, Any]) -> dict[str, Any]:
        rounds = args.get("rounds")
        if rounds is not None and (
            isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1
        ):
            raise RefusedError(f"rounds must be a positive integer, got {rounds!r}")
        if self.run is not None:
            raise RefusedError(
                f"run {self.run.index} is in progress "
                f"(round {self.run.completed_rounds()}/{self.run.plan.rounds})"
            )
        decision = self._decide(time.monotonic(), ManualRequest(rounds))
        if isinstance(decision, Idle):
            raise RefusedError(f"no run started: {decision.reason}")
        run = self._start_run(decision, time.monotonic())
        if self.run is not run:
            raise RefusedError(f"run {run.index} could not start; see the hub's log")
        return run.as_dict()

    def _cmd_status(self, args: dict[str, Any]) -> dict[str, Any]:
        link = self.supervisor.link
        pointer = self.store.current()
        current = pointer.version if pointer else None
        now = time.time()
        records = [
            r for r in (self.distribution.agents() if self.distribution else []) if not r.revoked
        ]
        agents = [
            {
                "agent_id": r.agent_id,
                "online": r.online(now, self.config.heartbeat_s),
                "applied": r.applied,
                "in_use": r.in_use,
                "state": r.state,
                "episodes": r.episodes,
                "last_seen_s": round(now - r.last_seen, 1),
                "converged": current is not None and r.in_use == current,
            }
            for r in records
        ]
        return {
            "hub": {
                "pid": os.getpid(),
                "started_at": self.started_at,
                "config": str(self.config_path),
                "state_dir": str(self.state_dir),
                "log_dir": str(self.log_dir),
                "trigger": self.config.runs.trigger,
            },
            "superlink": {
                "address": link.address,
                "up": self.supervisor.up,
                "state": self.supervisor.state,
                "pid": link.pid if link.process.running else None,
                "restarts": self.supervisor.restarts,
                "last_exit": self.supervisor.last_exit,
            },
            "distribution": {
                "bind_host": self.config.bind_host,
                "publish_port": self.distribution.publish_port if self.distribution else None,
                "fetch_port": self.distribution.fetch_port if self.distribution else None,
            },
            "current_version": current,
            "versions": self.store.versions(),
            "run": self.run.as_dict() if self.run else None,
            "next_run": self.next_run,
            **self.book.as_dict(),
            "agents": agents,
            "converged": all(a["converged"] for a in agents if a["online"]),
            "enrolled": self.enrolment.enrolled(),
        }

    def _status_text(self) -> str:
        """One line for systemd's ``STATUS=`` (``systemctl status zk0-hub``)."""
        parts = [] if self.supervisor.up else [f"SuperLink {self.supervisor.state}"]
        if self.run is not None:
            parts.append(
                f"run {self.run.index} round {self.run.completed_rounds()}/{self.run.plan.rounds}"
            )
        else:
            parts.append("idle")
        online = sum(1 for a in self._agent_views() if a.online)
        parts.append(f"{online} agent{'s' if online != 1 else ''} online")
        pointer = self.store.current()
        parts.append(f"current v{pointer.version}" if pointer else "no adapter version yet")
        return ", ".join(parts)

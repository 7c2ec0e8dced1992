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

Control commands: ``zk0.shared.hub_control`` (``status``, ``start_run``, ``register_keys``),
on the control socket (``zk0.shared.control``).
"""

from __future__ import annotations

import faulthandler
import os
import threading
import time
from pathlib import Path

from loguru import logger

from zk0.hub import status as status_view
from zk0.hub.dashboard.snapshot import FleetSources, SnapshotSource
from zk0.hub.dashboard.web import DashboardServer
from zk0.hub.distribution import DistributionServer
from zk0.hub.enrolment import REGISTRY_FILE, Enrolment
from zk0.hub.runs import (
    RUNS_FILE,
    FederatedRun,
    RunBook,
    now_iso,
    run_folder,
    run_settings,
    runs_root,
)
from zk0.hub.scheduler import AgentView, Idle, ManualRequest, RunPlan, decide
from zk0.hub.superlink import CONNECTION, SuperLink, SuperLinkSettings
from zk0.shared import hub_control as hc
from zk0.shared.config import ConfigError, HubConfig, HubKeys
from zk0.shared.control import ControlServer, RefusedError
from zk0.shared.flower_keys import TlsFiles
from zk0.shared.hub_control import RunOutcome
from zk0.shared.logs import OUTPUTS_ENV, new_run_dir, setup_logging
from zk0.shared.processes import Supervised
from zk0.shared.sdnotify import Watchdog, credential_path, handle_sigterm, notify, service_dirs
from zk0.shared.store import AdapterStore

#: The longest a loop turn waits for control requests: the loop's pace.
LOOP_WAIT_S = 0.25
#: How often the loop looks for node keys to (un)register and refreshes ``STATUS=``.
KEY_CHECK_S = 2.0
STATUS_EVERY_S = 1.0
#: A (re)started SuperLink that does not listen within this long is killed and tried again.
SUPERLINK_START_S = 60.0


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
        self.link = SuperLink(settings, self.state_dir / "flwr-home", self.log_dir / "hub")
        # Restarted with a back-off when it exits; its database keeps registered nodes and
        # runs, and SuperNodes reconnect by themselves.
        self.supervisor = Supervised(
            lambda: self.link.process,
            ready=self.link.accepts,
            start_timeout_s=SUPERLINK_START_S,
            max_backoff_s=60.0,
        )
        self.enrolment = Enrolment(
            self.keys.allow_list_dir, self.state_dir / REGISTRY_FILE, self.link.flwr
        )
        self.control: ControlServer | None = None
        self.distribution: DistributionServer | None = None
        self.dashboard: DashboardServer | None = None
        self.run: FederatedRun | None = None
        self.book_path = self.state_dir / RUNS_FILE
        self.book = RunBook()
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
        self.book = RunBook.load(self.book_path)
        self.control = ControlServer(config.control_socket_path, hc.PROTOCOL, "zk0-hub")
        self.control.on(hc.Status, lambda _: self.status())
        self.control.on(hc.StartRun, self._cmd_start_run)
        self.control.on(hc.RegisterKeys, self._cmd_register_keys)
        self.control.start()
        if not self.database.exists():
            self.enrolment.forget()
        if self.link.accepts():
            # Our SuperLink would fail to bind while the readiness check saw the other one.
            raise RuntimeError(f"{self.link.address}: another process listens there already")
        self.link.write_connection()
        self.supervisor.start(wait=True)
        self._sync_keys()
        self.distribution = DistributionServer.from_config(config, keys=self.keys).start()
        if config.dashboard.enabled:
            self.dashboard = self._dashboard(self.distribution).start()

    def _dashboard(self, distribution: DistributionServer) -> DashboardServer:
        service = distribution.service
        sources = FleetSources(
            store=self.store,
            agents=distribution.agents,
            bytes_by_agent=lambda: dict(service.bytes_by_agent),
            runs_root=runs_root(self.logs_root),
            heartbeat_s=self.config.heartbeat_s,
        )
        assert self.config.keys is not None  # checked by _security
        token = self.config.dashboard.token_path(self.config.keys.curve_secret.parent)
        return DashboardServer(
            self.config.dashboard, SnapshotSource(sources), credential_path(token), self.tls
        )

    def _shutdown(self) -> None:
        notify(STOPPING=1)
        if self.run is not None:
            logger.warning("abandoning run {} (the hub is stopping)", self.run.index)
            self.run.stop()
            self._finished(self.run.abandoned("abandoned: hub stopped"))
        if self.control is not None:
            self.control.close()
        if self.dashboard is not None:
            self.dashboard.stop()
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
            AgentView(r.agent_id, r.online(now, self.config.heartbeat_s), r.report.episodes_new)
            for r in self.distribution.agents()
        ]

    def _start_run(self, plan: RunPlan, now: float) -> FederatedRun:
        index = self.book.runs_started + 1
        settings = run_settings(self.config, run_folder(self.logs_root, index), plan.rounds)
        run = FederatedRun(index, plan, settings, self.link)
        self.book.runs_started = index
        self.last_started = now
        try:
            self.run = run.start()
        except OSError as error:  # e.g. the logs folder is full: a failed run, not a dead hub
            logger.error("run {} could not start: {}", index, error)
            self._finished(run.abandoned(f"not started: {error}", returncode=-1))
            return run
        self.book.save(self.book_path)
        return run

    def _finished(self, outcome: RunOutcome) -> None:
        self.run = None
        self.last_ended = time.monotonic()
        self.book.finished(outcome, self.book_path)

    # -- node keys -----------------------------------------------------------------------------

    def _sync_keys(self) -> hc.KeySync:
        try:
            return self.enrolment.sync(CONNECTION)
        except Exception as error:  # a bad key file must not take the hub down
            logger.exception("node key registration failed")
            return hc.KeySync(failed={"*": str(error)})

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

    def _cmd_register_keys(self, _: hc.RegisterKeys) -> hc.KeySync:
        if not self.supervisor.up:
            raise RefusedError(
                f"the SuperLink is {self.supervisor.state}; keys are registered once it is up"
            )
        return self._sync_keys()

    def _cmd_start_run(self, command: hc.StartRun) -> hc.RunView:
        if self.run is not None:
            view = self.run.view()
            raise RefusedError(
                f"run {view.index} is in progress (round {view.completed_rounds}/{view.rounds})"
            )
        decision = self._decide(time.monotonic(), ManualRequest(command.rounds))
        if isinstance(decision, Idle):
            raise RefusedError(f"no run started: {decision.reason}")
        run = self._start_run(decision, time.monotonic())
        if self.run is not run:
            raise RefusedError(f"run {run.index} could not start; see the hub's log")
        return run.view()

    def status(self) -> hc.HubStatus:
        return status_view.hub_status(self)

    def _status_text(self) -> str:
        """One line for systemd's ``STATUS=`` (``systemctl status zk0-hub``)."""
        parts = [] if self.supervisor.up else [f"SuperLink {self.supervisor.state}"]
        if self.run is not None:
            view = self.run.view()
            parts.append(f"run {view.index} round {view.completed_rounds}/{view.rounds}")
        else:
            parts.append("idle")
        online = sum(1 for a in self._agent_views() if a.online)
        parts.append(f"{online} agent{'s' if online != 1 else ''} online")
        pointer = self.store.current()
        parts.append(f"current v{pointer.version}" if pointer else "no adapter version yet")
        return ", ".join(parts)

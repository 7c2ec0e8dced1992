"""``zk0-agent run``: the robot-workstation daemon.

It owns the arm's connection and composes everything else around it:

* the **inference session** (base policy, the newest verified adapter, the asynchronous
  engine), kept warm for the daemon's life; new versions are hot-swapped into it, and so are
  new revisions of the arm's local part in the personalized mode (``zk0.agent.personal_follow``);
* the **adapter subscriber** (ZeroMQ, CURVE), which fetches every version the hub publishes
  and reports this agent's state, versions, new episodes and dataset statistics to the hub;
* a supervised **Flower SuperNode** child (``flower-supernode``), restarted with back-off
  when it exits and killed with the daemon (``PR_SET_PDEATHSIG``), and beside it the warm
  **round worker** (``zk0.agent.round_worker``), supervised the same way, that runs each
  round's training and evaluation with the base built once (the ClientApp hands tasks to it);
* the **control socket** (:mod:`zk0.shared.control`) for the local CLI and for the round
  worker, which asks for the compute before every round's task (:mod:`zk0.agent.arbiter` decides).

Control commands: ``zk0.shared.agent_control`` (``zk0-agent status|start-recording|run-task|
stop-job|rollback|label|labels``, and the round worker's ``compute_begin``/``compute_end``).
Every task episode and its operator label is kept in ``<data_root>/task_episodes.jsonl``
(``zk0.agent.task_labels``).

Under systemd: ``READY=1`` once the arm is connected and the policy (the stored adapter, or
the base on a first boot) is loaded and warm, ``WATCHDOG=1`` from the main loop's progress,
``STATUS=`` on every change; SIGTERM stops the job in progress (a recording saves the episode
it was in), then the SuperNode, the subscriber and the engine, and exits 0.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE
from loguru import logger

from zk0.agent.arbiter import AgentState, Arbiter
from zk0.agent.canary import CanaryFollower
from zk0.agent.dataset_stats import DatasetStatsPacer
from zk0.agent.jobs import Job, JobKind, JobResult, JobRunner
from zk0.agent.ledger import DatasetSize, Ledger, dataset_size
from zk0.agent.personal_follow import PERSONAL_DIR, PersonalFollower
from zk0.agent.task_labels import FILE_NAME, LabelError, TaskEpisodeStore, run_task
from zk0.shared import agent_control as ac
from zk0.shared.agent_status import AgentReport, Outcome, Phase, RoundOutcome
from zk0.shared.config import AgentCompute, AgentConfig, AgentKeys, robot_config_path
from zk0.shared.control import ControlServer, RefusedError
from zk0.shared.federation import NodeSettings
from zk0.shared.logs import OUTPUTS_ENV, new_run_dir, setup_logging
from zk0.shared.processes import Supervised, free_port, process_alive
from zk0.shared.sdnotify import Watchdog, credential_path, handle_sigterm, notify, service_dirs

LOOP_TICK_S = 0.2
#: How long the SuperLink counts a node online after its last heartbeat (Flower's default
#: interval x patience), plus two of the ServerApp's 3 s polls for replies.
NODE_EXPIRY_S = HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL + 2 * 3.0


def _credential_keys(keys: AgentKeys | None) -> AgentKeys | None:
    """The key paths systemd handed over (``LoadCredential``), else the configured ones."""
    if keys is None:
        return None
    updates = {
        name: credential_path(value)
        for name, value in keys.model_dump().items()
        if isinstance(value, Path)
    }
    return keys.model_copy(update=updates)


class AgentService:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config.model_copy(update={"keys": _credential_keys(config.keys)})
        self.robot_config = config.load_robot_config()
        self.dataset_root = config.dataset_root(self.robot_config)
        self.arbiter = Arbiter()
        self.lock = threading.Lock()
        self.ledger = Ledger(config.data_root / "agent_state.json")
        self.task_episodes = TaskEpisodeStore(config.data_root / FILE_NAME)
        self.jobs = JobRunner(
            self._end_arm_job,
            lambda: self.session.engine.end_episode(),
            first_id=self.task_episodes.last_job + 1,
        )
        self._status_line = ""
        self.round_worker: Supervised | None = None
        self.canary = CanaryFollower(
            self.config, self.robot_config, self.task_episodes, self.arbiter, self.lock
        )
        self.dataset_stats = DatasetStatsPacer(self.dataset_root)  # read once a minute at most

    # -- the daemon -------------------------------------------------------------------------------
    def run(self) -> None:
        """Start everything, serve until SIGTERM, stop everything (exit 0)."""
        faulthandler.enable()
        stop = handle_sigterm(raise_exit=False)
        logs, state = service_dirs(
            Path(os.environ.get(OUTPUTS_ENV, "outputs")), self.config.data_root
        )
        run_dir = new_run_dir(logs)
        setup_logging(run_dir, "agent", self.config.agent_id)
        self.state_dir = state
        self.log_dir = run_dir / "agents" / self.config.agent_id
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_CACHE", str(state / "hf-datasets"))
        import torch

        torch.set_num_threads(self.config.torch_threads)
        watchdog = Watchdog.from_env()
        with contextlib.ExitStack() as stack:
            # First, so that a second daemon on the same socket stops before touching the arm;
            # requests wait in the socket until the loop serves them.
            self.control = self._control_server().start()
            stack.callback(self.control.close)
            notify(STATUS="connecting the arm and loading the policy")
            self._open_session(stack)
            self.subscriber = self._start_subscriber(stack)
            self.supernode = self._start_supernode(stack)
            stack.callback(self.jobs.stop)
            stack.callback(self.canary.stop)
            self._status_line = self._describe(self._report(dataset_size(self.dataset_root)))
            notify(READY=1, STATUS=self._status_line)
            logger.info("agent {} ready: {}", self.config.agent_id, self._status_line)
            try:
                while not stop.is_set():
                    self.control.serve(LOOP_TICK_S)
                    self._turn()
                    watchdog.progress()
            except Exception:
                logger.exception("the main loop failed; stopping (systemd restarts the agent)")
                raise
            notify(STOPPING=1, STATUS="stopping")
            logger.info("SIGTERM: stopping")

    def _open_session(self, stack: contextlib.ExitStack) -> None:
        from zk0.agent.distribution.subscriber import ADAPTERS_DIR
        from zk0.agent.inference.evaluation import open_session
        from zk0.agent.robots import make_robot
        from zk0.shared.store import AdapterStore

        robot = make_robot(self.robot_config)
        robot.connect(calibrate=False)
        store = AdapterStore(self.config.data_root / ADAPTERS_DIR)
        stored = store.load_current()
        adapter = store.path(stored[0].version) if stored is not None else None
        self.session = stack.enter_context(
            open_session(
                self.robot_config,
                self.config.policy,
                adapter=adapter,
                threads=self.config.torch_threads,
                robot=robot,
            )
        )
        self.personal = PersonalFollower(self.config.data_root / PERSONAL_DIR, self.session.slot)
        self.personal.start()

    def _start_subscriber(self, stack: contextlib.ExitStack) -> Any:
        from zk0.agent.distribution.subscriber import AdapterSubscriber

        def offer(version: int, folder: Path, manifest: Any) -> None:
            if version != self.session.slot.version:  # the stored one is loaded already
                self.session.engine.offer_adapter(version, folder, manifest)

        subscriber = AdapterSubscriber.from_config(
            self.config, on_new_version=offer, expected_base_id=self.session.info["base_id"]
        )
        # "In use" has one writer: the engine, naming the version of each chunk it computed
        # (attaching the callback reports the version it computed with last).
        self.session.engine.on_version_in_use = subscriber.set_in_use
        stack.enter_context(subscriber)
        return subscriber

    def _start_supernode(self, stack: contextlib.ExitStack) -> Supervised | None:
        from zk0.agent.supernode import SuperNode

        keys = self.config.keys
        if keys is None or keys.supernode_private_key is None or keys.hub_ca_cert is None:
            logger.warning("no keys.supernode_private_key/hub_ca_cert: not joining federations")
            return None
        hub, config = self.config.hub, self.config
        worker_socket = self._start_round_worker(stack)
        node = NodeSettings(
            agent_id=config.agent_id,
            data_root=self.dataset_root,
            control_socket=str(config.control_socket_path.absolute()),
            round_worker=str(worker_socket),
            personal_dir=str(self.personal.store.root.absolute()),
            # Its own arm: a simulated one is also evaluated closed loop in federated rounds.
            robot_config=str(robot_config_path(config.robot_config).absolute()),
            **{name: getattr(config, name) for name in AgentCompute.model_fields},
        )

        def make() -> Any:
            return SuperNode(
                node,
                superlink=f"{hub.host}:{hub.flower_port}",
                root_certificates=keys.hub_ca_cert,  # type: ignore[arg-type]
                private_key=keys.supernode_private_key,  # type: ignore[arg-type]
                port=free_port(),
                flwr_home=self.state_dir / "flwr-home",
                log_dir=self.log_dir,
            ).process

        supervised = Supervised(make)
        # After a crash the SuperLink still counts this node online until its heartbeats are
        # overdue. A SuperNode back with the same key before the ServerApp saw that would take
        # over the node, and the message the dead one held would never fail: the round would
        # wait for it until its timeout. So it comes back only once that message has failed.
        delay_s = NODE_EXPIRY_S if self.control.replaced_stale else 0.0
        if delay_s:
            logger.warning(
                "the last agent died uncleanly: joining federations in {:.0f} s", delay_s
            )
        supervised.start(delay_s=delay_s)
        stack.callback(supervised.stop)
        return supervised

    def _start_round_worker(self, stack: contextlib.ExitStack) -> Path:
        from zk0.agent.round_worker import supervised_worker

        socket_path = self.config.control_socket_path.with_suffix(".worker.sock").absolute()
        self.round_worker = supervised_worker(
            socket_path, self.log_dir, self.config.agent_id, self.config.round_worker_nice
        )
        stack.callback(self.round_worker.stop)
        return socket_path

    def _turn(self) -> None:
        """One bounded turn of the main loop (besides answering the control socket)."""
        with self.lock:
            dead = self.arbiter.reap(process_alive)
        if dead is not None and not self.canary.owns(dead.pid):  # a round's, not the canary's
            why = "its round worker died while it held the compute"
            logger.warning(
                "round {} ({}) ended without a reply: {}", dead.server_round, dead.phase, why
            )
            self._round_ended(dead.server_round, dead.phase, "dropped", why)
        if self.round_worker is not None:
            self.round_worker.check()
        if self.supernode is not None:
            self.supernode.check()
        self.personal.check()  # a round's new local revision: hot-swapped like a fleet version
        self.canary.check(self.subscriber.status().under_gate)  # a canary evaluates, once
        report = self._report(dataset_size(self.dataset_root))  # one read of info.json per turn
        self.subscriber.set_report(report)
        line = self._describe(report)
        if line != self._status_line:
            self._status_line = line
            notify(STATUS=line)

    # -- what the agent reports ---------------------------------------------------------------
    def _report(self, size: DatasetSize) -> AgentReport:
        running = self.jobs.running
        return AgentReport(
            state=self.arbiter.state.value,
            episodes_new=max(0, size.episodes - self.ledger.episodes_at_last_round),
            episodes_total=size.episodes,
            frames_total=size.frames,
            recorded_s=size.recorded_s,
            job=running.kind if running is not None else None,
            last_round=self.ledger.last_round,
            personal_revision=self.session.slot.personal_revision,
            canary=self.canary.result,
            dataset=self.dataset_stats.current(),  # the subscriber sends it once a minute
        )

    def _describe(self, report: AgentReport) -> str:
        adapter = self.session.slot.active.label  # v3, or v3+r2 with a local part
        episodes = f"{report.episodes_total} episodes ({report.episodes_new} new)"
        return f"{report.state}, adapter {adapter}, {episodes}"

    def status(self) -> ac.AgentStatus:
        sync = self.subscriber.status()
        lease = self.arbiter.lease
        return ac.AgentStatus(
            agent_id=self.config.agent_id,
            pid=os.getpid(),
            report=self._report(dataset_size(self.dataset_root)),
            applied=sync.applied,
            in_use=sync.in_use,
            sync=sync.sync,
            bytes_received=sync.bytes_rx,
            dataset_root=str(self.dataset_root),
            training=ac.Training(round=lease.server_round, phase=lease.phase) if lease else None,
            supernode=ac.SuperNodeView(
                running=self.supernode is not None and self.supernode.running,
                restarts=self.supernode.restarts if self.supernode is not None else 0,
            ),
            job=self.jobs.view(),
            tasks=self.task_episodes.version_counts(self.session.slot.version),
        )

    # -- control handlers ---------------------------------------------------------------------
    def _control_server(self) -> ControlServer:
        server = ControlServer(self.config.control_socket_path, ac.PROTOCOL, "zk0-agent")
        server.on(ac.Status, lambda _: self.status())
        server.on(ac.Record, self._record)
        server.on(ac.RunTask, self._run_task)
        server.on(ac.StopJob, lambda _: ac.JobStopped(stopped=self.jobs.stop_current()))
        server.on(ac.Rollback, self._rollback)
        server.on(ac.Label, self._label)
        server.on(ac.Labels, lambda c: self.task_episodes.view(c.job, c.limit))
        server.on(ac.ComputeBegin, self._compute_begin)
        server.on(ac.ComputeEnd, self._compute_end)
        return server

    def _start_arm_job(
        self, state: AgentState, kind: JobKind, work: Callable[[Job], JobResult]
    ) -> ac.JobStarted:
        with self.lock:
            try:
                self.arbiter.start_arm_job(state)
            except ValueError as error:
                raise RefusedError(str(error)) from None
        job = self.jobs.new(kind, work)
        self.jobs.start(job)
        return ac.JobStarted(job=job.view())

    def _end_arm_job(self) -> None:
        with self.lock:
            self.arbiter.end_arm_job()

    def _record(self, command: ac.Record) -> ac.JobStarted:
        from zk0.agent.recording import record_episodes

        def record(job: Job) -> JobResult:
            result = record_episodes(
                self.robot_config,
                self.dataset_root,
                command.episodes,
                resume=(self.dataset_root / "meta" / "info.json").is_file(),
                robot=self.session.arm.robot,
                stop=job.stop,
                on_episode=lambda summary: job.report(summary.describe()),
            )
            return ac.RecordResult(
                saved=len(result.saved),
                total_episodes=result.total_episodes,
                success_rate=result.success_rate,
                stopped_by=result.stopped_by,
            )

        return self._start_arm_job(AgentState.RECORDING, "record", record)

    def _run_task(self, command: ac.RunTask) -> ac.JobStarted:
        def work(job: Job) -> JobResult:
            return run_task(
                self.session, self.task_episodes, job, command.episodes, command.horizon_s
            )

        return self._start_arm_job(AgentState.RUNNING_POLICY, "run_task", work)

    def _label(self, command: ac.Label) -> ac.Labelled:
        try:
            episode = self.task_episodes.label(command.label, command.episode, command.relabel)
        except LabelError as error:
            raise RefusedError(str(error)) from None
        logger.info("task episode {} labelled {}", episode.id, episode.label)
        return ac.Labelled(episode=episode)

    def _rollback(self, _: ac.Rollback) -> ac.RolledBack:
        return self.personal.rollback()  # the fleet version and the local revision

    def _compute_begin(self, command: ac.ComputeBegin) -> ac.ComputeGrant:
        with self.lock:
            reason = self.arbiter.request_compute(
                command.pid, command.round, command.phase, time.time()
            )
        if reason is None and command.phase == "train":
            self.ledger.trained(dataset_size(self.dataset_root).episodes)
        return ac.ComputeGrant(granted=reason is None, reason=reason)

    def _compute_end(self, command: ac.ComputeEnd) -> ac.ComputeReleased:
        with self.lock:
            released = self.arbiter.release_compute(command.pid)
        outcome: Outcome = "skipped" if command.outcome == "skipped" else "dropped"
        if command.outcome == "replied":
            outcome = "trained" if command.phase == "train" else "evaluated"
        self._round_ended(command.round, command.phase, outcome, command.reason)
        return ac.ComputeReleased(released=released)

    def _round_ended(
        self, server_round: int, phase: Phase, outcome: Outcome, reason: str | None
    ) -> None:
        self.ledger.ended(
            RoundOutcome(
                round=server_round,
                phase=phase,
                outcome=outcome,
                reason=reason[:300] if reason else None,
                at=time.time(),
            )
        )

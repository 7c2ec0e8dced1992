"""The hub's Flower ServerApp: shared statistics, round-0 evaluation, LoRA rounds, versions.

1. Wait for ``min-nodes`` SuperNodes.
2. Start from the adapter store's current version (a restarted hub continues where it stopped);
   on an empty store, gather every node's statistics, combine them exactly, and store version 0:
   a fresh adapter carrying the shared normalization.
3. Federated evaluation of the starting adapter (round 0), then ``num-server-rounds`` rounds of
   LoRAFedAvg, each ending in a new stored version with its metrics. With a ``server-optimizer``
   its state is saved in the run folder after each version and picked up again by a restarted
   hub of the same run (``zk0.hub.server_optimizer``).
   With canaries (``gate-timeout-s`` > 0, set by the hub from ``canary:``) a version is stored
   under gate instead of made current, and the next round waits for the gate's decision and
   starts from the newest promoted version (``zk0.hub.gate``).
4. ``eval_mse_history.json``, ``eval_mse_chart.png`` and a summary table in the run folder:
   MSE and, where simulated agents ran closed-loop episodes (``success-episodes``), success;
   per round also the agents dropped or skipped and why, and its seconds.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    MetricRecord,
)
from flwr.serverapp import Grid, ServerApp
from loguru import logger

from zk0.hub.aggregation import Arrays
from zk0.hub.fleet import load_fleet
from zk0.hub.fleet_stats import gather_stats
from zk0.hub.gate import GateBook, wait_for_decision
from zk0.hub.history import EvalHistory
from zk0.hub.masters import MasterAdapters
from zk0.hub.prompt_grid import PromptGrid
from zk0.hub.server_optimizer import OptimizerState, load_state, run_key, save_state, state_path
from zk0.hub.strategy import LoRAFedAvg, to_numpy, to_record
from zk0.shared.adapter_bounds import (
    BoundsVerdict,
    NormHistory,
    Norms,
    base_weight_norms,
    check_adapter,
)
from zk0.shared.artifact import (
    ArtifactError,
    as_stored,
    load_arrays,
    save_adapter,
    save_adapter_arrays,
)
from zk0.shared.config import load_robot_config
from zk0.shared.features import PolicyFeatures
from zk0.shared.federation import (
    EVAL_MSE,
    FLEET_VERSION,
    NORMALIZATION,
    RunSettings,
)
from zk0.shared.logs import new_run_dir, setup_logging
from zk0.shared.lora import adapter_state, apply_lora
from zk0.shared.normalization import (
    NORMALIZATION_FILE,
    Stats,
    dumps,
    loads,
)
from zk0.shared.policy_factory import build_policy, resolve_base
from zk0.shared.store import AdapterStore

app = ServerApp()


class Publisher:
    """Turns aggregated arrays into verified store versions (the hub's half of the artifact).

    A version is stored only if its adapter keeps the run's ``adapter_bounds``
    (``zk0.shared.adapter_bounds``) against the base's weights and the stored versions' norms;
    one that does not is logged with its reason and not stored, and the previous version stays
    current. The strategy asks :meth:`out_of_bounds` first, so such arrays are not trained on.
    """

    def __init__(self, settings: RunSettings, store: AdapterStore) -> None:
        self.features = PolicyFeatures.from_robot_config(
            load_robot_config(settings.robot_config_path)
        )
        self.settings = settings
        self.base = resolve_base(settings.policy, self.features)
        self.lora = settings.lora
        self.store = store
        self.bounds = settings.adapter_bounds
        self._base_norms: Norms | None = None  # read from the base checkpoint on first use
        self._base_norms_read = False
        self._norms = NormHistory()  # per stored artifact, so each publish reads only its own
        #: Canary rollout (``gate-timeout-s`` > 0): versions wait under gate (zk0.hub.gate).
        self.gates = GateBook(store.root) if settings.gate_timeout_s > 0 else None
        self.masters = MasterAdapters(store.root)

    def fresh_adapter(self, stats: Stats) -> tuple[int, Arrays]:
        """Version 0: a freshly initialised adapter carrying the shared normalization. The
        only time the hub builds the policy: later versions are written from arrays."""
        loaded = build_policy(self.settings.policy, self.features, device="cpu")
        peft_model = apply_lora(loaded.policy, self.lora, loaded.base.name_or_path)
        with self.store.allocate() as (version, path):
            save_adapter(
                peft_model,
                path,
                version=version,
                base=loaded.base,
                lora=self.lora,
                round_=0,
                extra_files={NORMALIZATION_FILE: dumps(stats)},
            )
        master = {k: v.numpy() for k, v in adapter_state(peft_model).items()}
        self.masters.save(version, master)
        self._announce(version, 0)  # B = 0: the base itself, nothing for a gate to judge
        return version, master

    def publish(
        self,
        arrays: Arrays,
        stats: Stats,
        parent: int,
        round_: int | None,
        metrics: dict[str, Any],
    ) -> int:
        """A new version: ``parent``'s adapter with the aggregated ``arrays`` (stored rounded,
        the float32 master beside it); ``parent`` again (nothing stored) when the version would
        break the bounds."""
        stored = as_stored(arrays)  # what agents will run: every check is on these
        verdict = self._verdict(stored)
        if verdict.reason is not None:
            logger.error(
                "round {}: the aggregated adapter is not stored ({}); version {} stays current",
                round_,
                verdict.reason,
                parent,
            )
            return parent
        with self.store.allocate() as (version, path):
            manifest = save_adapter_arrays(
                self.store.path(parent),
                path,
                stored,
                version=version,
                parent_version=parent,
                round_=round_,
                metrics=metrics,
                extra_files={NORMALIZATION_FILE: dumps(stats)},
            )
        self.masters.save(version, arrays)
        self._norms.remember(manifest.artifact_id, verdict.norms)
        current = self.store.current()
        if self.gates is not None and current is not None:
            self.gates.open(version, baseline=current.version)
        else:
            self._announce(version, round_)
        return version

    def out_of_bounds(self, arrays: Arrays) -> str | None:
        """Why ``arrays`` may not become a version (one line), or None."""
        return self._verdict(as_stored(arrays)).reason

    def _verdict(self, arrays: Arrays) -> BoundsVerdict:
        if not self._base_norms_read:
            self._base_norms_read = True
            try:
                self._base_norms = base_weight_norms(self.base)
            except (ArtifactError, OSError, ValueError) as error:  # the run goes on, less checked
                logger.error(
                    "base weights of {} unreadable ({}): rho is not checked", self.base.spec, error
                )
        latest = self.store.latest_version()
        rejected = self.gates.withdrawn() if self.gates is not None else []
        previous = (
            self._norms.previous(self.store, below=latest + 1, skip=rejected)
            if latest is not None
            else []
        )
        return check_adapter(
            arrays, self.lora.alpha / self.lora.rank, self.bounds, self._base_norms, previous
        )

    def _announce(self, version: int, round_: int | None) -> None:
        manifest = self.store.set_current(version)
        logger.info(
            "published version {} ({}…), round {}", version, manifest.artifact_id[:12], round_
        )

    def after_gate(self, version: int) -> int:
        """The version the next round starts from once ``version``'s gate is decided (itself,
        or the promoted one it was compared with); ``version`` itself without a gate."""
        if self.gates is None or self.gates.get(version) is None:
            return version
        record = wait_for_decision(self.gates, version, self.settings.gate_timeout_s)
        logger.info("version {} {} by its canary gate: {}", version, record.state, record.reason)
        if record.state == "promoted":
            return version
        current = self.store.current()
        return current.version if current is not None else record.baseline

    def arrays(self, version: int) -> Arrays:
        """What training continues from after ``version``: its float32 master (``masters``)."""
        return self.masters.starting_point(version, load_arrays(self.store.path(version)))

    def starting_point(self) -> tuple[int, int, Arrays, Stats] | None:
        """(version, round, arrays, stats) of the store's current version, if any."""
        current = self.store.load_current()
        if current is None:
            return None
        pointer, manifest = current
        if manifest.base.id != self.base.base_id or manifest.lora != self.lora:
            raise ArtifactError(
                f"{self.store.root}: current version {pointer.version} was built on "
                f"{manifest.base.id} with {manifest.lora}, not on this run's base and LoRA"
            )
        folder = self.store.path(pointer.version)
        if NORMALIZATION_FILE not in manifest.files:
            raise ArtifactError(f"{folder}: carries no shared normalization statistics")
        stats = loads((folder / NORMALIZATION_FILE).read_bytes())
        return pointer.version, manifest.round or 0, self.arrays(pointer.version), stats


def wait_for_nodes(grid: Grid, count: int, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while len(nodes := list(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {len(nodes)} of {count} SuperNodes connected in {timeout_s:.0f}s"
            )
        time.sleep(1.0)
    return nodes


@app.main()
def main(grid: Grid, context: Context) -> None:
    grid = PromptGrid(grid)  # replies noticed within 0.2 s, not Flower's 3 s polls
    settings = RunSettings.from_flower(dict(context.run_config), "run config")
    run_dir = Path(settings.run_dir) if settings.run_dir else new_run_dir()
    setup_logging(run_dir, "hub")
    store = AdapterStore(
        Path(settings.store_root) if settings.store_root else run_dir / "hub" / "adapters"
    )
    publisher = Publisher(settings, store)
    nodes = wait_for_nodes(grid, settings.min_nodes, settings.round_timeout_s)
    start = publisher.starting_point()
    outliers: dict[str, str] = {}  # a resumed run keeps its stored normalization: none known
    if start is None:
        stats, outliers = gather_stats(grid, nodes, settings.round_timeout_s, settings)
        version, fresh = publisher.fresh_adapter(stats)
        start = (version, 0, fresh, stats)
    version, first_round, arrays, stats = start
    logger.info(
        "starting from version {} (round {}), {} rounds",
        version,
        first_round,
        settings.num_server_rounds,
    )

    optimizer_state: OptimizerState | None = None
    if settings.server_optimizer != "none":
        optimizer_state = load_state(
            state_path(run_dir),
            kind=settings.server_optimizer,
            run=run_key(run_dir),
            version=version,
            reference=arrays,
        )
    state = {"version": version}

    def start_from(server_round: int) -> Arrays | None:
        """Before a round: wait for the last version's canary gate; after a rejection, train
        from the promoted version, with a fresh server optimizer (its momentum carried the
        rejected step)."""
        parent = publisher.after_gate(state["version"])
        if parent == state["version"]:
            return None
        logger.info("round {}: training from version {}", server_round, parent)
        state["version"] = parent
        config[FLEET_VERSION] = parent
        if strategy.optimizer_state is not None:
            strategy.optimizer_state = OptimizerState(strategy.optimizer_state.kind)
        return publisher.arrays(parent)

    strategy = LoRAFedAvg(
        aggregation=settings.aggregation,
        optimizer=settings,
        optimizer_state=optimizer_state,
        success_episodes=settings.success_episodes_at,
        robust=settings,
        accept=publisher.out_of_bounds,
        start_from=start_from if publisher.gates is not None else None,
        held_frames=lambda: {
            record.agent_id: record.report.frames_total for record in load_fleet(store.root)[1]
        },
        excluded=outliers,
        fraction_train=settings.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=settings.min_nodes,
        min_evaluate_nodes=settings.min_nodes,
        min_available_nodes=settings.min_nodes,
    )
    # FLEET_VERSION: the version a round trains from, which a personalized arm records with its
    # local revision (updated as each round publishes).
    config = ConfigRecord({NORMALIZATION: dumps(stats), FLEET_VERSION: version})
    history = EvalHistory(settings.aggregation)

    def end_of_round(server_round: int, round_arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:  # Flower calls this before round 1: evaluate the starting adapter
            replies = grid.send_and_receive(
                strategy.configure_evaluate(0, round_arrays, config, grid),
                timeout=settings.round_timeout_s,
            )
            strategy.aggregate_evaluate(0, replies)
        report = strategy.report(server_round)
        history.add_round(
            server_round,
            report.eval_mse,
            report.eval_examples,
            success=report.success,
            success_asked=report.success_asked,
            dropped=report.dropped,
            skipped=report.skipped,
            round_s=report.elapsed_s(),
            aggregation_s=report.aggregation_s,
        )
        average = history.average[-1]
        if server_round > 0 and report.trained:
            metrics: dict[str, Any] = {
                "eval_mse": average,
                "aggregation": settings.aggregation,
                "clients_trained": len(report.trained),
                "clients_dropped": len(report.dropped),
                "clients_skipped": len(report.skipped),
                "bytes_sent": report.bytes_sent,
                "bytes_received": report.bytes_received,
                "train_wall_s": report.train_wall_s,
                "slowest_client_train_s": report.slowest_train_s,
                "slowest_client_task_s": report.slowest_task_s,
                "clientapp_start_s": report.clientapp_start_s,
                "handover_s": report.handover_s,
            }
            if report.aggregation_s is not None:
                metrics["aggregation_s"] = report.aggregation_s
            if (success := history.success_average[-1]) is not None:
                metrics["eval_success_rate"] = success.rate
                metrics["eval_success_episodes"] = success.episodes
            state["version"] = publisher.publish(
                to_numpy(round_arrays),
                stats,
                parent=state["version"],
                round_=first_round + server_round,
                metrics=metrics,
            )
            config[FLEET_VERSION] = state["version"]
            if strategy.optimizer_state is not None:  # after the version it continues from
                try:
                    save_state(
                        state_path(run_dir),
                        strategy.optimizer_state,
                        run=run_key(run_dir),
                        version=state["version"],
                    )
                except OSError as error:  # costs a restart its momentum, not the run its round
                    logger.warning("server optimizer state not saved: {}", error)
        history.write(run_dir)
        return MetricRecord({EVAL_MSE: average}) if average is not None else None

    strategy.start(
        grid,
        to_record(arrays),
        num_rounds=settings.num_server_rounds,
        timeout=settings.round_timeout_s,
        train_config=config,
        evaluate_config=config,
        evaluate_fn=end_of_round,
    )
    history_path, chart_path = history.write(run_dir)
    for line in history.summary_lines():
        logger.info(line)
    logger.info(
        "history {}, chart {}, newest version {}", history_path, chart_path, state["version"]
    )

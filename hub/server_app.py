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
from zk0.hub.history import EvalHistory
from zk0.hub.prompt_grid import PromptGrid
from zk0.hub.publisher import Publisher
from zk0.hub.server_optimizer import OptimizerState, load_state, run_key, save_state, state_path
from zk0.hub.strategy import LoRAFedAvg, to_numpy, to_record
from zk0.shared.artifact import load_arrays
from zk0.shared.federation import (
    EVAL_MSE,
    FLEET_VERSION,
    NORMALIZATION,
    RunSettings,
)
from zk0.shared.logs import new_run_dir, setup_logging
from zk0.shared.normalization import dumps
from zk0.shared.store import AdapterStore

app = ServerApp()


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

    def as_run(server_round: int, arrays: Arrays) -> Arrays:
        """What the arms run: the starting version as it is stored (round 0), else what the
        round's version will store (evaluation runs before it is published)."""
        if server_round == 0:
            return load_arrays(store.path(state["version"]))
        return publisher.stored_form(arrays, state["version"])[0]

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
        as_run=as_run,
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

"""``zk0 bench robustness``: does one bad insider (or three) move the fleet's adapter?

Ten arms, 1 then 3 of them malicious; every attack against every aggregation mode for a few
rounds, each compared with the same run of the honest arms alone (9, or 7; same seeds)::

    4 variants --cached recorder--> 10 arms (disjoint episode blocks; 8 train, 2 held out)
       |
       |  per (fraction, mode, attack or none):
       v
    stats query: honest stats (+ poisoned ones) --select_robust_stats--> fleet normalization
       |                                                       (the ServerApp's gather_stats)
    Publisher.fresh_adapter(stats) -> version 0              (a real AdapterStore, temp dir)
       |
       +-- round r: LoRAFedAvg.configure_train (the ServerApp's strategy, accept=Publisher
       |            .out_of_bounds) -> honest arms train for real (train_policy, cached by
       |            hash) + malicious replies forged from the mean honest update
       |            -> aggregate_train (screening, caps, order statistics, bounds)
       |            -> Publisher.publish when the round trained (as the ServerApp does)
       |            -> every stored version re-checked here: finite, ‖ΔW‖ <= rho‖W‖ and
       |               <= growth x earlier versions, from explicit float64 products
       v
    final version -> mean held-out MSE over the honest arms -> relative change vs honest-only

Then one attack per fraction runs end to end through a Flower simulation
(``_robustness_flower``, the result's ``flower``). Counts in the JSON: ``rounds_lost``
(aggregate_train raised out of the strategy: the run would end), ``bad_versions_stored`` (a
stored version non-finite or out of bounds), both over the matrix and the Flower runs.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, cast

import numpy as np
import torch
import typer
from flwr.app import ConfigRecord
from loguru import logger

from zk0.bench._common import flower_task_identity, write_result
from zk0.bench._learning_clients import Client
from zk0.bench._robustness_attacks import ATTACKS, Attack, mean_arrays, poisoned, train_reply
from zk0.bench._robustness_bounds import StoredVersionCheck, base_norms
from zk0.bench._robustness_fleet import Fleet, Training, arrays_digest, fleet_clients
from zk0.bench._robustness_flower import block_datasets, flower_runs
from zk0.bench._robustness_summary import BARS, CLIENTS, relative, summarize
from zk0.hub.aggregation import Arrays
from zk0.hub.publisher import Publisher
from zk0.hub.strategy import LoRAFedAvg, to_record
from zk0.shared.artifact import load_arrays
from zk0.shared.features import PolicyFeatures
from zk0.shared.federation import (
    FLEET_VERSION,
    NORMALIZATION,
    RunSettings,
)
from zk0.shared.normalization import (
    NORMALIZATION_FILE,
    Stats,
    combine_all,
    dropped_from,
    dumps,
    loads,
    select_robust_stats,
)
from zk0.shared.policy_factory import build_policy
from zk0.shared.store import AdapterStore

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

#: Aggregation modes, each with the product's default screening (RunSettings' defaults).
MODES: dict[str, dict[str, Any]] = {
    "fedavg": {"aggregation": "fedavg"},
    "svd": {"aggregation": "svd"},
    "ffa": {"aggregation": "ffa"},
    "fedavg+trimmed-mean": {"aggregation": "fedavg", "order_statistic": "trimmed-mean"},
    "fedavg+median": {"aggregation": "fedavg", "order_statistic": "median"},
}
#: RunSettings' defaults but lr 1e-3 (as bench learning): at the default 1e-4, three rounds of
#: 20 steps barely move the MSE, and any attack would look harmless.
TRAINING = RunSettings(policy="tiny-sim-base", local_steps=20, batch_size=8, lr=1e-3, seed=0)


class _Grid:
    """What ``configure_train`` asks of Flower's Grid: the connected node ids."""

    def __init__(self, nodes: int) -> None:
        self.nodes = list(range(1, nodes + 1))

    def get_node_ids(self) -> list[int]:
        return self.nodes


class Bench:
    def __init__(
        self, fleet: Fleet, rounds: int, mse_frames: int, work: Path, check: StoredVersionCheck
    ) -> None:
        self.fleet, self.rounds, self.mse_frames, self.work = fleet, rounds, mse_frames, work
        self.check = check
        self.runs = 0
        self.v0_digest: bytes | None = None

    def run(
        self, mode: str, honest: list[Client], malicious: list[Client], attack: Attack | None
    ) -> dict[str, Any]:
        """One run of the hub's round loop; its rounds, stored versions and final MSE."""
        clients = honest + malicious
        settings = TRAINING.model_copy(
            update={**MODES[mode], "num_server_rounds": self.rounds, "min_nodes": len(clients)}
        )
        settings = RunSettings.model_validate(settings.model_dump())  # validated, as a run is
        # The stats query (gather_stats): honest arms report their own; a stats attacker a
        # poisoned copy of its own; the other attackers skip it (module doc of the attacks).
        per_agent: dict[str, Stats] = {c.name: c.stats for c in honest}
        if attack is not None and attack.poisons_stats:
            per_agent.update({c.name: poisoned(c.stats) for c in malicious})
        selected, stats_notes = select_robust_stats(
            per_agent, settings.max_client_share, settings.stats_outlier_z
        )
        stats = combine_all(selected)
        self.runs += 1
        store = AdapterStore(self.work / f"run-{self.runs:03d}" / "adapters")
        publisher = Publisher(settings, store)
        torch.manual_seed(settings.seed)  # version 0's LoRA init: the same in every run
        version, arrays = publisher.fresh_adapter(stats)
        digest = arrays_digest(arrays)
        if self.v0_digest is None:
            self.v0_digest = digest
        assert digest == self.v0_digest, "version 0 differs between runs: baselines unpaired"
        strategy = LoRAFedAvg(
            aggregation=settings.aggregation,
            optimizer=settings,
            robust=settings,
            accept=publisher.out_of_bounds,
            excluded=dropped_from(stats_notes),  # as the ServerApp's gather_stats reports
            fraction_train=settings.fraction_train,
            fraction_evaluate=1.0,
            min_train_nodes=settings.min_nodes,
            min_evaluate_nodes=settings.min_nodes,
            min_available_nodes=settings.min_nodes,
        )
        grid = cast(Any, _Grid(len(clients)))
        config = ConfigRecord({NORMALIZATION: dumps(stats), FLEET_VERSION: version})
        stored_norms: list[dict[str, float]] = [self.check.norms(store, version)]
        rounds, bad, lost = [], 0, 0
        for r in range(1, self.rounds + 1):
            list(strategy.configure_train(r, to_record(arrays), config, grid))
            replies, honest_arrays, counts = [], [], []
            for client in honest:
                update, examples = self.fleet.train(
                    client, arrays, stats, r, settings.aggregation == "ffa"
                )
                replies.append(train_reply(update, examples, client.name))
                honest_arrays.append(update)
                counts.append(examples)
            if attack is not None:
                mean = mean_arrays(honest_arrays)
                claimed = attack.examples or int(np.median(counts))
                for index, client in enumerate(malicious):
                    forged = attack.forge(mean, arrays, index, r)
                    replies.append(train_reply(forged, claimed, client.name))
            raised = None
            try:
                record, _ = strategy.aggregate_train(r, replies)
            except Exception as error:  # in Flower's loop this ends the run: a round lost
                record, raised, lost = None, f"{type(error).__name__}: {error}", lost + 1
            report = strategy.report(r)
            stored = None
            if record is not None and report.trained:  # the ServerApp's end_of_round
                new = publisher.publish(
                    {k: v.numpy() for k, v in record.items()}, stats, version, r, {}
                )
                if new != version:
                    version, stored = new, new
                    why = self.check.recheck(store, version, stored_norms)
                    bad += why is not None
                    stored_norms.append(self.check.norms(store, version))
                    if why is not None:
                        logger.error("bad version {} stored: {}", version, why)
                # Flower trains the next round on the aggregate whether or not it was stored;
                # the strategy's accept= makes the two the same.
                arrays = {k: v.numpy() for k, v in record.items()}
            rounds.append(
                {
                    "round": r,
                    "dropped": dict(report.dropped),
                    "clipped": dict(report.clipped),
                    "aggregation_failed": report.aggregation_failed,
                    "raised": raised,
                    "stored_version": stored,
                }
            )
        final = load_arrays(store.path(version))
        final_stats = loads((store.path(version) / NORMALIZATION_FILE).read_bytes())
        per_client = {
            c.name: self.fleet.mse(final, final_stats, c, self.mse_frames) for c in honest
        }
        result: dict[str, Any] = {
            "mse": float(np.mean(list(per_client.values()))),
            "mse_per_client": per_client,
            "final_version": version,
            "bad_versions_stored": bad,
            "rounds_lost": lost,
            "stats_notes": stats_notes,
            "rounds": rounds,
        }
        if attack is None:  # the honest fleet's starting point, to read the changes against
            start = {c.name: self.fleet.mse(_v0(store), stats, c, self.mse_frames) for c in honest}
            result["round0_mse"] = float(np.mean(list(start.values())))
        shutil.rmtree(store.root.parent, ignore_errors=True)
        return result


def _v0(store: AdapterStore) -> Arrays:
    tensors: Arrays = load_arrays(store.path(store.versions()[0]))
    return tensors


@app.command()
def main(
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the result here.")] = None,
    rounds: Annotated[int, typer.Option(min=1, max=10)] = 3,
    attacks: Annotated[str, typer.Option(help="Comma list (default: all).")] = ",".join(ATTACKS),
    modes: Annotated[str, typer.Option(help="Comma list (default: all).")] = ",".join(MODES),
    fractions: Annotated[str, typer.Option(help="Malicious arms of 10, comma list.")] = "1,3",
    local_steps: Annotated[int, typer.Option(min=1)] = TRAINING.local_steps,
    mse_frames: Annotated[int, typer.Option(min=1, help="Held-out frames per arm.")] = 24,
    flower: Annotated[
        bool, typer.Option(help="Also run one attack per fraction through Flower.")
    ] = True,
) -> None:
    """Every attack x aggregation mode x malicious fraction against its honest-only baseline."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    chosen_attacks = [a.strip() for a in attacks.split(",") if a.strip()]
    chosen_modes = [m.strip() for m in modes.split(",") if m.strip()]
    bad_names = sorted(set(chosen_attacks) - set(ATTACKS)) + sorted(set(chosen_modes) - set(MODES))
    if bad_names:
        raise typer.BadParameter(f"unknown attacks or modes {bad_names}")
    counts = [int(f) for f in fractions.split(",") if f.strip()]
    settings = TRAINING.model_copy(update={"local_steps": local_steps})
    features = PolicyFeatures.from_robot_config(_robot_config())
    base = build_policy(settings.policy, features, device="cpu")
    clients, client_setup = fleet_clients(CLIENTS, base.policy.config)
    fleet = Fleet(
        base.policy,
        settings.lora,
        Training(settings.local_steps, settings.batch_size, settings.lr, settings.seed),
    )
    check = StoredVersionCheck(base_norms(base.policy), TRAINING.adapter_bounds)
    work = Path(tempfile.mkdtemp(prefix="zk0-bench-robustness-"))
    bench = Bench(fleet, rounds, mse_frames, work, check)
    detail: dict[str, Any] = {}
    flower_detail: dict[str, Any] = {}
    flower_error: str | None = None
    # Flower's ServerApp runtime sets a task identity before a strategy builds messages.
    identity = contextlib.ExitStack()
    identity.enter_context(flower_task_identity())

    def report(complete: bool) -> dict[str, Any]:
        return {
            **summarize(detail, chosen_modes, chosen_attacks, flower_detail),
            "wall_s": time.perf_counter() - started,
            "complete": complete,
            "flower_error": flower_error,
            "setup": {
                "clients": client_setup,
                "variants_source": "zk0.shared.sim_variants.CLIENT_VARIANTS cycled (arm i: "
                "variant i % 4), each arm a disjoint 10-episode block of that variant's cached "
                "40-episode recording (bench._learning_clients.make_clients): distinct scenes "
                "from the variant's seeded scene sequence, not re-recorded with new seeds",
                "malicious": {str(k): [c.name for c in clients[CLIENTS - k :]] for k in counts},
                "flower": "claims-10M end to end: arm i's block as its own dataset (node "
                "sim-NN), the product's ServerApp and ClientApp, the last k nodes running "
                "bench._robustness_clientapp (trains, then replies its step undone claiming "
                "10,000,000 examples, no statistics); MSE is each honest node's own final "
                "evaluation (eval-frames = mse-frames); personal-rank 0"
                if flower
                else None,
                "baseline": "the same run with only the honest arms (same seeds, data, v0)",
                "run_settings": settings.to_flower(),
                "modes": {m: MODES[m] for m in chosen_modes},
                "attacks": {a: _attack_doc(ATTACKS[a]) for a in chosen_attacks},
                "rounds": rounds,
                "mse": f"mean over honest arms of held-out MSE ({mse_frames} frames each, "
                "standardized action units) of the final stored version with its normalization",
                "bars": BARS,
                "honest_trainings": fleet.trainings,
                "honest_training_cache_hits": fleet.training_hits,
                "mse_measurements": fleet.measurements,
            },
            "detail": detail,
        }

    try:
        for count in counts:
            honest, malicious = clients[: CLIENTS - count], clients[CLIENTS - count :]
            fraction = detail.setdefault(f"{count}_of_{CLIENTS}", {})
            for mode in chosen_modes:
                clock = time.perf_counter()
                baseline = bench.run(mode, honest, [], None)
                entry: dict[str, Any] = {"baseline": baseline, "attacks": {}}
                fraction[mode] = entry
                for name in chosen_attacks:
                    result = bench.run(mode, honest, malicious, ATTACKS[name])
                    result["baseline_mse"] = baseline["mse"]
                    result["relative_mse_change"] = relative(result["mse"], baseline["mse"])
                    entry["attacks"][name] = result
                logger.info(
                    "bench robustness: {} of {}, {}: {:.0f}s, {} trainings ({} cached)",
                    count,
                    CLIENTS,
                    mode,
                    time.perf_counter() - clock,
                    fleet.trainings,
                    fleet.training_hits,
                )
                if json_path is not None:  # a long run leaves what it measured if cut short
                    json_path.parent.mkdir(parents=True, exist_ok=True)
                    json_path.write_text(json.dumps(report(complete=False), indent=2) + "\n")
        if flower:
            robust_mode = summarize(detail, chosen_modes, chosen_attacks)["robust_mode"]
            plan = {
                count: MODES["fedavg" if count == 1 else robust_mode or "fedavg+trimmed-mean"]
                for count in counts
            }
            clock = time.perf_counter()
            try:
                flower_runs(
                    settings.model_copy(
                        update={"eval_frames": mse_frames, "num_server_rounds": rounds}
                    ),
                    block_datasets(clients, client_setup),
                    plan,
                    work / "flower",
                    check,
                    flower_detail,
                )
            except Exception as error:  # the matrix stands; the result says what is missing
                flower_error = f"{type(error).__name__}: {error}"
                logger.error("bench robustness: a Flower run failed: {}", flower_error)
            logger.info("bench robustness: Flower runs {:.0f}s", time.perf_counter() - clock)
    finally:
        identity.close()
        shutil.rmtree(work, ignore_errors=True)
    result = report(complete=flower_error is None)
    line = ", ".join(
        f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in result.items()
        if k
        in (
            "worst_relative_mse_change_1_of_10",
            "worst_relative_mse_change_3_of_10_robust",
            "robust_mode",
            "bad_versions_stored",
            "rounds_lost",
            "bars_met",
            "wall_s",
        )
    )
    write_result(json_path, result, f"robustness: {line}")


def _robot_config() -> Any:
    from zk0.shared.config import load_robot_config

    return load_robot_config(TRAINING.robot_config_path)


def _attack_doc(attack: Attack) -> dict[str, Any]:
    return {
        "examples": attack.examples or "median honest count",
        "poisons_stats": attack.poisons_stats,
    }

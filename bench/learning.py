"""``zk0 bench learning``: do the arms get better at their tasks by learning together?

One run, fixed seeds, the same recorded episodes and the same evaluation scenes for every
method, and the same local compute per client (``rounds x local-steps`` optimizer steps at the
same batch size and learning-rate restarts)::

    variants --record (cached)--> clients: train episodes | held-out episodes | eval scenes
       |
       +-- base            tiny-sim-base as shipped (its pretraining normalization)
       +-- local_only      each client alone: LoRA on its own episodes, its own normalization
       +-- centralized     one LoRA on the union, clients x local-steps steps per round
       +-- <federated>     a Flower simulation per mode (the product's ClientApp and ServerApp);
                           every version it stores is measured afterwards
       |
       v
    per method, client and round: held-out MSE (standardized units) and closed-loop success
    in simulated time with its Wilson interval -> JSON, one-line summary, chart

Success is measured on ``--eval-episodes`` scenes at round 0 and at the last round, and on
``--mid-episodes`` scenes in between (stated in the JSON).
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from loguru import logger

from zk0.agent.inference.evaluation import base_task_stats
from zk0.agent.training import TrainConfig, train_policy
from zk0.bench._common import source_revision, write_result
from zk0.bench._learning_chart import chart
from zk0.bench._learning_clients import (
    Client,
    load_variants,
    make_clients,
    measure,
    realtime,
    training_frames,
)
from zk0.bench._learning_result import bars, measured_before, summarize
from zk0.bench.federated import simulate
from zk0.shared.artifact import load_adapter
from zk0.shared.features import PolicyFeatures
from zk0.shared.federation import RunSettings
from zk0.shared.lora import add_personal_adapter, apply_lora, load_personal_state
from zk0.shared.normalization import NORMALIZATION_FILE, combine_all, loads, to_lerobot
from zk0.shared.policy_factory import build_policy
from zk0.shared.sim_variants import BASE_VARIANT, CLIENT_VARIANTS, SIM_ROBOT, variant_config
from zk0.shared.store import AdapterStore
from zk0.shared.success import SuccessRate

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

#: A server step of twice the round's mean delta (FedAvgM with β = 0, η = 2).
DOUBLE_STEP = {"server_optimizer": "fedavgm", "server_momentum": 0.0, "server_lr": 2.0}
#: The federated modes compared; ``personal`` is the product's default (``RunSettings``), chosen
#: by this benchmark, and the mode the summary compares with the baselines.
FEDERATED_METHODS: dict[str, dict[str, Any]] = {
    "fedavg": {"aggregation": "fedavg", "personal_rank": 0},
    "svd": {"aggregation": "svd", "personal_rank": 0},
    "ffa": {"aggregation": "ffa", "personal_rank": 0},
    # FedAvgM: steps of up to 1/(1-β) = 2x the round's mean delta where rounds agree.
    "fedavgm": {
        "aggregation": "fedavg",
        "personal_rank": 0,
        "server_optimizer": "fedavgm",
        "server_momentum": 0.5,
    },
    # A server step of 2x the mean delta, no momentum: does the mean of four arms' 100-step
    # updates undershoot the union's 400 steps? Measured: no, it overshoots (MSE alternates
    # between rounds; bench/results/learning_server_step.json).
    "fedavg_lr2": {"aggregation": "fedavg", "personal_rank": 0, **DOUBLE_STEP},
    # Personalized: the shared adapter (fedavg) plus a rank-4 local part per arm, never sent.
    "personal": {"aggregation": "fedavg", "personal_rank": 4},
}
BASELINES = ("base", "local_only", "centralized")
#: Seeds, batch size and learning rate of every method: the run config's, with these steps.
LEARNING = RunSettings(policy="tiny-sim-base", local_steps=100, batch_size=16, lr=1e-3, seed=0)


class Bench:
    def __init__(
        self,
        clients: list[Client],
        settings: RunSettings,
        points: dict[str, int],
        default_mode: str,
    ) -> None:
        self.clients = clients
        self.settings = settings
        self.rounds = settings.num_server_rounds
        self.points = points
        features = PolicyFeatures.from_robot_config(variant_config(BASE_VARIANT, 8.0))
        self.base = build_policy(settings.policy, features, device="cpu")
        self.config = self.base.policy.config
        self.default_mode = default_mode
        #: method -> client -> real-time asynchronous success (base and the default mode).
        self.realtime: dict[str, dict[str, Any]] = {}

    def episodes_at(self, round_: int) -> int:
        last = round_ in (0, self.rounds)
        return self.points["eval"] if last else self.points["mid"]

    def point(self, model: Any, stats: dict[str, Any], client: Client, round_: int) -> Any:
        return measure(
            model,
            stats,
            client,
            round_,
            episodes=self.episodes_at(round_),
            mse_frames=self.points["mse_frames"],
            seed=self.settings.seed,
        )

    def fresh(self) -> Any:
        return apply_lora(copy.deepcopy(self.base.policy), self.settings.lora)

    def train_round(self, model: Any, stats: dict[str, Any], data: Any, steps: int, r: int) -> None:
        from zk0.shared.policy_factory import make_processors

        preprocessor, _ = make_processors(self.config, stats)
        train_policy(
            model,
            preprocessor,
            data,
            TrainConfig(
                local_steps=steps,
                batch_size=self.settings.batch_size,
                lr=self.settings.lr,
                seed=self.settings.seed * 100_003 + r,  # as the ClientApp seeds round r
            ),
        )

    # -- methods ----------------------------------------------------------------------------------
    def base_method(self) -> dict[str, Any]:
        stats = base_task_stats(self.config)
        self.realtime["base"] = self.realtime_success(None)
        return {c.name: [self.point(self.base.policy, stats, c, 0)] for c in self.clients}

    def realtime_success(self, store: AdapterStore | None) -> dict[str, Any]:
        """Real-time asynchronous success of the base (no store) or a store's last version."""
        if not self.points["realtime"]:
            return {}
        adapter = None if store is None else store.path(store.versions()[-1])
        return {
            c.name: realtime(c, self.settings.policy, adapter, self.points["realtime"])
            for c in self.clients
        }

    def local_only(self) -> dict[str, Any]:
        result = {}
        for client in self.clients:
            model, stats = self.fresh(), to_lerobot(client.stats)
            data = training_frames(client, self.config.chunk_size)
            points = [self.point(model, stats, client, 0)]
            for r in range(1, self.rounds + 1):
                self.train_round(model, stats, data, self.settings.local_steps, r)
                points.append(self.point(model, stats, client, r))
            result[client.name] = points
        return result

    def centralized(self) -> dict[str, Any]:
        model = self.fresh()
        stats = to_lerobot(combine_all([c.stats for c in self.clients]))
        data: torch.utils.data.Dataset[Any] = torch.utils.data.ConcatDataset(
            [training_frames(c, self.config.chunk_size) for c in self.clients]
        )
        points = {c.name: [self.point(model, stats, c, 0)] for c in self.clients}
        for r in range(1, self.rounds + 1):
            self.train_round(model, stats, data, self.settings.local_steps * len(self.clients), r)
            for client in self.clients:
                points[client.name].append(self.point(model, stats, client, r))
        return points

    def federated(self, mode: str, work: Path) -> dict[str, Any]:
        settings = RunSettings.model_validate(
            {**self.settings.model_dump(), **FEDERATED_METHODS[mode]}
        )
        run_dir = work / f"run-{mode}"
        nodes = {f"sim-{i:02d}": c for i, c in enumerate(self.clients)}  # Flower's partitions
        simulate(settings, {node: c.root for node, c in nodes.items()}, work, run_dir)
        store = AdapterStore(run_dir / "hub" / "adapters")
        points: dict[str, list[Any]] = {c.name: [] for c in self.clients}
        for version in store.versions():
            stats = to_lerobot(loads((store.path(version) / NORMALIZATION_FILE).read_bytes()))
            shared = self.fresh()  # verified and loaded once per version, not per client
            load_adapter(shared, store.path(version))
            personal = bool(settings.personal_rank) and version > 0
            for node, client in nodes.items():
                model = copy.deepcopy(shared) if personal else shared
                if personal:
                    # What the arm ran after round `version`: the fleet's adapter plus its own
                    # local revision of that round (the node keeps the last few).
                    part = _personal_part(
                        work / f"data-{run_dir.name}" / f"{node}.personal", version
                    )
                    if part is None:
                        continue
                    add_personal_adapter(model, part.spec)
                    load_personal_state(model, part.state)
                points[client.name].append(self.point(model, stats, client, version))
        if mode == self.default_mode:
            self.realtime[mode] = self.realtime_success(store)
        return points


def _personal_part(folder: Path, server_round: int) -> Any:
    """The local revision a simulated node wrote in ``server_round`` (None if pruned)."""
    from zk0.agent.personal import PersonalStore

    store = PersonalStore(folder)
    for revision in store.revisions():
        part = store.load(revision)
        if part.meta.server_round == server_round:
            return part
    return None


@app.command()
def main(
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the result here.")] = None,
    variants: Annotated[
        Path | None, typer.Option(help="YAML: client name -> sim_so101 options.")
    ] = None,
    rounds: Annotated[int, typer.Option(min=1, max=10)] = 10,
    train_episodes: Annotated[int, typer.Option(min=2, max=40, help="Recorded per client.")] = 40,
    eval_episodes: Annotated[
        int, typer.Option(min=1, help="Success episodes per client at round 0 and the last.")
    ] = 20,
    mid_episodes: Annotated[int, typer.Option(min=0, help="Success episodes in between.")] = 5,
    base_episodes: Annotated[int, typer.Option(min=1, help="Base task episodes.")] = 30,
    realtime_episodes: Annotated[
        int, typer.Option(min=0, help="Real-time async episodes per client (base, default).")
    ] = 10,
    local_steps: Annotated[int, typer.Option(min=1)] = LEARNING.local_steps,
    methods: Annotated[str, typer.Option(help="Comma list of methods (default: all).")] = ",".join(
        (*BASELINES, *FEDERATED_METHODS)
    ),
    resume: Annotated[
        bool,
        typer.Option(
            help="Keep the methods a cut-short run already wrote to --json, if its setup (clients, "
            "episodes, scenes, run config, the base's own success) is this run's."
        ),
    ] = False,
    default_mode: Annotated[str, typer.Option(help="The mode the summary compares.")] = "personal",
    threads: int = 1,
) -> None:
    """Base, local-only, centralized and every federated mode on the same clients and scenes."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    chosen = load_variants(variants) if variants is not None else CLIENT_VARIANTS
    settings = LEARNING.model_copy(update={"num_server_rounds": rounds, "local_steps": local_steps})
    points = {
        "eval": eval_episodes,
        "mid": mid_episodes,
        "mse_frames": 64,
        "realtime": realtime_episodes,
    }
    wanted = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = sorted(set(wanted) - {*BASELINES, *FEDERATED_METHODS})
    if unknown:
        raise typer.BadParameter(f"unknown methods {unknown}", param_hint="--methods")
    probe = build_policy(settings.policy, PolicyFeatures.from_robot_config(
        variant_config(BASE_VARIANT, 8.0)), device="cpu")  # fmt: skip
    clients = make_clients(chosen, train_episodes, probe.policy.config)
    bench = Bench(clients, settings, points, default_mode)
    base_task = _base_task_success(bench, base_episodes)
    setup = {
        "clients": {c.name: c.options for c in clients},
        "expert": {c.name: [c.expert_successes, c.expert_episodes] for c in clients},
        "train_episodes": [len(c.train_episodes) for c in clients],
        "held_out_episodes": [len(c.held_out) for c in clients],
        "evaluation_scenes": {"first": 1_000_000, **points},
        "base_task": base_task.model_dump(),
        "run_config": settings.to_flower(),
    }
    results: dict[str, Any] = {}
    if resume and json_path is not None and json_path.is_file():
        results, bench.realtime = measured_before(json_path, setup, wanted)
    resumed = set(results)

    def report(complete: bool) -> dict[str, Any]:
        flat = {m: {"clients": {c: v["by_round"] for c, v in r["clients"].items()}}
                for m, r in results.items()}  # fmt: skip
        expert = SuccessRate.of(
            sum(c.expert_successes for c in clients), sum(c.expert_episodes for c in clients)
        )
        by_mode = {m: summarize(flat, m, base_task) for m in flat if m in FEDERATED_METHODS}
        summary = summarize(flat, default_mode, base_task)
        return {
            **summary,
            "bars": bars(summary),
            "summary_by_mode": by_mode,  # each federated mode as if it were the default
            "expert_success_rate": expert.rate,
            "wall_s": time.perf_counter()
            - started
            + sum(r.get("wall_s", 0.0) for m, r in results.items() if m in resumed),
            "complete": complete,
            "methods": results,
            "realtime_async": bench.realtime,
            "setup": setup,
        }

    work = Path(tempfile.mkdtemp(prefix="zk0-bench-learning-"))
    try:
        for method in wanted:
            if method in results:
                logger.info("bench learning: {} measured by the run resumed", method)
                continue
            logger.info("bench learning: {}", method)
            clock = time.perf_counter()
            if method in FEDERATED_METHODS:
                by_client = bench.federated(method, work)
            else:
                by_client = getattr(bench, "base_method" if method == "base" else method)()
            results[method] = {
                "clients": {c: {"by_round": p} for c, p in by_client.items()},
                "wall_s": time.perf_counter() - clock,
                "revision": source_revision(),
            }
            if json_path is not None:  # a run of hours leaves what it measured if cut short
                json_path.parent.mkdir(parents=True, exist_ok=True)
                json_path.write_text(json.dumps(report(complete=False), indent=2) + "\n")
    except BaseException:
        logger.error("bench learning failed; its runs and logs stay in {}", work)
        raise
    else:
        shutil.rmtree(work, ignore_errors=True)
    finally:
        for client in clients:
            client.close()
    result = report(complete=True)
    if json_path is not None:
        chart(results, json_path.with_suffix(".png"))
    keys = {k: v for k, v in result.items() if k not in ("methods", "realtime_async", "setup")}
    line = ", ".join(
        f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in keys.items()
    )
    write_result(json_path, result, f"learning: {line}")


def _base_task_success(bench: Bench, episodes: int) -> SuccessRate:
    from zk0.agent.inference.simulated import evaluate_policy, evaluation_scenes
    from zk0.shared.config import load_robot_config
    from zk0.shared.policy_factory import make_processors

    pre, post = make_processors(bench.config, base_task_stats(bench.config))
    config = variant_config(BASE_VARIANT, load_robot_config(SIM_ROBOT).episode_time_s)
    return evaluate_policy(
        config, bench.base.policy, pre, post, evaluation_scenes(episodes), seed=0
    ).success

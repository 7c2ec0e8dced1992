"""``zk0 bench federated``: what federated LoRA moves and costs, and what it buys.

(a) payload per client per round for full-size adapters vs the whole policy state;
(b) aggregation time for 10/100/1000 synthetic clients with full-size adapter shapes, per mode;
(c) eval MSE by round per aggregation mode on 4 non-IID simulated clients, same seeds;
(d) the same clients and optimizer steps trained centrally (upper bound) and alone (lower bound);
(e) where a real deployment round's time goes, cold ClientApps against warm round workers
    (``zk0.bench._deployment_round``);
(f) an arm's starved and missed control ticks while a round worker trains beside it
    (``zk0.bench._control_ticks``);
(g) what the int8 wire encoding costs the fleet's held-out MSE against fp32 and bf16
    (``zk0.bench._encodings``).

``--parts aggregation`` is (a)-(b), ``learning`` (c)-(d), ``deployment`` (e), ``control`` (f),
``encoding`` (g); all but the first run on recorded simulated episodes and take minutes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer

from zk0.agent.episode_cache import client_datasets
from zk0.agent.training import (
    TrainConfig,
    dataset_stats,
    evaluate_mse,
    open_dataset,
    split_episodes,
    train_policy,
)
from zk0.bench._common import total_episodes, write_result
from zk0.bench._control_ticks import control_ticks
from zk0.bench._deployment_round import flower_overhead
from zk0.bench._encodings import encoding_costs
from zk0.hub.aggregation import MODES
from zk0.hub.flower_app import CLIENT_APP
from zk0.hub.history import HISTORY_FILE
from zk0.hub.superlink import SimulationSuperLink
from zk0.shared.cli import RobotOption
from zk0.shared.config import DEFAULT_ROBOT_CONFIG, load_robot_config
from zk0.shared.features import PolicyFeatures
from zk0.shared.federation import RunSettings
from zk0.shared.lora import LoraSpec, adapter_state, apply_lora
from zk0.shared.normalization import combine_all, to_lerobot
from zk0.shared.policy_factory import build_fresh_policy, build_policy, make_processors

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def full_size_shapes(robot_config: str) -> tuple[dict[str, tuple[int, ...]], int]:
    """Adapter tensor shapes of the full-size architecture, and its whole state in bytes."""
    features = PolicyFeatures.from_robot_config(load_robot_config(robot_config))
    policy = build_fresh_policy("smolvla-arch", features)
    state_bytes = sum(t.numel() * t.element_size() for t in policy.state_dict().values())
    shapes = {
        name: tuple(t.shape) for name, t in adapter_state(apply_lora(policy, LoraSpec())).items()
    }
    return shapes, state_bytes


#: Pinned for the aggregation timing: the BLAS numpy loaded reads one of these at start.
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def aggregation_times(
    shapes: dict[str, tuple[int, ...]], counts: list[int], threads: int, robust_up_to: int = 100
) -> dict[str, Any]:
    """Per client count, in a process of its own with ``threads`` BLAS threads
    (``zk0.bench._aggregation_timing``): read and aggregation seconds, its peak memory."""
    import os
    import subprocess
    import sys
    import tempfile

    pinned = {name: str(threads) for name in BLAS_THREAD_VARIABLES}
    by_count: dict[str, Any] = {}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as shapes_file:
        json.dump(shapes, shapes_file)
        shapes_file.flush()
        for count in counts:
            argv = [sys.executable, "-m", "zk0.bench._aggregation_timing", shapes_file.name]
            argv += [str(count)] + (["--robust"] if count <= robust_up_to else [])
            done = subprocess.run(
                argv, env=os.environ | pinned, capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                raise RuntimeError(f"aggregation timing at {count}: {done.stderr[-500:]}")
            by_count[str(count)] = json.loads(done.stdout.splitlines()[-1])
    times: dict[str, Any] = {mode: {n: t[mode] for n, t in by_count.items()} for mode in MODES}
    return {
        **times,
        "read_s": {n: t["read_s"] for n, t in by_count.items()},
        "robust": {n: t["robust"] for n, t in by_count.items() if "robust" in t},
        "peak_rss_mb": {n: t["peak_rss_mb"] for n, t in by_count.items()},
        "blas_threads": threads,
    }


AGENTS = ["sim-00", "sim-01", "sim-02", "sim-03"]
#: Same seeds, data and optimizer steps for every mode and baseline.
LEARNING = RunSettings(policy="tiny-sim-base", local_steps=15, lr=1e-3, eval_frames=16, seed=0)


def simulate(
    settings: RunSettings,
    datasets: dict[str, Path],
    work: Path,
    run_dir: Path,
    client_app: str = CLIENT_APP,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One Flower simulation of ``settings`` with one node per dataset; its eval history.

    ``client_app`` and ``env`` (added to the simulation's environment) let
    ``zk0 bench robustness`` run hostile nodes of its own.

    Simulated nodes are ``sim-00``, ``sim-01``, ... (Flower's partition ids), so ``datasets`` is
    keyed so. The run's adapter store (every version) stays in ``run_dir/hub/adapters``, and
    what the nodes keep (personalized mode) in ``work/data-<run>/sim-NN.personal``."""
    sim_root = work / f"data-{run_dir.name}"
    sim_root.mkdir(parents=True, exist_ok=True)
    for agent, root in datasets.items():
        if not (sim_root / agent).exists():
            (sim_root / agent).symlink_to(root)
    settings = settings.model_copy(
        update={
            "min_nodes": len(datasets),
            "sim_data_root": str(sim_root),
            "run_dir": str(run_dir),
        }
    )
    link = SimulationSuperLink(len(datasets), work / f"flwr-{run_dir.name}", work / "logs")
    link.env.update(env or {})
    try:
        link.start()
        completed = link.run(settings, timeout_s=3 * 3600, client_app=client_app)
    finally:
        link.stop()
    history_file = run_dir / HISTORY_FILE
    if completed.returncode != 0 or not history_file.is_file():  # flwr run may exit 0 regardless
        raise RuntimeError(
            f"simulation ({run_dir.name}) failed (exit {completed.returncode}): see "
            f"{run_dir / 'hub' / 'hub.log'}; {completed.stderr[-300:]}"
        )
    history: dict[str, Any] = json.loads(history_file.read_text())
    return history


def baselines(rounds: int, datasets: dict[str, Path]) -> dict[str, Any]:
    """LoRA on the union of the clients' data (upper bound) and on each alone (lower bound)."""
    from zk0.shared.config import load_robot_config as load
    from zk0.shared.lora import apply_lora as wrap

    features = PolicyFeatures.from_robot_config(load(LEARNING.robot_config_path))
    base = build_policy(LEARNING.policy, features, device="cpu")
    splits = {a: split_episodes(total_episodes(root)) for a, root in datasets.items()}
    train = {
        a: open_dataset(root, base.policy.config, splits[a][0]) for a, root in datasets.items()
    }
    held = {a: open_dataset(root, base.policy.config, splits[a][1]) for a, root in datasets.items()}
    stats = to_lerobot(combine_all([dataset_stats(d) for d in train.values()]))
    preprocessor, _ = make_processors(base.policy.config, stats)
    steps = LEARNING.local_steps

    def fresh() -> Any:
        import copy

        return wrap(copy.deepcopy(base.policy), LoraSpec())

    def evaluate(model: Any, agents: list[str]) -> dict[str, float]:
        return {a: evaluate_mse(model, preprocessor, held[a], max_frames=16)[0] for a in agents}

    union = fresh()
    for round_ in range(rounds):  # same LR restarts as the federation, clients' total steps
        train_policy(
            union,
            preprocessor,
            torch.utils.data.ConcatDataset(list(train.values())),
            TrainConfig(local_steps=steps * len(train), lr=LEARNING.lr, seed=round_),
        )
    central = evaluate(union, list(datasets))
    alone: dict[str, float] = {}
    for agent in datasets:
        model = fresh()
        for round_ in range(rounds):
            train_policy(
                model,
                preprocessor,
                train[agent],
                TrainConfig(local_steps=steps, lr=LEARNING.lr, seed=round_),
            )
        alone |= evaluate(model, [agent])
    return {"centralized": central, "local_only": alone}


PARTS = ("aggregation", "learning", "deployment", "control", "encoding")


@app.command()
def main(
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the result here.")] = None,
    clients: Annotated[
        str, typer.Option(help="Client counts for the aggregation timing.")
    ] = "10,100,1000",
    parts: Annotated[
        str,
        typer.Option(
            help="Comma list of aggregation (payload and aggregation time), learning (eval MSE "
            "by mode and its bounds), deployment (a round's overhead, cold ClientApps against "
            "warm round workers), control (an arm's missed ticks while a round trains beside "
            "it), encoding (held-out MSE of int8 and bf16 versions against fp32). With fewer "
            "than all, the other parts of an existing --json "
            "file are kept (each part names when it was measured)."
        ),
    ] = ",".join(PARTS),
    rounds: Annotated[int, typer.Option(min=1)] = 3,
    episodes: Annotated[int, typer.Option(min=2)] = 10,
    robot_config: RobotOption = DEFAULT_ROBOT_CONFIG,
    threads: int = 1,
    control_episodes: Annotated[
        int, typer.Option(min=1, help="Real-time episodes per condition of the control part.")
    ] = 5,
) -> None:
    """Payload ratio and aggregation time at full size, learning by mode, a round's overhead."""
    import tempfile

    chosen = [part.strip() for part in parts.split(",") if part.strip()]
    if unknown := sorted(set(chosen) - set(PARTS)):
        raise typer.BadParameter(f"no part {unknown[0]!r}; there are: {', '.join(PARTS)}")
    torch.set_num_threads(threads)
    result: dict[str, Any] = {}
    if json_path is not None and json_path.is_file() and set(chosen) != set(PARTS):
        result = json.loads(json_path.read_text())
    measured = result.setdefault("parts_measured", {})
    summary: list[str] = []
    if "aggregation" in chosen:
        shapes, state_bytes = full_size_shapes(robot_config)
        adapter_bytes = sum(int(np.prod(s)) * 4 for s in shapes.values())
        timing = aggregation_times(shapes, [int(c) for c in clients.split(",")], threads)
        times = {mode: timing[mode] for mode in MODES}
        result |= {
            "adapter_bytes_full_size": adapter_bytes,
            "policy_state_bytes_full_size": state_bytes,
            "payload_ratio_full_size": state_bytes / adapter_bytes,
            "aggregation_s": times,
            "aggregation_s_100_clients": times["fedavg"].get("100"),
            "aggregation_read_s": timing["read_s"],
            "aggregation_robust_s": timing["robust"],
            "aggregation_peak_rss_mb": timing["peak_rss_mb"],
            "aggregation_blas_threads": timing["blas_threads"],
        }
        summary.append(
            f"adapter {adapter_bytes / 1e6:.2f} MB vs policy {state_bytes / 1e9:.2f} GB "
            f"(x{state_bytes / adapter_bytes:.0f} smaller); aggregation of 100 full-size adapters "
            + ", ".join(f"{mode} {times[mode].get('100', float('nan')):.2f}s" for mode in MODES)
        )
    datasets = (
        client_datasets(AGENTS, episodes, 6.0)
        if set(chosen) & {"learning", "deployment", "encoding"}
        else {}
    )
    if "learning" in chosen:
        with tempfile.TemporaryDirectory(prefix="zk0-bench-fed-") as tmp:
            work = Path(tmp)
            histories = {
                mode: simulate(
                    LEARNING.model_copy(update={"aggregation": mode, "num_server_rounds": rounds}),
                    datasets,
                    work,
                    work / f"run-{mode}",
                )
                for mode in MODES
            }
            bounds = baselines(rounds, datasets)
        result |= {
            "eval_mse_by_round": {mode: h["average"] for mode, h in histories.items()},
            "eval_mse_by_client": {mode: h["clients"] for mode, h in histories.items()},
            "final_mse_by_mode": {mode: h["average"][-1] for mode, h in histories.items()},
            "initial_mse": histories["fedavg"]["average"][0],
            "final_mse_centralized": float(np.mean(list(bounds["centralized"].values()))),
            "final_mse_local_only": float(np.mean(list(bounds["local_only"].values()))),
            "baselines_by_client": bounds,
            "setup": {
                "clients": AGENTS,
                "episodes_per_client": episodes,
                "rounds": rounds,
                **LEARNING.to_flower(),
            },
        }
        summary.append(
            "final eval MSE "
            + ", ".join(f"{m} {v:.4f}" for m, v in result["final_mse_by_mode"].items())
            + f" (start {result['initial_mse']:.4f}, "
            f"centralized {result['final_mse_centralized']:.4f}, "
            f"local-only {result['final_mse_local_only']:.4f})"
        )
    if "deployment" in chosen:
        rounds_of: dict[str, Any] = {}
        for name, warm in (("cold", False), ("warm", True)):  # side by side, the same episodes
            with tempfile.TemporaryDirectory(prefix=f"zk0-bench-fed-{name}-") as tmp:
                rounds_of[name] = flower_overhead(LEARNING, datasets, Path(tmp), warm=warm)
        warm_round = rounds_of["warm"]
        result |= {
            "flower_overhead_s_per_round": warm_round["flower_overhead_s_per_round"],
            "flower_overhead_fraction": warm_round["flower_overhead_fraction"],
            "flower_overhead_warm_over_cold": warm_round["flower_overhead_s_per_round"]
            / rounds_of["cold"]["flower_overhead_s_per_round"],
            "deployment_round": rounds_of,
            "deployment_setup": {
                "supernodes": 2,
                "local_steps": LEARNING.local_steps,
                "eval_frames": LEARNING.eval_frames,
            },
        }
        summary.append(
            f"Flower overhead per deployment round {warm_round['flower_overhead_s_per_round']:.1f}"
            f" s ({warm_round['flower_overhead_fraction']:.0%}) with warm round workers, "
            f"{rounds_of['cold']['flower_overhead_s_per_round']:.1f} s "
            f"({rounds_of['cold']['flower_overhead_fraction']:.0%}) cold"
        )
    if "encoding" in chosen:
        with tempfile.TemporaryDirectory(prefix="zk0-bench-fed-enc-") as tmp:
            run = LEARNING.model_copy(update={"num_server_rounds": rounds})
            costs = encoding_costs(run, datasets, Path(tmp), simulate)
        result["wire_encoding"] = costs
        summary.append(
            f"held-out MSE after {rounds} rounds: "
            + ", ".join(f"{k} {v:.4f}" for k, v in costs["final_held_out_mse"].items())
            + " (int8 {:+.2%} vs fp32)".format(costs["final_held_out_mse_change_vs_fp32"]["int8"])
        )
    if "control" in chosen:
        ticks = control_ticks(control_episodes)
        result["control_ticks"] = ticks
        summary.append(
            "starved ticks of an arm "
            + ", ".join(
                f"{name} {ticks[name]['starved_fraction']:.1%}"
                for name in ("alone", "training_same_priority", "training_niced")
            )
        )
    for part in chosen:
        measured[part] = {"date": time.strftime("%Y-%m-%d"), "threads": threads}
    result.pop("summary", None)
    result.pop("machine", None)
    write_result(json_path, result, "federated: " + "; ".join(summary))

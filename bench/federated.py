"""``zk0 bench federated``: what federated LoRA moves and costs, and what it buys.

(a) payload per client per round for full-size adapters vs the whole policy state;
(b) aggregation time for 10/100/1000 synthetic clients with full-size adapter shapes, per mode;
(c) Flower's overhead in a real deployment (round wall time minus the slowest client's training);
(d) eval MSE by round per aggregation mode on 4 non-IID simulated clients, same seeds;
(e) the same clients and optimizer steps trained centrally (upper bound) and alone (lower bound).

(c)-(e) run on the recorded simulated episodes and take minutes; ``--quick`` runs (a)-(b) only.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer

from zk0.bench._common import write_result
from zk0.hub.aggregation import MODES, ClientUpdate, aggregate
from zk0.shared.config import load_robot_config
from zk0.shared.features import PolicyFeatures
from zk0.shared.lora import LoraSpec, adapter_state, apply_lora
from zk0.shared.policy_factory import build_fresh_policy

REPO_ROOT = Path(__file__).resolve().parents[1]
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def full_size_shapes(robot_config: Path) -> tuple[dict[str, tuple[int, ...]], int]:
    """Adapter tensor shapes of the full-size architecture, and its whole state in bytes."""
    features = PolicyFeatures.from_robot_config(load_robot_config(robot_config))
    policy = build_fresh_policy("smolvla-arch", features)
    state_bytes = sum(t.numel() * t.element_size() for t in policy.state_dict().values())
    shapes = {
        name: tuple(t.shape) for name, t in adapter_state(apply_lora(policy, LoraSpec())).items()
    }
    return shapes, state_bytes


def synthetic_updates(
    shapes: dict[str, tuple[int, ...]], count: int, seed: int
) -> list[ClientUpdate]:
    rng = np.random.default_rng(seed)
    shared_a = {
        n: rng.normal(0, 0.02, s).astype(np.float32) for n, s in shapes.items() if ".lora_A." in n
    }
    return [
        ClientUpdate(
            f"c{i}",
            {
                n: shared_a[n]
                if n in shared_a and i % 2 == 0
                else rng.normal(0, 0.02, s).astype(np.float32)
                for n, s in shapes.items()
            },
            int(rng.integers(100, 1000)),
        )
        for i in range(count)
    ]


def aggregation_times(
    shapes: dict[str, tuple[int, ...]], counts: list[int]
) -> dict[str, dict[str, float]]:
    times: dict[str, dict[str, float]] = {mode: {} for mode in MODES}
    for count in counts:
        updates = synthetic_updates(shapes, count, seed=count)
        reference = updates[0].arrays
        for mode in MODES:
            start = time.perf_counter()
            aggregate(mode, updates, reference)
            times[mode][str(count)] = time.perf_counter() - start
        del updates
    return times


@app.command()
def main(
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the result here.")] = None,
    clients: Annotated[
        str, typer.Option(help="Client counts for the aggregation timing.")
    ] = "10,100,1000",
    robot_config: Path = REPO_ROOT / "robot_configs" / "sim_so101.yaml",
    threads: int = 1,
) -> None:
    """Payload ratio and aggregation time at full size (the learning comparison follows)."""
    torch.set_num_threads(threads)
    shapes, state_bytes = full_size_shapes(robot_config)
    adapter_bytes = sum(int(np.prod(s)) * 4 for s in shapes.values())
    times = aggregation_times(shapes, [int(c) for c in clients.split(",")])
    result: dict[str, Any] = {
        "adapter_bytes_full_size": adapter_bytes,
        "policy_state_bytes_full_size": state_bytes,
        "payload_ratio_full_size": state_bytes / adapter_bytes,
        "aggregation_s": times,
        "aggregation_s_100_clients": times["fedavg"].get("100"),
    }
    summary = (
        f"federated: adapter {adapter_bytes / 1e6:.2f} MB vs policy {state_bytes / 1e9:.2f} GB "
        f"(x{state_bytes / adapter_bytes:.0f} smaller); aggregation of 100 full-size adapters "
        + ", ".join(f"{mode} {times[mode].get('100', float('nan')):.2f}s" for mode in MODES)
    )
    write_result(json_path, result, summary)

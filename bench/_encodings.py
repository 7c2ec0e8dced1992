"""``zk0 bench federated --parts encoding``: what the int8 wire encoding costs the fleet's learning.

The same fedavg run (clients, seeds, optimizer steps) twice, with ``wire-encoding`` bf16 and
int8. Training continues from the hub's float32 master in both (``zk0.hub.masters``), so the
encodings change only what the arms run::

    round r:  clients train from master(r-1)  ->  master(r)  (float32, the same in both runs)
              bf16 run stores bf16(master(r))              <- federated eval scores this
              int8 run stores v(r-1) + int8(master(r) - v(r-1))    <- and this

Reported: the fleet's federated held-out MSE by round in each run (what the hub records), and,
on the same held-out frames of every client, the last round's float32 master (an fp32 version),
its bf16 rounding and the int8 version; the bytes of each version's tensors file and its delta.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zk0.agent.training import evaluate_mse, open_dataset, split_episodes
from zk0.bench._common import total_episodes
from zk0.hub.masters import MasterAdapters
from zk0.shared.artifact import TENSORS_FILE, as_stored, load_arrays
from zk0.shared.config import load_robot_config
from zk0.shared.features import PolicyFeatures
from zk0.shared.federation import RunSettings
from zk0.shared.lora import LoraSpec, apply_lora, load_adapter_state
from zk0.shared.normalization import NORMALIZATION_FILE, loads, to_lerobot
from zk0.shared.policy_factory import build_policy, make_processors
from zk0.shared.store import AdapterStore
from zk0.shared.wire_delta import delta_path

ENCODINGS = ("bf16", "int8")
Simulate = Callable[[RunSettings, dict[str, Path], Path, Path], dict[str, Any]]


def encoding_costs(
    settings: RunSettings, datasets: dict[str, Path], work: Path, simulate: Simulate
) -> dict[str, Any]:
    histories, stores = {}, {}
    for encoding in ENCODINGS:
        run_dir = work / f"run-{encoding}"
        run = settings.model_copy(update={"aggregation": "fedavg", "wire_encoding": encoding})
        histories[encoding] = simulate(run, datasets, work, run_dir)
        stores[encoding] = AdapterStore(run_dir / "hub" / "adapters")
    int8_store = stores["int8"]
    last = int8_store.versions()[-1]
    manifest = int8_store.manifest(last)
    masters = {
        encoding: MasterAdapters(store.root).starting_point(
            last, store.manifest(last).artifact_id, load_arrays(store.path(last))
        )
        for encoding, store in stores.items()
    }
    versions = {
        "fp32": masters["int8"],
        "bf16": as_stored(masters["int8"]),
        "int8": load_arrays(int8_store.path(last)),
    }
    stats = loads((int8_store.path(last) / NORMALIZATION_FILE).read_bytes())
    mse = _held_out_mse(settings, datasets, versions, stats)
    bytes_by_version = {
        str(v): {
            "tensors_file": int8_store.manifest(v).files[TENSORS_FILE].size,
            "int8_delta": delta_path(int8_store.root, v).stat().st_size,
        }
        for v in int8_store.versions()[1:]
        if delta_path(int8_store.root, v).is_file()
    }
    fp32 = float(np.mean(list(mse["fp32"].values())))
    return {
        "rounds": settings.num_server_rounds,
        "federated_eval_mse_by_round": {e: h["average"] for e, h in histories.items()},
        "final_held_out_mse": {
            kind: float(np.mean(list(by_agent.values()))) for kind, by_agent in mse.items()
        },
        "final_held_out_mse_change_vs_fp32": {
            kind: float(np.mean(list(by_agent.values()))) / fp32 - 1
            for kind, by_agent in mse.items()
        },
        "final_held_out_mse_by_client": mse,
        "final_version_round": manifest.round,
        # Both runs train from the same float32 masters: their difference is float32 noise.
        "masters_max_abs_difference": max(
            float(np.abs(masters["bf16"][k] - masters["int8"][k]).max()) for k in masters["int8"]
        ),
        "int8_version_max_abs_error_vs_master": max(
            float(np.abs(versions["int8"][k] - versions["fp32"][k]).max()) for k in versions["fp32"]
        ),
        "bf16_version_max_abs_error_vs_master": max(
            float(np.abs(versions["bf16"][k] - versions["fp32"][k]).max()) for k in versions["fp32"]
        ),
        "bytes_by_version_tiny": bytes_by_version,
    }


def _held_out_mse(
    settings: RunSettings,
    datasets: dict[str, Path],
    versions: dict[str, dict[str, Any]],
    stats: Any,
) -> dict[str, dict[str, float]]:
    """Each version's action MSE on each client's held-out episodes (the clients' own split)."""
    features = PolicyFeatures.from_robot_config(load_robot_config(settings.robot_config_path))
    base = build_policy(settings.policy, features, device="cpu")
    preprocessor, _ = make_processors(base.policy.config, to_lerobot(stats))
    held = {
        agent: open_dataset(root, base.policy.config, split_episodes(total_episodes(root))[1])
        for agent, root in datasets.items()
    }
    model = apply_lora(copy.deepcopy(base.policy), LoraSpec(), base.base.name_or_path)
    result: dict[str, dict[str, float]] = {}
    for kind, arrays in versions.items():
        load_adapter_state(model, {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})
        result[kind] = {
            agent: evaluate_mse(model, preprocessor, dataset, max_frames=settings.eval_frames)[0]
            for agent, dataset in held.items()
        }
    return result

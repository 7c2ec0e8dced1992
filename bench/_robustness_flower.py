"""``zk0 bench robustness`` end to end: one attack per fraction through a Flower simulation.

The attack matrix runs the hub's strategy in process; here the same ten arms run as a Flower
simulation (``bench.federated.simulate``: a real SuperLink, the product's ServerApp, one
ClientApp process per message), so the replies cross Flower's messaging as they would in a
deployment::

    arm i's 10-episode block --split_dataset (cached)--> sim-NN dataset (a LeRobotDataset)
       |
       +-- honest-only: 10 - k nodes, the agents' ClientApp
       +-- attacked:    10 nodes, ``_robustness_clientapp`` (the last k nodes hostile)
       v
    final round's held-out eval MSE (each honest node's own) -> relative change;
    every stored version re-checked (``StoredVersionCheck``); the hub log's verdict per hostile node

The attack is ``claims-10M`` (the matrix's worst): 1 of 10 in the default mode, 3 of 10 in the
robust mode. No personal part (``personal-rank`` 0), as in the matrix.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from zk0.bench._learning_clients import Client
from zk0.bench._robustness_bounds import StoredVersionCheck
from zk0.bench._robustness_clientapp import CLIENT_APP, HOSTILE_ENV
from zk0.bench.federated import simulate
from zk0.shared.federation import RunSettings
from zk0.shared.fsutil import file_lock, publish_dir, staging_dir_for
from zk0.shared.store import AdapterStore

ATTACK = "claims-10M"


def block_datasets(clients: list[Client], setup: dict[str, Any]) -> dict[str, Path]:
    """``sim-NN`` -> arm NN's episode block as a LeRobotDataset of its own.

    Cached beside the variant's recording, named by it (whose name carries its recipe hash)
    and the block, so the split runs once per recording."""
    from lerobot.datasets.dataset_tools import split_dataset
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    datasets = {}
    for index, client in enumerate(clients):
        first, last = setup[client.name]["episodes"]
        folder = client.root.with_name(f"{client.root.name}-episodes-{first}-{last}")
        with file_lock(folder.with_name(folder.name + ".lock")):
            if not (folder / "meta" / "info.json").is_file():
                staging = staging_dir_for(folder)
                try:
                    source = LeRobotDataset(client.root.name, root=client.root)
                    split_dataset(source, {"block": list(range(first, last + 1))}, staging)
                    publish_dir(staging / "block", folder)
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
        datasets[f"sim-{index:02d}"] = folder
    return datasets


def _run(
    settings: RunSettings,
    datasets: dict[str, Path],
    work: Path,
    name: str,
    hostile: int,
    check: StoredVersionCheck,
) -> dict[str, Any]:
    run_dir = work / name
    history = simulate(
        settings,
        datasets,
        work,
        run_dir,
        client_app=CLIENT_APP,
        env={HOSTILE_ENV: str(hostile)},
    )
    honest = sorted(datasets)[: len(datasets) - hostile]
    final = {agent: history["clients"][agent][-1] for agent in honest}
    store = AdapterStore(run_dir / "hub" / "adapters")
    bad, earlier = 0, list[dict[str, float]]()
    for version in store.versions():
        why = check.recheck(store, version, earlier)
        bad += why is not None
        earlier.append(check.norms(store, version))
    log = (run_dir / "hub" / "hub.log").read_text()
    verdicts = {
        agent: re.findall(rf"(dropped|bounded) reply from {agent}: ([^\n]*)", log)
        for agent in sorted(datasets)[len(honest) :]
    }
    result = {
        "mse": float(np.mean(list(final.values()))),
        "mse_per_client": final,
        "rounds": history["rounds"],
        "rounds_lost": settings.num_server_rounds + 1 - len(history["rounds"]),
        "stored_versions": store.versions(),
        "bad_versions_stored": bad,
        "hostile_replies": {a: [f"{kind}: {why}" for kind, why in v] for a, v in verdicts.items()},
    }
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def flower_runs(
    settings: RunSettings,
    datasets: dict[str, Path],
    plan: dict[int, dict[str, Any]],
    work: Path,
    check: StoredVersionCheck,
    result: dict[str, Any],
) -> None:
    """Per malicious count k: the honest-only run (10 - k nodes) and the attacked one (10),
    into ``result`` as each pair ends (a later pair's failure keeps the earlier ones)."""
    for count, mode in plan.items():
        run = settings.model_copy(update={**mode, "personal_rank": 0})
        run = RunSettings.model_validate(run.model_dump())
        honest = dict(sorted(datasets.items())[: len(datasets) - count])
        baseline = _run(run, honest, work, f"honest-{count}", 0, check)
        attacked = _run(run, datasets, work, f"attacked-{count}", count, check)
        result[f"{count}_of_{len(datasets)}"] = {
            "mode": mode,
            "attack": ATTACK,
            "baseline": baseline,
            "attacked": attacked,
            "relative_mse_change": (attacked["mse"] - baseline["mse"]) / baseline["mse"],
        }

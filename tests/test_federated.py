"""Federated LoRA end to end: Flower simulation and a real TLS deployment on loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zk0.agent.episode_cache import client_datasets
from zk0.bench._deployment_round import BenchNode, start_supernodes
from zk0.hub.superlink import SimulationSuperLink, SuperLink, SuperLinkSettings
from zk0.shared.artifact import TENSORS_FILE, verify_artifact
from zk0.shared.federation import RunSettings
from zk0.shared.flower_keys import make_tls
from zk0.shared.processes import free_port
from zk0.shared.safetensors_file import read_float_tensors
from zk0.shared.store import AdapterStore

EPISODES, EPISODE_S = 6, 6.0
#: Small but real: LoRA learns each arm's variant within two rounds of 15 steps.
FAST_RUN = RunSettings(policy="tiny-sim-base", local_steps=15, lr=1e-3, eval_frames=16)


@pytest.fixture(scope="session")
def datasets() -> dict[str, Path]:
    return client_datasets(["sim-00", "sim-01", "sim-02", "sim-03"], EPISODES, EPISODE_S)


def _history(run_dir: Path) -> dict[str, object]:
    history: dict[str, object] = json.loads((run_dir / "eval_mse_history.json").read_text())
    assert (run_dir / "eval_mse_chart.png").stat().st_size > 10_000
    return history


def _assert_every_client_improved(history: dict[str, object], agents: list[str]) -> None:
    clients = history["clients"]
    assert isinstance(clients, dict) and sorted(clients) == sorted(agents)
    for agent, series in clients.items():
        assert series[-1] < series[0], f"{agent}: eval MSE {series[0]:.4f} -> {series[-1]:.4f}"


def test_simulation_with_four_clients_one_of_them_hostile(
    datasets: dict[str, Path], tmp_path: Path
) -> None:
    """Four simulated arms, the real ServerApp; ``sim-03`` runs a hostile ClientApp that
    scales its trained update x1e4 (``tests/flower_apps/poisoned_clientapp.py``): its reply is
    dropped or bounded, every stored version keeps the bounds, and the honest arms improve."""
    sim_root = tmp_path / "sim-data"
    sim_root.mkdir()
    for agent, root in datasets.items():
        (sim_root / agent).symlink_to(root)
    run_dir = tmp_path / "run"
    settings = FAST_RUN.model_copy(
        update={
            "num_server_rounds": 2,
            "min_nodes": 4,
            "sim_data_root": str(sim_root),
            "run_dir": str(run_dir),
            "aggregation": "fedavg",
        }
    )
    link = SimulationSuperLink(4, tmp_path / "flwr-home", tmp_path / "logs")
    # The simulation engine imports the test's ClientApp from here.
    link.env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).parent / "flower_apps"), link.env.get("PYTHONPATH")])
    )
    try:
        link.start()
        result = link.run(settings, timeout_s=900, client_app="poisoned_clientapp:app")
    finally:
        link.stop()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    history = _history(run_dir)
    assert history["rounds"] == [0, 1, 2] and history["aggregation"] == "fedavg"
    honest = ["sim-00", "sim-01", "sim-02"]
    _assert_every_client_improved(
        {**history, "clients": {a: history["clients"][a] for a in honest}},
        honest,  # type: ignore[index]
    )
    hub_log = (run_dir / "hub" / "hub.log").read_text()
    assert "dropped reply from sim-03" in hub_log or "bounded reply from sim-03" in hub_log, (
        hub_log[-3000:]
    )
    store = AdapterStore(run_dir / "hub" / "adapters")
    assert store.versions() == [0, 1, 2]
    for version in (1, 2):
        tensors = read_float_tensors(store.path(version) / TENSORS_FILE)
        largest = max(float(np.abs(t).max()) for t in tensors.values())
        assert np.isfinite(largest) and largest < 10.0, (version, largest)


def _poison(source: Path, target: Path) -> Path:
    """A copy of a dataset whose recorded actions are NaN (a broken arm's sensor log)."""
    shutil.copytree(source, target)
    for path in target.glob("data/*/*.parquet"):
        table = pq.read_table(path)
        field = table.schema.field("action")
        nan_rows = pa.array([[float("nan")] * 6] * len(table), type=field.type)
        pq.write_table(
            table.set_column(table.schema.get_field_index("action"), field, nan_rows), path
        )
    return target


@pytest.mark.timeout(1500)  # each Flower message starts a ClientApp process: slow on 2 busy cores
def test_deployment_with_tls_auth_a_nan_client_and_a_hub_restart(
    datasets: dict[str, Path], tmp_path: Path
) -> None:
    agents = {
        "sim-00": datasets["sim-00"],
        "sim-01": datasets["sim-01"],
        "broken-02": _poison(datasets["sim-02"], tmp_path / "broken-02"),
    }
    tls = make_tls(tmp_path / "tls", ["127.0.0.1"])
    settings = SuperLinkSettings("127.0.0.1", free_port(), tmp_path / "superlink.db", tls)
    flwr_home = tmp_path / "flwr-home"
    link = SuperLink(settings, flwr_home, tmp_path / "logs")
    store_root = tmp_path / "hub-store"

    def one_round(run_dir: Path) -> RunSettings:
        return FAST_RUN.model_copy(
            update={
                "num_server_rounds": 1,
                "min_nodes": 3,
                "store_root": str(store_root),
                "run_dir": str(run_dir),
                "round_timeout_s": 300.0,
            }
        )

    nodes: list[BenchNode] = []
    try:
        link.start()
        nodes = start_supernodes(link, tls, agents, tmp_path)
        first = link.run(one_round(tmp_path / "run1"), timeout_s=900)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        hub_log = (tmp_path / "run1" / "hub" / "hub.log").read_text()
        assert "dropped reply from broken-02" in hub_log and "non-finite" in hub_log
        history = _history(tmp_path / "run1")
        _assert_every_client_improved(history, ["sim-00", "sim-01"])  # the broken arm is not there
        store = AdapterStore(store_root)
        assert store.versions() == [0, 1]
        assert store.manifest(1).metrics["clients_dropped"] == 1

        # Kill the hub's SuperLink outright and bring it back on the same database.
        assert link.process.process is not None
        os.kill(link.process.process.pid, signal.SIGKILL)
        link.process.process.wait()
        link = SuperLink(settings, flwr_home, tmp_path / "logs-restarted")
        link.start()
        second = link.run(one_round(tmp_path / "run2"), timeout_s=900)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        assert store.versions() == [0, 1, 2]
        continued = store.manifest(2)
        assert continued.parent_version == 1 and continued.round == 2
        assert verify_artifact(store.path(2)).base.spec == "tiny-sim-base"
        history2 = _history(tmp_path / "run2")
        round0 = history2["clients"]["sim-00"][0]  # type: ignore[index]
        assert round0 == pytest.approx(history["clients"]["sim-00"][-1], rel=1e-6)  # type: ignore[index]
    finally:
        for node in nodes:
            node.stop()
        link.stop()


def test_evaluation_is_deterministic_and_split_by_episode(
    datasets: dict[str, Path], sim_features: object
) -> None:
    from zk0.agent.training import dataset_stats, evaluate_mse, open_dataset, split_episodes
    from zk0.shared.features import PolicyFeatures
    from zk0.shared.lora import LoraSpec, apply_lora
    from zk0.shared.normalization import to_lerobot
    from zk0.shared.policy_factory import build_policy, make_processors

    train_ids, held_out = split_episodes(EPISODES)
    assert (
        held_out == [4] and 4 not in train_ids and split_episodes(EPISODES) == (train_ids, held_out)
    )
    assert isinstance(sim_features, PolicyFeatures)
    base = build_policy("tiny-sim-base", sim_features, device="cpu")
    root = datasets["sim-01"]
    stats = to_lerobot(dataset_stats(open_dataset(root, base.policy.config, train_ids)))
    preprocessor, _ = make_processors(base.policy.config, stats)
    model = apply_lora(base.policy, LoraSpec())
    episodes = open_dataset(root, base.policy.config, held_out)
    first = evaluate_mse(model, preprocessor, episodes, max_frames=6)
    assert evaluate_mse(model, preprocessor, episodes, max_frames=6) == first

"""The server optimizer (FedAvgM, FedAdam) on the adapter delta: Flower's maths, a state that
survives a hub restart within a run, starts over with a new run, and never crashes the hub."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAdam, FedAvgM
from loguru import logger

from conftest import GRID, train_reply
from zk0.hub.aggregation import Arrays, ClientUpdate, aggregate
from zk0.hub.server_optimizer import (
    OptimizerState,
    StateError,
    load_state,
    read_state,
    run_key,
    save_state,
    state_path,
    step,
)
from zk0.hub.strategy import LoRAFedAvg, to_numpy, to_record
from zk0.shared.config import ConfigError
from zk0.shared.federation import RunSettings

A = "m.layers.0.q_proj.lora_A.weight"
B = "m.layers.0.q_proj.lora_B.weight"
ADAM = RunSettings(
    server_optimizer="fedadam", server_lr=0.05, server_beta1=0.9, server_beta2=0.99, server_tau=0.01
)
AVGM = RunSettings(server_optimizer="fedavgm", server_lr=0.5, server_momentum=0.8)


def _arrays(seed: int) -> Arrays:
    rng = np.random.default_rng(seed)
    return {
        A: rng.normal(size=(2, 5)).astype(np.float32),
        B: rng.normal(size=(4, 2)).astype(np.float32),
    }


def _run(settings: RunSettings, rounds: list[Arrays], x: Arrays) -> list[Arrays]:
    """The global adapter after each round whose aggregate is ``rounds[i]``."""
    state, out = OptimizerState(settings.server_optimizer), []
    for aggregated in rounds:
        x, state = step(x, aggregated, state, settings)
        out.append(x)
    return out


def test_fedavgm_without_momentum_at_unit_lr_is_plain_aggregation() -> None:
    plain = RunSettings(server_optimizer="fedavgm", server_lr=1.0, server_momentum=0.0)
    x0, rounds = _arrays(0), [_arrays(1), _arrays(2)]
    for result, aggregated in zip(_run(plain, rounds, x0), rounds, strict=True):
        for name in x0:
            np.testing.assert_allclose(result[name], aggregated[name], rtol=0, atol=1e-6)
            assert result[name].dtype == np.float32


def test_fedavgm_momentum_accumulates_as_the_formula_says() -> None:
    x0, g1, g2 = _arrays(0), _arrays(1), _arrays(2)
    x1, x2 = _run(AVGM, [g1, g2], x0)
    beta, eta = 0.8, 0.5
    for n in x0:
        v1 = g1[n] - x0[n]  # v = β·0 + Δ1
        np.testing.assert_allclose(x1[n], x0[n] + eta * v1, rtol=1e-6, atol=1e-6)
        v2 = beta * v1 + (g2[n] - x1[n])
        np.testing.assert_allclose(x2[n], x1[n] + eta * v2, rtol=1e-6, atol=1e-6)


def test_fedadam_matches_a_hand_computation() -> None:
    x0 = {A: np.array([[1.0, -2.0]], np.float32)}
    g1 = {A: np.array([[1.5, -2.0]], np.float32)}  # Δ1 = (0.5, 0)
    g2 = {A: np.array([[0.0, 0.0]], np.float32)}
    x1, x2 = _run(ADAM, [g1, g2], x0)
    # Step 1: m = 0.1·Δ, v = 0.01·Δ², η_1 = 0.05·√(1-0.99²)/(1-0.9²), as Flower's round 1.
    eta1 = 0.05 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    m1, v1 = np.array([0.05, 0.0]), np.array([0.0025, 0.0])
    expected1 = np.array([1.0, -2.0]) + eta1 * m1 / (np.sqrt(v1) + 0.01)
    np.testing.assert_allclose(x1[A][0], expected1, rtol=1e-6)
    assert x1[A][0, 1] == -2.0  # no delta, no moment: the weight does not move
    delta2 = np.array([0.0, 0.0]) - expected1
    m2, v2 = 0.9 * m1 + 0.1 * delta2, 0.99 * v1 + 0.01 * delta2**2
    eta2 = 0.05 * np.sqrt(1 - 0.99**3) / (1 - 0.9**3)
    np.testing.assert_allclose(x2[A][0], expected1 + eta2 * m2 / (np.sqrt(v2) + 0.01), rtol=1e-5)


# -- through LoRAFedAvg, with real Flower messages -----------------------------------------


def _client_rounds(count: int) -> list[list[tuple[Arrays, int]]]:
    return [[(_arrays(10 * r + 1), 10), (_arrays(10 * r + 2), 30)] for r in range(count)]


def _strategy_rounds(
    strategy: Any, x: Arrays, rounds: list[list[tuple[Arrays, int]]]
) -> Iterator[Arrays]:
    """Drive ``strategy`` (zk0's or Flower's, each with replies in its own form) round by round,
    yielding each new global."""
    packed = isinstance(strategy, LoRAFedAvg)
    for server_round, replies in enumerate(rounds, start=1):
        list(strategy.configure_train(server_round, to_record(x), ConfigRecord(), GRID))
        messages = [train_reply(a, n, f"a{i}", packed) for i, (a, n) in enumerate(replies)]
        record, _ = strategy.aggregate_train(server_round, messages)
        x = to_numpy(record)
        yield x


def _lora_fedavg(settings: RunSettings, state: OptimizerState | None = None) -> LoRAFedAvg:
    return LoRAFedAvg(
        optimizer=settings, optimizer_state=state, min_train_nodes=2, min_available_nodes=2
    )


@pytest.mark.usefixtures("task_identity")
def test_none_leaves_the_aggregation_untouched() -> None:
    strategy = _lora_fedavg(RunSettings())
    assert strategy.optimizer is None and strategy.optimizer_state is None
    x0, rounds = _arrays(0), _client_rounds(1)
    (result,) = _strategy_rounds(strategy, x0, rounds)
    expected = aggregate("fedavg", [ClientUpdate(str(n), a, n) for a, n in rounds[0]], x0)
    # The strategy averages rows in one matrix product, aggregate() tensor by tensor: float32
    # rounding may differ in the last place with the CPU's BLAS kernels, a server step by far more.
    for name in x0:
        np.testing.assert_allclose(result[name], expected[name], rtol=1e-6, atol=1e-7)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(
    ("settings", "flower"),
    [
        (AVGM, FedAvgM(server_learning_rate=0.5, server_momentum=0.8)),
        (ADAM, FedAdam(eta=0.05, beta_1=0.9, beta_2=0.99, tau=0.01)),
    ],
    ids=["fedavgm", "fedadam"],
)
def test_lora_fedavg_gives_flowers_numbers(settings: RunSettings, flower: Any) -> None:
    x0, rounds = _arrays(0), _client_rounds(3)
    ours = list(_strategy_rounds(_lora_fedavg(settings), x0, rounds))
    theirs = list(_strategy_rounds(flower, x0, rounds))
    for mine, flowers in zip(ours, theirs, strict=True):
        for name in x0:
            np.testing.assert_allclose(mine[name], flowers[name], rtol=1e-5, atol=1e-6)
    plain = list(_strategy_rounds(_lora_fedavg(RunSettings()), x0, rounds))
    assert not np.allclose(ours[-1][B], plain[-1][B], atol=1e-3)  # the optimizer did act


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("settings", [AVGM, ADAM], ids=["fedavgm", "fedadam"])
def test_a_restarted_hub_continues_the_run_with_the_saved_state(
    settings: RunSettings, tmp_path: Path
) -> None:
    x0, rounds = _arrays(0), _client_rounds(3)
    uninterrupted = list(_strategy_rounds(_lora_fedavg(settings), x0, rounds))

    run_dir, kind = tmp_path / "run-1", settings.server_optimizer
    first_hub = _lora_fedavg(settings)
    *_, x2 = _strategy_rounds(first_hub, x0, rounds[:2])
    assert first_hub.optimizer_state is not None
    save_state(state_path(run_dir), first_hub.optimizer_state, run=run_key(run_dir), version=2)

    # A new process: only the run folder, the store's current version and its arrays remain.
    saved = load_state(
        state_path(run_dir), kind=kind, run=run_key(run_dir), version=2, reference=x2
    )
    assert saved.step == 2
    (x3,) = _strategy_rounds(_lora_fedavg(settings, saved), x2, rounds[2:])
    assert all(np.array_equal(x3[n], uninterrupted[2][n]) for n in x0)

    # A new run (another folder) starts from zero, as does a fresh strategy without a state.
    other = tmp_path / "run-2"
    fresh = load_state(state_path(run_dir), kind=kind, run=run_key(other), version=2, reference=x2)
    assert fresh == OptimizerState(kind) and fresh.step == 0
    (restarted,) = _strategy_rounds(_lora_fedavg(settings, fresh), x2, rounds[2:])
    (zero_state,) = _strategy_rounds(_lora_fedavg(settings), x2, rounds[2:])
    assert all(np.array_equal(restarted[n], zero_state[n]) for n in x0)
    assert not all(np.array_equal(restarted[n], x3[n]) for n in x0)


# -- a state that must not be continued -----------------------------------------------------


def _saved(tmp_path: Path, **changes: Any) -> tuple[Path, Arrays]:
    reference = _arrays(0)
    state = OptimizerState("fedadam", 3, _arrays(1), {n: np.abs(a) for n, a in _arrays(2).items()})
    state = replace(state, **changes)
    path = state_path(tmp_path)
    save_state(path, state, run="run-1", version=5)
    return path, reference


def _bad_files() -> list[Any]:
    nan = {A: np.full((2, 5), np.nan, np.float32), B: np.zeros((4, 2), np.float32)}
    wrong_shape = {A: np.zeros((3, 5), np.float32), B: np.zeros((4, 2), np.float32)}
    wrong_names = {A: np.zeros((2, 5), np.float32)}
    as_f64 = {n: a.astype(np.float64) for n, a in _arrays(1).items()}
    return [
        pytest.param(b"not an npz", "unreadable", id="garbage"),
        pytest.param(lambda data: data[: len(data) // 2], "unreadable", id="truncated"),
        pytest.param({"second": nan}, f"second/{A}: non-finite values", id="non-finite"),
        pytest.param({"first": wrong_shape}, "float32[3, 5], expected float32[2, 5]", id="shape"),
        pytest.param({"first": wrong_names}, "tensor names differ", id="names"),
        pytest.param({"first": as_f64}, "float64", id="dtype"),
        pytest.param({"step": 0}, "step 0 is not a positive integer", id="step"),
    ]


@pytest.mark.parametrize(("damage", "reason"), _bad_files())
def test_a_bad_state_file_is_refused_and_the_run_starts_fresh(
    tmp_path: Path, damage: Any, reason: str
) -> None:
    if isinstance(damage, dict):
        path, reference = _saved(tmp_path, **damage)
    else:
        path, reference = _saved(tmp_path)
        path.write_bytes(damage if isinstance(damage, bytes) else damage(path.read_bytes()))
    with pytest.raises(StateError, match=r"^[^\n]*$") as error:
        read_state(path, kind="fedadam", run="run-1", version=5, reference=reference)
    assert reason in str(error.value) and str(path) in str(error.value)
    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(m.record["message"]), level="WARNING")
    try:
        state = load_state(path, kind="fedadam", run="run-1", version=5, reference=reference)
    finally:
        logger.remove(sink)
    assert state == OptimizerState("fedadam")
    assert len(warnings) == 1 and reason in warnings[0]


@pytest.mark.parametrize(
    ("kind", "run", "version", "reason"),
    [
        ("fedadam", "run-1", 6, "computed against version 5, the store's current version is 6"),
        ("fedadam", "run-2", 5, "belongs to run 'run-1', not 'run-2'"),
        ("fedavgm", "run-1", 5, "saved for 'fedadam', this run uses fedavgm"),
    ],
)
def test_a_state_of_another_version_run_or_optimizer_is_not_continued(
    tmp_path: Path, kind: Any, run: str, version: int, reason: str
) -> None:
    path, reference = _saved(tmp_path)
    assert read_state(path, kind="fedadam", run="run-1", version=5, reference=reference).step == 3
    with pytest.raises(StateError, match=reason):
        read_state(path, kind=kind, run=run, version=version, reference=reference)
    assert load_state(path, kind=kind, run=run, version=version, reference=reference).step == 0


def test_svd_with_a_server_optimizer_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError) as error:
        RunSettings.from_flower({"aggregation": "svd", "server-optimizer": "fedavgm"}, "run config")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("run config: server-optimizer: fedavgm cannot follow aggregation svd")
    assert RunSettings.from_flower({"aggregation": "svd"}, "run config").server_optimizer == "none"
    flower = RunSettings(server_optimizer="fedadam", server_lr=0.01).to_flower()
    assert flower["server-optimizer"] == "fedadam" and flower["server-lr"] == 0.01

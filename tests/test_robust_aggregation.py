"""Robust aggregation: one bad insider among honest arms moves the fleet's adapter by noise only.

Honest replies share the round's common step from the previous global adapter (whose B is not
zero) plus each arm's own noise; the attacks are those of issue 13: an update scaled x1e4, one
sign-flipped x10, one of 1e30 values, one claiming 10,000,000 examples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from loguru import logger

from conftest import GRID, train_reply
from zk0.hub.aggregation import Arrays, ClientUpdate, Mode, aggregate, lora_pairs
from zk0.hub.fleet_stats import gather_stats
from zk0.hub.robust import robust_aggregate
from zk0.hub.strategy import LoRAFedAvg, to_numpy, to_record
from zk0.hub.update_geometry import factor_scale, inner_product, low_rank_update, update_gram
from zk0.shared.config import ConfigError
from zk0.shared.federation import (
    AGENT_ID,
    META_KEY,
    NORMALIZATION,
    STATS_KEY,
    RunSettings,
)
from zk0.shared.normalization import (
    FeatureStats,
    Stats,
    capped_shares,
    combine_all,
    dumps,
    select_robust_stats,
)

MODULES = ("q_proj", "v_proj")
RANK, D_OUT, D_IN = 4, 24, 20
DEFAULTS = RunSettings()
MODES: tuple[Mode, ...] = ("fedavg", "svd", "ffa")


def _names(module: str) -> tuple[str, str]:
    return f"m.{module}.lora_A.weight", f"m.{module}.lora_B.weight"


def _reference(seed: int = 0) -> Arrays:
    """A global adapter after some rounds: A random, B small but not zero."""
    rng = np.random.default_rng(seed)
    arrays: Arrays = {}
    for module in MODULES:
        a, b = _names(module)
        arrays[a] = rng.normal(scale=0.3, size=(RANK, D_IN)).astype(np.float32)
        arrays[b] = rng.normal(scale=0.05, size=(D_OUT, RANK)).astype(np.float32)
    return arrays


def _honest(reference: Arrays, mode: Mode, count: int, noise: float = 0.1) -> list[Arrays]:
    """``count`` replies: the common step plus per-arm noise of ``noise`` x its size."""
    rng = np.random.default_rng(7)
    step = {name: rng.normal(scale=0.02, size=value.shape) for name, value in reference.items()}
    replies = []
    for _ in range(count):
        arrays: Arrays = {}
        for name, value in reference.items():
            if mode == "ffa" and ".lora_A." in name:
                arrays[name] = value.copy()  # FFA-LoRA: A frozen and shared
                continue
            jitter = rng.normal(scale=0.02 * noise, size=value.shape)
            arrays[name] = (value + step[name] + jitter).astype(np.float32)
        replies.append(arrays)
    return replies


def _updates(replies: list[Arrays], counts: list[int] | None = None) -> list[ClientUpdate]:
    counts = counts or [100 + 7 * i for i in range(len(replies))]
    return [
        ClientUpdate(f"arm-{i}", arrays, n)
        for i, (arrays, n) in enumerate(zip(replies, counts, strict=True))
    ]


def _delta_w(arrays: Arrays, reference: Arrays) -> np.ndarray:
    """Every module's ΔW change from the reference, as one vector (dense, for checking)."""
    parts = []
    for a, b in lora_pairs(list(reference)):
        product = np.asarray(arrays[b], np.float64) @ arrays[a]
        parts.append((product - np.asarray(reference[b], np.float64) @ reference[a]).ravel())
    return np.concatenate(parts)


def _relative_change(result: Arrays, honest: Arrays, reference: Arrays) -> float:
    """How far ``result`` lies from the honest-only aggregate, relative to the honest step."""
    honest_step = _delta_w(honest, reference)
    return float(np.linalg.norm(_delta_w(result, reference) - honest_step)) / float(
        np.linalg.norm(honest_step)
    )


# -- low-rank scoring -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_gram_inner_products_equal_the_dense_computation(mode: Mode) -> None:
    reference = _reference()
    first, second = _honest(reference, mode, 2, noise=1.0)
    x, y = (low_rank_update(mode, arrays, reference) for arrays in (first, second))
    if mode == "ffa":  # B's own change
        dense_x, dense_y = (
            np.concatenate(
                [
                    (np.float64(arrays[b]) - reference[b]).ravel()
                    for _, b in lora_pairs(list(reference))
                ]
            )
            for arrays in (first, second)
        )
    else:
        dense_x, dense_y = (_delta_w(arrays, reference) for arrays in (first, second))
    assert inner_product(x, y) == pytest.approx(float(dense_x @ dense_y), rel=1e-9)
    gram = update_gram([x, y])
    assert np.sqrt(gram[0, 0]) == pytest.approx(float(np.linalg.norm(dense_x)), rel=1e-9)
    assert gram[0, 1] == gram[1, 0] == pytest.approx(float(dense_x @ dense_y), rel=1e-9)


def test_a_clipped_fedavg_reply_changes_delta_w_by_exactly_the_bound() -> None:
    """Both factors move in fedavg, so B·A's change is not linear in their scale: the clip
    solves for the scale that gives the bound."""
    reference = _reference()
    reply = _scaled(30.0)(_honest(reference, "fedavg", 1, noise=1.0)[0], reference, "fedavg")
    sent = float(np.linalg.norm(_delta_w(reply, reference)))
    scale = factor_scale(reply, reference, sent / 10)
    scaled = {n: reference[n] + scale * (np.float64(v) - reference[n]) for n, v in reply.items()}
    assert float(np.linalg.norm(_delta_w(scaled, reference))) == pytest.approx(sent / 10, rel=1e-9)
    assert scale != pytest.approx(0.1, rel=1e-3)  # the linear guess would miss the bound


# -- one bad insider among nine honest arms ---------------------------------------------------


@dataclass(frozen=True)
class Attack:
    name: str
    arrays: Callable[[Arrays, Arrays, Mode], Arrays]  # (honest reply, reference, mode) -> bad
    examples: int = 100
    reason: str = "from the fleet's median update"


def _scaled(factor: float) -> Callable[[Arrays, Arrays, Mode], Arrays]:
    def make(honest: Arrays, reference: Arrays, mode: Mode) -> Arrays:
        return {
            name: (reference[name] + factor * (value - reference[name])).astype(np.float32)
            for name, value in honest.items()
        }

    return make


def _noise(honest: Arrays, reference: Arrays, mode: Mode) -> Arrays:
    """A random direction at the honest reply's norm, tensor by tensor (frozen A kept)."""
    rng = np.random.default_rng(11)
    result = {}
    for name, value in honest.items():
        step = np.asarray(value, np.float64) - reference[name]
        noise = rng.standard_normal(step.shape)
        noise *= np.linalg.norm(step) / np.linalg.norm(noise) if step.any() else 0.0
        result[name] = (reference[name] + noise).astype(np.float32)
    return result


def _huge(honest: Arrays, reference: Arrays, mode: Mode) -> Arrays:
    keep_a = mode == "ffa"  # a moved A is refused before aggregation in ffa
    return {
        name: value if keep_a and ".lora_A." in name else np.full_like(value, 1e30)
        for name, value in honest.items()
    }


ATTACKS = [
    Attack("scaled x1e4", _scaled(1e4)),
    Attack("sign-flipped x10", _scaled(-10.0)),
    Attack("1e30 values", _huge),
    Attack("claims 10M examples", _scaled(1.0), 10_000_000, "weight capped at 25%"),
    # At an honest norm, near the centre's distance: only the direction gives them away.
    Attack("negated, claims 10M", _scaled(-1.0), 10_000_000, "the fleet's median update"),
    Attack("noise at the honest norm", _noise, reason="the fleet's median update"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("attack", ATTACKS, ids=lambda attack: attack.name)
def test_one_attacker_of_ten_moves_the_aggregate_by_noise_only(mode: Mode, attack: Attack) -> None:
    reference = _reference()
    replies = _honest(reference, mode, 10)
    honest = _updates(replies[:9])
    honest_only = aggregate(mode, honest, reference)
    bad = ClientUpdate("arm-bad", attack.arrays(replies[9], reference, mode), attack.examples)

    result = robust_aggregate(mode, [*honest, bad], reference, DEFAULTS)

    assert _relative_change(result.arrays, honest_only, reference) < 0.05
    reasons = {**result.rejected, **result.clipped}
    assert attack.reason in reasons["arm-bad"]
    assert set(reasons) == {"arm-bad"}  # no honest arm was touched


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("attack", [_scaled(-1.0), _noise], ids=["negated", "noise"])
def test_a_reply_at_an_honest_distance_pointing_elsewhere_is_dropped_for_its_direction(
    mode: Mode, attack: Callable[[Arrays, Arrays, Mode], Arrays]
) -> None:
    """Arms as different as task variants (jitter the size of the step): a negated step or noise
    at an honest norm lies no farther out than they do; only its direction gives it away."""
    reference = _reference()
    replies = _honest(reference, mode, 10, noise=1.0)
    honest = _updates(replies[:9])
    bad = ClientUpdate("arm-bad", attack(replies[9], reference, mode), 100)
    without = RunSettings(min_relative_cosine=0)

    assert robust_aggregate(mode, [*honest, bad], reference, without).rejected == {}
    result = robust_aggregate(mode, [*honest, bad], reference, DEFAULTS)
    assert set(result.rejected) == {"arm-bad"}
    assert "cosine with the fleet's median update" in result.rejected["arm-bad"]


@pytest.mark.parametrize("mode", MODES)
def test_without_bounds_the_same_attacks_move_the_aggregate(mode: Mode) -> None:
    """The check above is not vacuous: plain aggregation follows the attacker."""
    reference = _reference()
    replies = _honest(reference, mode, 10)
    honest = _updates(replies[:9])
    honest_only = aggregate(mode, honest, reference)
    flipped = ClientUpdate("arm-bad", _scaled(-10.0)(replies[9], reference, mode), 100)
    plain = aggregate(mode, [*honest, flipped], reference)
    assert _relative_change(plain, honest_only, reference) > 0.5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("statistic", ["trimmed-mean", "median"])
def test_order_statistics_withstand_three_bad_arms_of_ten(mode: Mode, statistic: str) -> None:
    reference = _reference()
    replies = _honest(reference, mode, 10)
    honest = _updates(replies[:7])
    honest_only = aggregate(mode, honest, reference)
    bad = [
        ClientUpdate("bad-scaled", _scaled(1e4)(replies[7], reference, mode), 100),
        ClientUpdate("bad-flipped", _scaled(-10.0)(replies[8], reference, mode), 100),
        ClientUpdate("bad-huge", _huge(replies[9], reference, mode), 10_000_000),
    ]
    # Order statistics alone, with clipping and rejection off: they must hold by themselves.
    settings = RunSettings(
        order_statistic=statistic,  # type: ignore[arg-type]
        clip_norm_factor=0,
        reject_distance_factor=0,
        min_relative_cosine=0,
    )
    result = robust_aggregate(mode, [*honest, *bad], reference, settings)
    assert _relative_change(result.arrays, honest_only, reference) < 0.1


# -- honest runs are not touched --------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("count", [2, 3, 4])
@pytest.mark.parametrize("noise", [0.1, 0.5, 1.0])
def test_honest_replies_give_the_plain_aggregate(mode: Mode, count: int, noise: float) -> None:
    reference = _reference(count)
    updates = _updates(_honest(reference, mode, count, noise), [90, 120, 100, 110][:count])
    result = robust_aggregate(mode, updates, reference, DEFAULTS)
    assert not result.rejected and not result.clipped
    plain = aggregate(mode, updates, reference)
    assert all(np.array_equal(result.arrays[name], plain[name]) for name in plain)


def test_the_share_cap_binds_with_enough_agents_else_at_twice_the_equal_share() -> None:
    weights = capped_shares(np.array([1e7] + [100] * 9), 0.25)
    assert weights.max() == pytest.approx(0.25) and weights.sum() == pytest.approx(1.0)
    assert np.allclose(weights[1:], 0.75 / 9)
    assert np.allclose(capped_shares(np.array([10, 30]), 0.25), [0.25, 0.75])  # no majority
    four = capped_shares(np.array([1e7, 100, 100, 200]), 0.25)  # cap 2/n = 1/2
    assert four == pytest.approx([0.5, 0.125, 0.125, 0.25])


def test_settings_travel_as_flower_keys_and_refuse_a_factor_that_drops_the_majority() -> None:
    raw = RunSettings().to_flower()
    assert raw["clip-norm-factor"] == 3.0 and raw["order-statistic"] == "none"
    assert raw["max-client-share"] == 0.25
    with pytest.raises(ConfigError, match="reject-distance-factor"):
        RunSettings.from_flower({"reject-distance-factor": 1.5}, "run config")
    with pytest.raises(ConfigError, match="trim-fraction"):
        RunSettings.from_flower({"trim-fraction": 0.5}, "run config")


# -- normalization statistics -----------------------------------------------------------------


def _stats(seed: int, frames: int = 400) -> Stats:
    rng = np.random.default_rng(seed)
    samples = rng.normal(loc=0.2 * seed, scale=1.0 + 0.1 * seed, size=(frames, 6))
    return {
        "action": FeatureStats.from_samples(samples),
        "observation.state": FeatureStats.from_samples(samples[:, :4] * 2),
    }


def test_poisoned_normalization_statistics_are_dropped_or_capped() -> None:
    honest = {f"arm-{i}": _stats(i, 300 + 50 * i) for i in range(7)}  # 8 kept: the share binds
    poisoned_mean = {
        key: FeatureStats(
            stats.count, stats.mean + 1e6, stats.var, stats.min + 1e6, stats.max + 1e6
        )
        for key, stats in _stats(9).items()
    }
    huge_count = {
        key: FeatureStats(10**15, s.mean, s.var, s.min, s.max) for key, s in _stats(8).items()
    }
    clients = {**honest, "arm-mean": poisoned_mean, "arm-count": huge_count}
    selected, notes = select_robust_stats(clients, DEFAULTS.max_client_share, 10.0)

    assert "mean" in notes["arm-mean"] and "z-scores" in notes["arm-mean"]
    assert notes["arm-count"].startswith("count capped")
    assert set(notes) == {"arm-mean", "arm-count"}
    combined = combine_all(selected)["action"]
    honest_only = combine_all(list(honest.values()))["action"]
    capped_count = selected[-1]["action"].count  # arm-count's, as counted
    assert capped_count / combined.count == pytest.approx(DEFAULTS.max_client_share, rel=1e-3)
    assert np.abs(combined.mean - honest_only.mean).max() < 1.0  # not 1e6 off


def test_honest_statistics_are_combined_exactly() -> None:
    honest = {f"arm-{i}": _stats(i, 300 + 50 * i) for i in range(4)}
    selected, notes = select_robust_stats(honest, DEFAULTS.max_client_share, 10.0)
    assert not notes
    combined, exact = combine_all(selected)["action"], combine_all(list(honest.values()))["action"]
    assert combined.count == exact.count and np.array_equal(combined.mean, exact.mean)


# -- a failing aggregation keeps the previous adapter -----------------------------------------


def _round(strategy: LoRAFedAvg, reference: Arrays, replies: list[Message]) -> Arrays | None:
    list(strategy.configure_train(1, to_record(reference), ConfigRecord(), GRID))
    record, _ = strategy.aggregate_train(1, replies)
    return None if record is None else to_numpy(record)


EXTRA = "m.q_proj.scale"  # a tensor outside any LoRA pair, which svd cannot re-factor


@pytest.mark.usefixtures("task_identity")
def test_a_failing_aggregation_keeps_the_previous_adapter_and_publishes_nothing() -> None:
    reference = {**_reference(), EXTRA: np.ones(1, np.float32)}
    replies = [
        train_reply({**arrays, EXTRA: np.ones(1, np.float32)}, 100, f"arm-{i}")
        for i, arrays in enumerate(_honest(_reference(), "svd", 3))
    ]
    strategy = LoRAFedAvg(aggregation="svd", min_train_nodes=2, min_available_nodes=2)

    assert _round(strategy, reference, replies) is None  # Flower keeps the previous arrays

    report = strategy.report(1)
    assert report.aggregation_failed is not None
    assert "only lora_A/lora_B tensors" in report.aggregation_failed
    assert not report.trained  # so the hub publishes no version for the round


@pytest.mark.usefixtures("task_identity")
def test_any_error_of_the_maths_keeps_the_previous_adapter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def singular(*args: object) -> None:
        raise np.linalg.LinAlgError("Eigenvalues did not converge")

    monkeypatch.setattr("zk0.hub.strategy.robust_aggregate", singular)
    reference = _reference()
    replies = [train_reply(a, 100, f"arm-{i}") for i, a in enumerate(_honest(reference, "svd", 3))]
    strategy = LoRAFedAvg(aggregation="svd", min_train_nodes=2, min_available_nodes=2)
    assert _round(strategy, reference, replies) is None
    assert strategy.report(1).aggregation_failed == "LinAlgError: Eigenvalues did not converge"


@pytest.mark.usefixtures("task_identity")
def test_an_aggregate_out_of_the_hubs_bounds_is_not_trained_on() -> None:
    reference = _reference()
    replies = [
        train_reply(a, 100, f"arm-{i}") for i, a in enumerate(_honest(reference, "fedavg", 3))
    ]
    checked: list[Arrays] = []

    def out_of_bounds(arrays: Arrays) -> str | None:
        checked.append(arrays)
        return "m.q_proj: |dW| 9.1 > 20 x |W| 0.2"

    strategy = LoRAFedAvg(accept=out_of_bounds, min_train_nodes=2, min_available_nodes=2)
    assert _round(strategy, reference, replies) is None  # the next round starts from reference
    assert len(checked) == 1
    failed = strategy.report(1).aggregation_failed
    assert failed is not None and "out of bounds: m.q_proj" in failed
    assert not strategy.report(1).trained


@pytest.mark.usefixtures("task_identity")
def test_a_poisoned_reply_is_dropped_in_the_strategy_report() -> None:
    reference = _reference()
    replies = _honest(reference, "fedavg", 4)
    messages = [train_reply(arrays, 100, f"arm-{i}") for i, arrays in enumerate(replies[:3])]
    messages.append(train_reply(_scaled(-10.0)(replies[3], reference, "fedavg"), 100, "arm-bad"))
    strategy = LoRAFedAvg(min_train_nodes=2, min_available_nodes=2)
    result = _round(strategy, reference, messages)
    report = strategy.report(1)
    assert result is not None and "median update" in report.dropped["arm-bad"]
    assert report.trained == ["arm-0", "arm-1", "arm-2"]


@pytest.mark.usefixtures("task_identity")
def test_an_example_count_beyond_what_the_agent_reports_holding_is_capped() -> None:
    reference = _reference()
    replies = _honest(reference, "fedavg", 3)
    messages = [train_reply(arrays, 100, f"arm-{i}") for i, arrays in enumerate(replies)]
    messages[2] = train_reply(replies[2], 10_000_000, "arm-2")
    strategy = LoRAFedAvg(
        min_train_nodes=2, min_available_nodes=2, held_frames=lambda: {"arm-2": 100}
    )
    capped = _round(strategy, reference, messages)
    honest = _round(
        LoRAFedAvg(min_train_nodes=2, min_available_nodes=2),
        reference,
        [train_reply(arrays, 100, f"arm-{i}") for i, arrays in enumerate(replies)],
    )
    assert capped is not None and honest is not None
    for name, value in honest.items():  # weighed as the 100 frames it holds, not 10M
        np.testing.assert_allclose(capped[name], value, rtol=1e-6)
    assert "capped to the 100 frames its status reports" in strategy.report(1).clipped["arm-2"]


@pytest.mark.usefixtures("task_identity")
def test_a_second_reply_under_the_same_agent_id_does_not_count_twice() -> None:
    reference = _reference()
    first, second, third = _honest(reference, "fedavg", 3)
    messages = [train_reply(first, 100, "arm-0"), train_reply(second, 100, "arm-1")]
    messages.append(train_reply(third, 100, "arm-1"))
    strategy = LoRAFedAvg(min_train_nodes=2, min_available_nodes=2)
    result = _round(strategy, reference, messages)
    report = strategy.report(1)
    assert result is not None and report.trained == ["arm-0", "arm-1"]
    assert "same agent id" in report.dropped["arm-1"]


class _StatsGrid:
    """A Grid whose nodes answer the statistics query with the given replies."""

    def __init__(self, replies: dict[str, Stats]) -> None:
        self.replies = replies

    def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
        return [
            Message(
                RecordDict(
                    {
                        STATS_KEY: ConfigRecord({NORMALIZATION: dumps(stats)}),
                        META_KEY: ConfigRecord({AGENT_ID: agent}),
                    }
                ),
                dst_node_id=0,
                message_type=MessageType.QUERY,
            )
            for agent, stats in self.replies.items()
        ]


@pytest.mark.usefixtures("task_identity")
def test_the_hub_drops_poisoned_statistics_with_a_reason_naming_the_agent() -> None:
    honest = {f"arm-{i}": _stats(i) for i in range(3)}
    poisoned = {
        key: FeatureStats(10**15, s.mean + 1e6, s.var, s.min + 1e6, s.max + 1e6)
        for key, s in _stats(5).items()
    }
    lines: list[str] = []
    sink = logger.add(lines.append, level="WARNING", format="{message}")
    try:
        combined, outliers = gather_stats(
            cast(Any, _StatsGrid({**honest, "arm-evil": poisoned})),
            [1, 2, 3, 4],
            1.0,
            RunSettings(),
        )
    finally:
        logger.remove(sink)
    assert combined["action"].count == 3 * 400
    assert np.abs(combined["action"].mean).max() < 1.0
    assert any("arm-evil" in line and "dropped" in line and "mean" in line for line in lines)
    assert list(outliers) == ["arm-evil"]


@pytest.mark.usefixtures("task_identity")
def test_an_agent_whose_statistics_were_dropped_does_not_train_the_fleet() -> None:
    reference = _reference()
    replies = _honest(reference, "fedavg", 3)
    messages = [train_reply(arrays, 100, f"arm-{i}") for i, arrays in enumerate(replies)]
    strategy = LoRAFedAvg(
        min_train_nodes=2, min_available_nodes=2, excluded={"arm-2": "mean 12 robust z off"}
    )
    result = _round(strategy, reference, messages)
    two = _round(LoRAFedAvg(min_train_nodes=2, min_available_nodes=2), reference, messages[:2])
    assert result is not None and two is not None
    assert all(np.array_equal(result[name], two[name]) for name in two)
    assert "statistics were dropped" in strategy.report(1).dropped["arm-2"]

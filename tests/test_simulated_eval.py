"""Closed-loop success in simulated time, on scenes no recording ever used."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from zk0.agent.inference.evaluation import base_task_stats
from zk0.agent.inference.simulated import (
    EVALUATION_SCENES_START,
    evaluation_scenes,
    run_simulated,
    torch_chunk_fn,
)
from zk0.agent.robots import robot_options
from zk0.shared.features import PolicyFeatures
from zk0.shared.policy_factory import build_policy, make_processors
from zk0.shared.sim_variants import BASE_VARIANT, CLIENT_VARIANTS, variant_config


@pytest.mark.parametrize("options", [BASE_VARIANT, *CLIENT_VARIANTS.values()])
def test_evaluation_scenes_are_disjoint_from_training_scenes(options: dict[str, Any]) -> None:
    """However many episodes an arm records (2,000 here), no evaluation scene is one of them."""
    sim = robot_options(variant_config(options, 8.0))
    recorded = {(v.cube_xy, v.goal_xy) for v in map(sim.variant, range(2_000))}
    scenes = evaluation_scenes(40)
    assert min(scenes) == EVALUATION_SCENES_START > 2_000
    evaluated = [(v.cube_xy, v.goal_xy) for v in map(sim.variant, scenes)]
    assert not recorded & set(evaluated)
    assert len(set(evaluated)) == 40  # forty different set-ups, not one replayed
    # Paired: every method asking for 40 scenes gets the same 40.
    assert evaluated == [(v.cube_xy, v.goal_xy) for v in map(sim.variant, evaluation_scenes(40))]


def test_simulated_time_episodes_are_deterministic_and_counted(
    sim_features: PolicyFeatures,
) -> None:
    config = variant_config(BASE_VARIANT, 1.0)  # 30 control periods: one chunk per episode
    base = build_policy("tiny-sim-base", sim_features, device="cpu")
    pre, post = make_processors(base.policy.config, base_task_stats(base.policy.config))
    policy_config = base.policy.config

    def run() -> tuple[Any, list[np.ndarray]]:
        chunks: list[np.ndarray] = []
        chunk = torch_chunk_fn(base.policy, pre, post)

        def recorded_chunk(frame: dict[str, Any], noise: Any) -> Any:
            chunks.append(chunk(frame, noise))
            return chunks[-1]

        report = run_simulated(
            config,
            recorded_chunk,
            evaluation_scenes(2),
            chunk_size=policy_config.chunk_size,
            max_action_dim=policy_config.max_action_dim,
            actions_per_chunk=policy_config.n_action_steps,
        )
        return report, chunks

    first, first_chunks = run()
    second, second_chunks = run()
    assert [e.steps for e in first.episodes] == [30, 30] or any(e.success for e in first.episodes)
    assert first.episodes == second.episodes
    assert all(np.array_equal(a, b) for a, b in zip(first_chunks, second_chunks, strict=True))
    # Different scenes, different observations: the policy saw two set-ups.
    assert not np.array_equal(first_chunks[0], first_chunks[-1])
    rate = first.success
    assert rate.episodes == 2 and rate.low <= (rate.rate or 0) <= rate.high


def test_simulated_time_needs_the_simulated_arm() -> None:
    from zk0.shared.config import load_robot_config

    with pytest.raises(ValueError, match="needs the simulated arm"):
        run_simulated(
            load_robot_config("synthetic"),
            lambda frame, noise: np.zeros((1, 6)),
            [0],
            chunk_size=1,
            max_action_dim=6,
            actions_per_chunk=1,
        )

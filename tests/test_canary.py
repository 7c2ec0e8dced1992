"""Eval-gated canary rollout: the decision on small numbers, and the rollout on real sockets
(CURVE, real tiny adapters, the real hub distribution server and agent subscribers)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from conftest import wait_until
from zk0.agent.distribution.state import GateTask
from zk0.hub.gate import GateBook, choose_canaries, decide, wait_for_decision
from zk0.shared.agent_status import AgentReport, CanaryEvaluation, VersionScore
from zk0.shared.config import CanaryConfig
from zk0.shared.distribution import protocol as p
from zk0.shared.distribution.keys import load_keypair, load_public_key
from zk0.shared.gate_record import GateRecord

GATE = CanaryConfig(agents=["arm-0", "arm-1"], min_episodes=10, margin_pp=5, mse_margin=0.05)


def evaluation(
    version: int, successes: int, mse: float, *, baseline: int = 1, base_successes: int = 6
) -> CanaryEvaluation:
    return CanaryEvaluation(
        candidate=VersionScore(
            version=version, mse=mse, mse_frames=64, successes=successes, episodes=10
        ),
        current=VersionScore(
            version=baseline, mse=0.2, mse_frames=64, successes=base_successes, episodes=10
        ),
        complete=True,
    )


def gate(opened_at: float = 0.0) -> GateRecord:
    return GateRecord(version=2, baseline=1, opened_at=opened_at, canaries=("arm-0", "arm-1"))


def test_the_gate_waits_for_every_canary_then_promotes_a_version_no_worse() -> None:
    one = {"arm-0": evaluation(2, 6, 0.19)}
    assert decide(GATE, gate(), one, now=10.0) is None
    both = {**one, "arm-1": evaluation(2, 6, 0.2)}
    decision = decide(GATE, gate(), both, now=10.0)
    assert decision is not None and decision.state == "promoted", decision
    assert decision.numbers is not None
    assert decision.numbers.candidate.success.episodes == 20
    assert decision.numbers.current.success.rate == pytest.approx(0.6)


def test_the_gate_rejects_worse_success_worse_mse_and_silence() -> None:
    # 45 % vs 60 % on 20 paired episodes is no evidence (the 95 % interval reaches 66 %) ...
    unsure = {"arm-0": evaluation(2, 4, 0.2), "arm-1": evaluation(2, 5, 0.2)}
    decision = decide(GATE, gate(), unsure, now=10.0)
    assert decision is not None and decision.state == "promoted", decision
    # ... 10 % is (its interval ends at 30 %, more than 5 points below 60 %).
    worse = {"arm-0": evaluation(2, 1, 0.2), "arm-1": evaluation(2, 1, 0.2)}
    decision = decide(GATE, gate(), worse, now=10.0)
    assert decision is not None and decision.state == "rejected"
    assert "worse by 50.0 points" in decision.reason
    blurry = {"arm-0": evaluation(2, 6, 0.25), "arm-1": evaluation(2, 6, 0.25)}
    decision = decide(GATE, gate(), blurry, now=10.0)
    assert decision is not None and decision.state == "rejected" and "MSE" in decision.reason
    # Another candidate's or baseline's numbers do not count; at the timeout, too few arrived.
    stale = {"arm-0": evaluation(3, 6, 0.2), "arm-1": evaluation(2, 6, 0.2, baseline=0)}
    assert decide(GATE, gate(), stale, now=10.0) is None
    decision = decide(GATE, gate(), stale, now=GATE.timeout_s + 1)
    assert decision is not None and decision.state == "rejected"
    assert decision.reason.startswith("0 of 20 closed-loop episodes")
    assert "arm-0, arm-1" in decision.reason


def test_canaries_are_the_named_agents_plus_a_fraction_drawn_per_version() -> None:
    fleet = [f"arm-{i}" for i in range(20)]
    config = CanaryConfig(agents=["arm-3"], fraction=0.1)
    first, second = choose_canaries(config, fleet, 7), choose_canaries(config, fleet, 8)
    assert len(first) == len(second) == 2 and "arm-3" in first and "arm-3" in second
    assert first == choose_canaries(config, reversed(fleet), 7)  # not the order they came in


def test_a_gate_is_decided_once_and_a_run_never_waits_forever(tmp_path: Path) -> None:
    book = GateBook(tmp_path)
    book.open(5, baseline=4, now=time.time())
    closed = wait_for_decision(book, 5, timeout_s=0.0, grace_s=0.2)
    assert (closed.state, closed.reason) == ("rejected", "no decision within 0 s")
    from zk0.hub.gate import Decision

    late = book.close(5, Decision(state="promoted", reason="late"))
    assert late.state == "rejected" and book.withdrawn() == [5]


# -- the rollout on real sockets ---------------------------------------------------------------


def _ask_manifest(rig: Any, server: Any, agent_id: str, version: int) -> p.Reply:
    """``agent_id``'s own CURVE key asks the hub for ``version``'s manifest."""
    keys = rig.root / "agents" / agent_id / "keys"
    pair = load_keypair(keys / f"{agent_id}.key_secret")
    ctx: zmq.Context[Any] = zmq.Context()
    sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    try:
        sock.curve_secretkey, sock.curve_publickey = pair.secret, pair.public
        sock.curve_serverkey = load_public_key(rig.hub_keys.curve_public)
        sock.linger = 0
        sock.connect(f"tcp://127.0.0.1:{server.fetch_port}")
        artifact_id = rig.store.manifest(version).artifact_id
        sock.send_multipart(p.encode(p.GetManifest(version=version, artifact_id=artifact_id)))
        assert sock.poll(10_000), "the hub did not answer"
        reply, _ = p.decode_reply(sock.recv_multipart())
        return reply
    finally:
        sock.close()
        ctx.term()


def test_a_version_under_gate_reaches_only_its_canaries_and_a_rejection_sends_them_back(
    rig: Any,
) -> None:
    canary = CanaryConfig(agents=["arm-0"], min_episodes=4, timeout_s=60)
    v0 = rig.new_version()
    server = rig.start_hub(canary=canary)
    server.publish(v0)
    agents = [rig.subscriber(f"arm-{i}", server) for i in range(3)]
    wait_until(lambda: all(a.status().applied == v0 for a in agents), what="version 0")
    book = GateBook(rig.store.root)

    bad = rig.new_version()  # what a round stores under gate: the fleet stays on v0
    book.open(bad, baseline=v0)
    wait_until(lambda: agents[0].status().applied == bad, what="the canary to take it")
    assert agents[0].status().under_gate == GateTask(bad, v0, episodes=4)
    assert isinstance(_ask_manifest(rig, server, "arm-1", bad), p.ErrorReply)
    assert isinstance(_ask_manifest(rig, server, "arm-0", bad), p.ManifestReply)

    agents[0].set_report(AgentReport(canary=evaluation(bad, 0, 0.9, baseline=v0, base_successes=6)))
    wait_until(lambda: book.get(bad).state == "rejected", what="the gate to reject")
    decided = book.get(bad)
    assert decided is not None and decided.numbers is not None
    assert decided.numbers.candidate.success.successes == 0
    assert "worse by 60.0 points" in (decided.reason or "")
    wait_until(lambda: agents[0].status().applied == v0, timeout_s=60, what="the canary back")
    assert agents[0].store.current().version == v0
    assert agents[0].status().under_gate is None
    assert all(a.status().applied == v0 for a in agents[1:])
    assert isinstance(_ask_manifest(rig, server, "arm-0", bad), p.ErrorReply)  # withdrawn

    good = rig.new_version()
    book.open(good, baseline=v0)
    wait_until(lambda: agents[0].status().applied == good, what="the canary to take the next")
    agents[0].set_report(AgentReport(canary=evaluation(good, 6, 0.2, baseline=v0)))
    wait_until(
        lambda: all(a.status().applied == good for a in agents), what="the fleet to converge"
    )
    assert rig.store.current().version == good
    assert book.get(good).state == "promoted"


# -- the canary's own evaluation (the agent daemon's child) ------------------------------------


def test_a_canary_scores_both_versions_on_the_same_scenes_while_holding_the_compute(
    tmp_path: Path, sim_features: Any
) -> None:
    import threading

    import torch
    import yaml

    from zk0.agent.arbiter import AgentState, Arbiter
    from zk0.agent.canary import CanaryFollower
    from zk0.agent.distribution.subscriber import ADAPTERS_DIR
    from zk0.agent.inference.evaluation import base_task_feature_stats
    from zk0.agent.task_labels import FILE_NAME, TaskEpisodeStore
    from zk0.shared.artifact import save_adapter
    from zk0.shared.config import AgentConfig
    from zk0.shared.lora import LoraSpec, apply_lora
    from zk0.shared.normalization import NORMALIZATION_FILE, dumps
    from zk0.shared.policy_factory import build_policy
    from zk0.shared.sim_variants import BASE_VARIANT, variant_config
    from zk0.shared.store import AdapterStore

    base = build_policy("tiny-sim-base", sim_features, device="cpu")
    stats = dumps(base_task_feature_stats(base.policy.config))
    model = apply_lora(base.policy, LoraSpec(), base.base.name_or_path)
    store = AdapterStore(tmp_path / "data" / ADAPTERS_DIR)
    for version in (0, 1):
        if version == 1:  # a broken candidate: its B factors are noise
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if "lora_B" in name:
                        parameter.normal_(0.0, 0.5)
        with store.allocate() as (allocated, path):
            assert allocated == version
            save_adapter(model, path, version=version, base=base.base, lora=LoraSpec(),
                         extra_files={NORMALIZATION_FILE: stats})  # fmt: skip
    robot = tmp_path / "arm.yaml"  # 1 s episodes: one chunk each
    robot.write_text(yaml.safe_dump(variant_config(BASE_VARIANT, 1.0).model_dump(mode="json")))
    config = AgentConfig(
        agent_id="arm-0",
        robot_config=robot,
        data_root=tmp_path / "data",
        policy="tiny-sim-base",
        canary_episodes=1,  # the hub's 2 episodes rule
    )
    arbiter, lock = Arbiter(), threading.Lock()
    labels = TaskEpisodeStore(tmp_path / "data" / FILE_NAME)
    follower = CanaryFollower(config, config.load_robot_config(), labels, arbiter, lock)
    task = GateTask(candidate=1, current=0, episodes=2)
    follower.check(task)
    assert follower.run is not None and arbiter.state is AgentState.TRAINING
    wait_until(lambda: follower.check(task) or follower.run is None, timeout_s=240,
               what="the canary evaluation")  # fmt: skip
    result = follower.result
    assert result is not None and result.complete, "the evaluation failed (see the log)"
    assert (result.candidate.version, result.current.version) == (1, 0)
    assert result.candidate.episodes == result.current.episodes == 2
    assert arbiter.lease is None  # the compute is free again
    follower.check(task)
    assert follower.run is None  # once per gate, not in a loop


def test_a_real_arm_canary_counts_only_labelled_episodes_and_completes_when_it_has_enough(
    tmp_path: Path,
) -> None:
    from zk0.agent.canary import _with_labels
    from zk0.agent.task_labels import FILE_NAME, TaskEpisodeStore

    store = TaskEpisodeStore(tmp_path / FILE_NAME)
    measured = CanaryEvaluation(  # what the child gives a real arm: MSE, never episodes
        candidate=VersionScore(version=2, mse=0.2, mse_frames=64),
        current=VersionScore(version=1, mse=0.2, mse_frames=64),
        complete=True,
    )
    for version, labels in ((1, ["success", "success", "failure"]), (2, ["failure"])):
        for label in labels:
            store.add(job=1, started_at=0.0, ended_at=1.0, adapter_version=version, auto=None)
            store.label(label)  # type: ignore[arg-type]
    store.add(job=1, started_at=0.0, ended_at=1.0, adapter_version=2, auto=None)  # unlabelled
    early = _with_labels(store, measured, needed=2)
    assert (early.candidate.successes, early.candidate.episodes) == (0, 1)
    assert (early.current.successes, early.current.episodes) == (2, 3)
    assert not early.complete  # the hub waits for the second labelled candidate episode
    store.label("success")
    assert _with_labels(store, measured, needed=2).complete


def test_a_gate_left_open_by_a_dead_run_is_superseded_by_the_next(tmp_path: Path) -> None:
    book = GateBook(tmp_path)
    book.open(3, baseline=2)
    book.open(4, baseline=2)
    stale = book.get(3)
    assert stale is not None and stale.state == "rejected" and "superseded" in (stale.reason or "")
    assert book.open_gate() == book.get(4) and book.withdrawn() == [3]

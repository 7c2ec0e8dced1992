"""``zk0 bench distribution``: how fast a new adapter version reaches a fleet, and at what cost.

A hub (``DistributionServer``) and N agents (``AdapterSubscriber``s, several per worker process)
on 127.0.0.1. Each round publishes a new full-size adapter (LoRA r16 on the ``smolvla-arch``
action expert: 1,290,240 parameters, ~5.2 MB, fresh random values every version) and times
publish -> applied (fetched, verified, stored, ``current`` switched, handed to the engine
callback) per agent. For 1, 10 and 50 agents, with CURVE on and off.

Bytes on the wire per agent per version are counted at the application level (every frame the
agent sends and receives, including statuses and announces during the round) and, for the
whole host, on the loopback interface (TCP/IP headers, ZMTP and CURVE framing included; other
loopback traffic on the host adds to it).

The adapter's base is identified by its generation recipe (``recipe:smolvla-arch-<digest>``):
the full-size base is never written to disk, only its LoRA shapes matter here.
"""

from __future__ import annotations

import multiprocessing
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from zk0.shared.cli import RobotOption
from zk0.shared.config import DEFAULT_ROBOT_CONFIG

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _loopback_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, data = line.partition(":")
        if name.strip() == "lo":
            return int(data.split()[0])  # received on lo == sent on lo
    return 0


class AdapterMaker:
    """Full-size LoRA adapters with fresh random values, saved as real artifacts."""

    def __init__(self, robot_config: str) -> None:
        import torch
        from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

        from zk0.shared.config import load_robot_config
        from zk0.shared.features import PolicyFeatures
        from zk0.shared.lora import LoraSpec, apply_lora
        from zk0.shared.policy_factory import (
            GENERATED_BASES,
            BaseRef,
            _ensure_backbone,
            _recipe_digest,
            smolvla_config,
        )

        features = PolicyFeatures.from_robot_config(load_robot_config(robot_config))
        base = GENERATED_BASES["smolvla-arch"]
        config = smolvla_config(
            _ensure_backbone(base.backbone), features, base.smolvla_overrides, "cpu"
        )
        with torch.device("meta"):  # shapes only: the 451M base weights are never initialized
            policy = SmolVLAPolicy(config)
        self.lora = LoraSpec()
        self.peft_model = apply_lora(policy, self.lora).to_empty(device="cpu")
        digest = _recipe_digest(base, features)[:16]
        self.base = BaseRef("smolvla-arch", "smolvla-arch", f"recipe:smolvla-arch-{digest}")
        self._generator = torch.Generator().manual_seed(0)

    def add_version(self, store: Any) -> int:
        import torch

        from zk0.shared.artifact import save_adapter

        with torch.no_grad():
            for name, param in self.peft_model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=self._generator) * 0.01)
        with store.allocate() as (version, path):
            save_adapter(self.peft_model, path, version=version, base=self.base, lora=self.lora)
        return int(version)


def _worker(specs: list[dict[str, Any]], queue: Any, stop: Any) -> None:
    """A worker process: several agents sharing one ZeroMQ context; reports every version."""
    import zmq
    from loguru import logger

    from zk0.agent.distribution.subscriber import AdapterSubscriber, SubscriberOptions
    from zk0.shared.config import AgentKeys, HubAddress

    logger.remove()
    logger.add(lambda m: None, level="ERROR")
    context: zmq.Context[Any] = zmq.Context(io_threads=1)
    subscribers: list[AdapterSubscriber] = []

    def report(agent_id: str, index: int) -> Any:
        def on_new_version(version: int, folder: Path, manifest: Any) -> None:
            now = time.monotonic()
            status = subscribers[index].status()
            queue.put((agent_id, version, now, status.bytes_rx + status.bytes_tx))

        return on_new_version

    for index, spec in enumerate(specs):
        keys = AgentKeys(**spec["keys"]) if spec["keys"] else None
        subscriber = AdapterSubscriber(
            spec["agent_id"],
            Path(spec["store"]),
            HubAddress(**spec["hub"]),
            keys,
            on_new_version=report(spec["agent_id"], index),
            options=SubscriberOptions(keep_versions=2),
            insecure=keys is None,
            context=context,
        )
        subscribers.append(subscriber)
    for subscriber in subscribers:
        subscriber.start()
    stop.wait()
    for subscriber in subscribers:
        subscriber.stop()
    context.term()


def measure(
    maker: AdapterMaker, agents: int, curve: bool, rounds: int, procs: int, root: Path
) -> dict[str, Any]:
    """One fresh fleet: ``rounds`` publishes, publish -> applied per agent per round."""
    from zk0.hub.distribution import DistributionServer
    from zk0.shared.config import HubKeys
    from zk0.shared.distribution.keys import AllowList, create_keypair
    from zk0.shared.store import AdapterStore

    store = AdapterStore(root / "hub")
    versions = [maker.add_version(store) for _ in range(rounds + 1)]
    keys = None
    if curve:
        create_keypair(root / "keys" / "hub.key_secret", root / "keys" / "hub.key", "hub")
        keys = HubKeys(
            curve_secret=root / "keys" / "hub.key_secret",
            curve_public=root / "keys" / "hub.key",
            allow_list_dir=root / "allowed",
        )
        keys.allow_list_dir.mkdir()
    server = DistributionServer(store, keys=keys, insecure=not curve).start()
    server.publish(versions[0])
    specs = []
    for i in range(agents):
        agent_id = f"bench-{i:03d}"
        agent_keys = None
        if keys is not None:
            secret, public = (
                root / "keys" / f"{agent_id}.key_secret",
                root / "keys" / f"{agent_id}.key",
            )
            create_keypair(secret, public, agent_id)
            AllowList(keys.allow_list_dir).add(agent_id, public)
            agent_keys = {
                "curve_secret": str(secret),
                "curve_public": str(public),
                "hub_curve_public": str(keys.curve_public),
            }
        hub = {
            "host": "127.0.0.1",
            "publish_port": server.publish_port,
            "fetch_port": server.fetch_port,
        }
        specs.append(
            {"agent_id": agent_id, "store": str(root / agent_id), "hub": hub, "keys": agent_keys}
        )
    ctx = multiprocessing.get_context("spawn")
    queue, stop = ctx.Queue(), ctx.Event()
    workers = [
        ctx.Process(target=_worker, args=(specs[w::procs], queue, stop), daemon=True)
        for w in range(min(procs, agents))
    ]
    for worker in workers:
        worker.start()
    try:
        _collect(queue, agents, versions[0], time.monotonic(), timeout_s=300)
        latencies: list[float] = []
        app_bytes: list[int] = []
        loopback: list[float] = []
        last_bytes: dict[str, int] = {}
        for version in versions[1:]:
            time.sleep(0.5)  # let statuses settle between rounds
            lo_before, t0 = _loopback_bytes(), time.monotonic()
            server.publish(version)
            reports = _collect(queue, agents, version, t0, timeout_s=300)
            loopback.append((_loopback_bytes() - lo_before) / agents)
            for agent_id, applied_at, total in reports:
                latencies.append(applied_at - t0)
                if agent_id in last_bytes:
                    app_bytes.append(total - last_bytes[agent_id])
                last_bytes[agent_id] = total
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
        server.stop()
    return {
        "agents": agents,
        "curve": curve,
        "worker_processes": len(workers),
        "adapter_bytes": store.manifest(versions[-1]).adapter_bytes,
        "latencies_s": latencies,
        "app_bytes": app_bytes,
        "loopback_bytes": loopback,
    }


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the repetitions of one (fleet size, mode)."""
    latencies = [x for s in samples for x in s["latencies_s"]]
    app_bytes = [x for s in samples for x in s["app_bytes"]]
    loopback = [x for s in samples for x in s["loopback_bytes"]]
    return {
        "agents": samples[0]["agents"],
        "curve": samples[0]["curve"],
        "worker_processes": samples[0]["worker_processes"],
        "adapter_bytes": samples[0]["adapter_bytes"],
        "samples": len(latencies),
        "p50_s": statistics.median(latencies),
        "p95_s": _percentile(latencies, 0.95),
        "max_s": max(latencies),
        "app_bytes_per_agent_per_version": statistics.median(app_bytes) if app_bytes else None,
        "loopback_bytes_per_agent_per_version": statistics.median(loopback),
    }


def _collect(queue: Any, agents: int, version: int, t0: float, timeout_s: float) -> list[Any]:
    """Wait for every agent to report ``version``; (agent id, applied at, bytes) each."""
    seen: dict[str, tuple[str, float, int]] = {}
    deadline = t0 + timeout_s
    while len(seen) < agents:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{len(seen)} of {agents} agents applied v{version} in {timeout_s}s")
        agent_id, applied, at, total = queue.get(timeout=remaining)
        if applied == version:
            seen[agent_id] = (agent_id, at, total)
    return list(seen.values())


@app.command()
def main(
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the result here.")] = None,
    agents: Annotated[str, typer.Option(help="Comma-separated fleet sizes.")] = "1,10,50",
    rounds: Annotated[int, typer.Option(min=1, help="Versions published per fleet.")] = 5,
    repeats: Annotated[int, typer.Option(min=1, help="Fresh fleets per size and mode.")] = 2,
    procs: Annotated[int, typer.Option(min=1, help="Worker processes holding the agents.")] = 5,
    modes: Annotated[str, typer.Option(help="curve, plain or both.")] = "both",
    robot_config: RobotOption = DEFAULT_ROBOT_CONFIG,
    workdir: Annotated[
        Path | None, typer.Option(help="Scratch folder (default: a temp dir).")
    ] = None,
) -> None:
    """Publish -> applied latency (p50, p95) and bytes per agent, CURVE on and off."""
    import torch
    from loguru import logger

    from zk0.bench._common import write_result

    torch.set_num_threads(1)
    logger.remove()
    logger.add(lambda m: None, level="ERROR")
    sizes = [int(n) for n in agents.split(",")]
    curves = {"both": [True, False], "curve": [True], "plain": [False]}[modes]
    maker = AdapterMaker(robot_config)
    scratch = Path(tempfile.mkdtemp(prefix="zk0-bench-dist-", dir=workdir))
    samples: dict[tuple[int, bool], list[dict[str, Any]]] = {}
    try:  # modes interleaved per size, so that load on a shared host hits both alike
        for size in sizes:
            for rep in range(repeats):
                for curve in curves:
                    folder = scratch / f"{'curve' if curve else 'plain'}-{size}-{rep}"
                    run = measure(maker, size, curve, rounds, procs, folder)
                    samples.setdefault((size, curve), []).append(run)
                    shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    runs = [summarize(group) for group in samples.values()]
    result: dict[str, Any] = {
        "runs": runs,
        "adapter_bytes": runs[0]["adapter_bytes"],
        "rounds": rounds,
        "repeats": repeats,
    }
    by = {(r["agents"], r["curve"]): r for r in runs}
    for (size, curve), run in by.items():
        suffix = "" if curve else "_plain"
        result[f"p50_publish_to_applied_s_{size}_agents{suffix}"] = run["p50_s"]
        result[f"p95_publish_to_applied_s_{size}_agents{suffix}"] = run["p95_s"]
        result[f"bytes_on_wire_per_agent_per_version_{size}_agents{suffix}"] = run[
            "app_bytes_per_agent_per_version"
        ]
        if curve and (size, False) in by:
            plain = by[(size, False)]
            result[f"curve_over_plain_latency_{size}_agents"] = run["p50_s"] / plain["p50_s"]
    headline = 10 if 10 in sizes else max(sizes)
    if f"curve_over_plain_latency_{headline}_agents" in result:
        result["curve_over_plain_latency"] = result[f"curve_over_plain_latency_{headline}_agents"]
    result["bytes_on_wire_per_agent_per_version"] = runs[0]["app_bytes_per_agent_per_version"]
    summary = "distribution: {:.2f} MB adapter; ".format(result["adapter_bytes"] / 1e6) + "; ".join(
        f"{r['agents']} agents {'CURVE' if r['curve'] else 'plain'} "
        f"p50 {r['p50_s'] * 1e3:.0f} ms p95 {r['p95_s'] * 1e3:.0f} ms"
        for r in runs
    )
    if "curve_over_plain_latency" in result:
        summary += (
            f"; CURVE/plain p50 at {headline} agents {result['curve_over_plain_latency']:.2f}"
        )
    write_result(json_path, result, summary)

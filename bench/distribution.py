"""``zk0 bench distribution``: how fast a new adapter version reaches a fleet, and at what cost.

A hub (``DistributionServer`` in a process of its own, so that its CPU seconds and peak memory
are its own) and N agents (real ``AdapterSubscriber``s, ``--agents-per-process`` to a worker
process; ``bench/_distribution_fleet.py``) on 127.0.0.1. Each round publishes a new full-size
adapter (LoRA r16 on the ``smolvla-arch`` action expert: 1,290,240 parameters, 2.6 MB as stored
in bf16, fresh random values every version) and times publish -> applied (fetched, verified,
stored, ``current`` switched, handed to the engine callback) per agent. For 1 to 1,000 agents,
with CURVE on and off. Each agent's store keeps 2 versions, as an agent's does. The hub's CPU
seconds are counted from publish to the last agent applied (statuses included), and at rest
(heartbeat statuses only) per second.

Bytes on the wire per agent per version are counted at the application level (every frame the
agent sends and receives, including statuses and announces during the round) and, for the
whole host, on the loopback interface (TCP/IP headers, ZMTP and CURVE framing included; other
loopback traffic on the host adds to it).

The adapter's base is identified by its generation recipe (``recipe:smolvla-arch-<digest>``):
the full-size base is never written to disk, only its LoRA shapes matter here.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue as queue_module
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, get_args

import typer

from zk0.shared.cli import RobotOption
from zk0.shared.config import DEFAULT_ROBOT_CONFIG, HubConfig
from zk0.shared.wire_delta import WireEncoding

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _loopback_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, data = line.partition(":")
        if name.strip() == "lo":
            return int(data.split()[0])  # received on lo == sent on lo
    return 0


def measure(
    maker: Any,
    agents: int,
    curve: bool,
    rounds: int,
    per_process: int,
    heartbeat_s: float,
    root: Path,
) -> dict[str, Any]:
    """One fresh fleet: ``rounds`` publishes, publish -> applied per agent per round, and the
    hub process's CPU seconds per version and peak memory."""
    from zk0.bench._distribution_fleet import Hub, SystemMemory, agent_worker, cpu_seconds
    from zk0.shared.config import HubKeys
    from zk0.shared.distribution.keys import create_keypair
    from zk0.shared.store import AdapterStore

    memory = SystemMemory()
    store = AdapterStore(root / "hub")
    versions = [maker.add_version(store) for _ in range(rounds + 1)]
    store.set_current(versions[0])
    hub_keys, specs = None, []
    if curve:
        create_keypair(root / "keys" / "hub.key_secret", root / "keys" / "hub.key", "hub")
        hub_keys = HubKeys(
            curve_secret=root / "keys" / "hub.key_secret",
            curve_public=root / "keys" / "hub.key",
            allow_list_dir=root / "allowed",
        )
        hub_keys.allow_list_dir.mkdir()
    for i in range(agents):
        agent_id = f"bench-{i:04d}"
        agent_keys = None
        if hub_keys is not None:
            # The public half is written straight into the allow-list, as ``zk0-hub keys add``
            # would leave it (``AllowList.add`` rescans the folder per key: minutes at 1,000).
            secret = root / "keys" / f"{agent_id}.key_secret"
            public = hub_keys.allow_list_dir / f"{agent_id}.key"
            create_keypair(secret, public, agent_id)
            agent_keys = {
                "curve_secret": str(secret),
                "curve_public": str(public),
                "hub_curve_public": str(hub_keys.curve_public),
            }
        specs.append({"agent_id": agent_id, "store": str(root / agent_id), "keys": agent_keys})
    hub = Hub(root / "hub", hub_keys.model_dump(mode="json") if hub_keys else None, heartbeat_s)
    for spec in specs:
        spec["hub"] = {"host": "127.0.0.1", "publish_port": hub.publish_port,
                       "fetch_port": hub.fetch_port}  # fmt: skip
    ctx = multiprocessing.get_context("spawn")
    queue, stop = ctx.Queue(), ctx.Event()
    processes = -(-agents // per_process)
    workers = [
        ctx.Process(target=agent_worker, args=(specs[w::processes], queue, stop), daemon=True)
        for w in range(processes)
    ]
    for index, worker in enumerate(workers):
        worker.name = f"agent worker {index}"
        worker.start()
    hub.process.name = "hub process"
    watched = [hub.process, *workers]
    timeout_s = 120 + agents  # a thousand agents on 2 cores take minutes to start
    try:
        _collect(queue, agents, versions[0], time.monotonic(), timeout_s, watched)
        time.sleep(2.0)  # let the first statuses settle, then time the hub at rest
        hub_pid = [hub.process.pid or 0]
        idle_before, idle_t0 = cpu_seconds(hub_pid), time.monotonic()
        time.sleep(5.0)
        idle_s = time.monotonic() - idle_t0
        hub_idle = (cpu_seconds(hub_pid) - idle_before) / idle_s
        latencies: list[float] = []
        app_bytes: list[int] = []
        loopback: list[float] = []
        hub_cpu: list[float] = []
        agents_cpu: list[float] = []
        windows: list[float] = []  # publish -> the last agent applied
        worker_pids = [w.pid for w in workers if w.pid is not None]
        last_bytes: dict[str, int] = {}
        for version in versions[1:]:
            time.sleep(0.5)  # let statuses settle between rounds
            before, agents_before = cpu_seconds(hub_pid), cpu_seconds(worker_pids)
            lo_before, t0 = _loopback_bytes(), time.monotonic()
            hub.publish(version)
            reports = _collect(queue, agents, version, t0, timeout_s, watched)
            hub_cpu.append(cpu_seconds(hub_pid) - before)
            windows.append(max(at for _, at, _ in reports) - t0)
            agents_cpu.append(cpu_seconds(worker_pids) - agents_before)
            loopback.append((_loopback_bytes() - lo_before) / agents)
            for agent_id, applied_at, total in reports:
                latencies.append(applied_at - t0)
                if agent_id in last_bytes:
                    app_bytes.append(total - last_bytes[agent_id])
                last_bytes[agent_id] = total
    finally:
        stop.set()
        for worker in workers:
            worker.join(60)
        dropped = hub.usage()["dropped_requests"]
        hub_final = hub.stop()
    return {
        "agents": agents,
        "curve": curve,
        "heartbeat_s": heartbeat_s,
        "wire_encoding": maker.wire_encoding,
        "worker_processes": len(workers),
        "adapter_bytes": store.manifest(versions[-1]).adapter_bytes,
        "latencies_s": latencies,
        "app_bytes": app_bytes,
        "loopback_bytes": loopback,
        "hub_cpu_s_per_version": hub_cpu,
        # The serving's own cost: what the hub spent beyond its at-rest rate (statuses).
        "hub_serving_cpu_s_per_version": [
            cpu - hub_idle * window for cpu, window in zip(hub_cpu, windows, strict=True)
        ],
        "hub_idle_cpu_s_per_s": hub_idle,
        "agents_cpu_s_per_version": agents_cpu,
        "hub_dropped_requests": dropped,
        "hub_peak_rss_mb": hub_final["peak_rss_mb"],
        **memory.stop(),
    }


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the repetitions of one (fleet size, mode)."""
    from zk0.bench._common import percentile  # torch: kept out of the fleet's workers

    latencies = [x for s in samples for x in s["latencies_s"]]
    app_bytes = [x for s in samples for x in s["app_bytes"]]
    loopback = [x for s in samples for x in s["loopback_bytes"]]
    return {
        "agents": samples[0]["agents"],
        "curve": samples[0]["curve"],
        "heartbeat_s": samples[0]["heartbeat_s"],
        "worker_processes": samples[0]["worker_processes"],
        "adapter_bytes": samples[0]["adapter_bytes"],
        "samples": len(latencies),
        "p50_s": statistics.median(latencies),
        "p95_s": percentile(latencies, 0.95),
        "max_s": max(latencies),
        "app_bytes_per_agent_per_version": statistics.median(app_bytes) if app_bytes else None,
        "loopback_bytes_per_agent_per_version": statistics.median(loopback),
        "hub_cpu_s_per_version": statistics.median(
            [x for s in samples for x in s["hub_cpu_s_per_version"]]
        ),
        "hub_serving_cpu_s_per_version": statistics.median(
            [x for s in samples for x in s["hub_serving_cpu_s_per_version"]]
        ),
        "hub_idle_cpu_s_per_s": statistics.median(s["hub_idle_cpu_s_per_s"] for s in samples),
        "hub_dropped_requests": sum(s["hub_dropped_requests"] for s in samples),
        "agents_cpu_s_per_version": statistics.median(
            [x for s in samples for x in s["agents_cpu_s_per_version"]]
        ),
        "hub_peak_rss_mb": max(s["hub_peak_rss_mb"] for s in samples),
        "system_memory_peak_gb": max(s["system_memory_peak_gb"] for s in samples),
        "system_memory_before_gb": min(s["system_memory_before_gb"] for s in samples),
    }


def _result(
    samples: dict[tuple[int, bool], list[dict[str, Any]]],
    failed: list[dict[str, Any]],
    curves: list[bool],
    sizes: list[int],
    rounds: int,
    repeats: int,
) -> dict[str, Any]:
    """The JSON of the fleets measured so far (``complete`` once every one has run)."""
    runs = [summarize(group) for group in samples.values()]
    result: dict[str, Any] = {
        "runs": runs,
        "failed": failed,
        "complete": len(runs) + len(failed) == len(sizes) * len(curves) and not failed,
        "adapter_bytes": runs[0]["adapter_bytes"] if runs else None,
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
    result["headline_agents"] = headline
    if f"curve_over_plain_latency_{headline}_agents" in result:
        result["curve_over_plain_latency"] = result[f"curve_over_plain_latency_{headline}_agents"]
    if runs:
        result["bytes_on_wire_per_agent_per_version"] = runs[0]["app_bytes_per_agent_per_version"]
        result["app_bytes_per_agent_per_version"] = max(
            r["app_bytes_per_agent_per_version"] or 0 for r in runs if r["curve"] == curves[0]
        )
    return result


def _collect(
    queue: Any, agents: int, version: int, t0: float, timeout_s: float, processes: list[Any]
) -> list[Any]:
    """Wait for every agent to report ``version``; (agent id, applied at, bytes) each. Fails
    with one line if the time runs out or the hub or a worker process has died."""
    seen: dict[str, tuple[str, float, int]] = {}
    deadline = t0 + timeout_s
    while len(seen) < agents:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{len(seen)} of {agents} agents applied v{version} in {timeout_s}s")
        dead = [p for p in processes if p.exitcode is not None]
        if dead:
            raise RuntimeError(f"{dead[0].name} exited with {dead[0].exitcode} during v{version}")
        try:
            agent_id, applied, at, total = queue.get(timeout=min(remaining, 1.0))
        except queue_module.Empty:
            continue
        if applied == version:
            seen[agent_id] = (agent_id, at, total)
    return list(seen.values())


@app.command()
def main(
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the result here.")] = None,
    agents: Annotated[str, typer.Option(help="Comma-separated fleet sizes.")] = "1,10,100,500,1000",
    rounds: Annotated[int, typer.Option(min=1, help="Versions published per fleet.")] = 3,
    repeats: Annotated[int, typer.Option(min=1, help="Fresh fleets per size and mode.")] = 1,
    agents_per_process: Annotated[
        int, typer.Option(min=1, help="Agents one worker process holds.")
    ] = 100,
    modes: Annotated[str, typer.Option(help="curve, plain or both.")] = "both",
    wire_encoding: Annotated[
        str,
        typer.Option(
            help="bf16 (versions whole) or int8 (each version after the first also as its "
            "int8 delta from the one before: run-config wire-encoding)."
        ),
    ] = "bf16",
    heartbeat_s: Annotated[
        float, typer.Option(min=0.01, help="The hub's heartbeat (hub.yaml heartbeat_s).")
    ] = HubConfig.model_fields["heartbeat_s"].default,
    robot_config: RobotOption = DEFAULT_ROBOT_CONFIG,
    workdir: Annotated[
        Path | None,
        typer.Option(
            help="Scratch folder (default: a temp dir). Every simulated agent's store is here: on "
            "one disk, a thousand agents' fsyncs queue behind each other (tmpfs: /dev/shm)."
        ),
    ] = None,
) -> None:
    """Publish -> applied latency (p50, p95) and bytes per agent, CURVE on and off."""
    import torch
    from loguru import logger

    from zk0.bench._common import write_result
    from zk0.bench._distribution_fleet import AdapterMaker

    torch.set_num_threads(1)
    logger.remove()
    logger.add(lambda m: None, level="ERROR")
    load_start = os.getloadavg()[0]
    sizes = [int(n) for n in agents.split(",")]
    curves = {"both": [True, False], "curve": [True], "plain": [False]}[modes]
    if wire_encoding not in get_args(WireEncoding):
        raise typer.BadParameter(f"--wire-encoding: {wire_encoding!r} is not bf16 or int8")
    maker = AdapterMaker(robot_config, wire_encoding)
    scratch = Path(tempfile.mkdtemp(prefix="zk0-bench-dist-", dir=workdir))
    samples: dict[tuple[int, bool], list[dict[str, Any]]] = {}
    failed: list[dict[str, Any]] = []
    try:  # modes interleaved per size, so that load on a shared host hits both alike
        for size in sizes:
            for rep in range(repeats):
                for curve in curves:
                    folder = scratch / f"{'curve' if curve else 'plain'}-{size}-{rep}"
                    try:
                        run = measure(
                            maker, size, curve, rounds, agents_per_process, heartbeat_s, folder
                        )
                        samples.setdefault((size, curve), []).append(run)
                    except (TimeoutError, RuntimeError) as error:  # the next size may still run
                        failed.append({"agents": size, "curve": curve, "error": str(error)})
                    shutil.rmtree(folder, ignore_errors=True)
                    if json_path is not None:  # a long run leaves what it measured so far
                        partial = _result(samples, failed, curves, sizes, rounds, repeats)
                        partial["workdir"] = str(workdir or tempfile.gettempdir())
                        json_path.parent.mkdir(parents=True, exist_ok=True)
                        json_path.write_text(json.dumps(partial, indent=2) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = _result(samples, failed, curves, sizes, rounds, repeats)
    result["load_average_1min"] = {"start": load_start, "end": os.getloadavg()[0]}
    result["workdir"] = str(workdir or tempfile.gettempdir())
    runs = result["runs"]
    result["wire_encoding"] = wire_encoding
    summary = f"distribution ({wire_encoding}): {result['adapter_bytes'] / 1e6:.2f} MB adapter; "
    summary += "; ".join(
        f"{r['agents']} agents {'CURVE' if r['curve'] else 'plain'} "
        f"p50 {r['p50_s']:.2f} s p95 {r['p95_s']:.2f} s hub {r['hub_cpu_s_per_version']:.2f} "
        f"CPU-s/version {r['hub_peak_rss_mb']:.0f} MB "
        f"{(r['app_bytes_per_agent_per_version'] or 0) / 1e6:.3f} MB/agent/version"
        for r in runs
    )
    summary += "".join(f"; {f['agents']} agents failed: {f['error']}" for f in failed)
    if "curve_over_plain_latency" in result:
        summary += (
            f"; CURVE/plain p50 at {result['headline_agents']} agents "
            f"{result['curve_over_plain_latency']:.2f}"
        )
    write_result(json_path, result, summary)

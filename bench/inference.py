"""``zk0 bench inference``: async vs sync on the simulated arm, torch vs ONNX Runtime, hot swap.

* Closed loop (``tiny-sim-base`` on held-out episodes of its base task, 30 fps, paced in real
  time, same seeds and tasks in every run): the time the arm stood still waiting for the model
  (each episode's first chunk excluded, in both modes), completion time, starved-tick fraction;
  for the torch backend (headline) and ONNX Runtime.
* Chunk latency, torch vs ONNX Runtime, for ``tiny-sim-base`` (the whole chunk: VLM prefix and
  ten denoising steps) and their largest difference, for the base and for a swapped adapter.
* ``smolvla-arch`` (full size, random weights): a whole chunk in torch, ONNX Runtime float32 and
  int8, and their export, each in its own process (chunk latency p50/p95, peak memory, the
  largest difference from torch, latency at fewer denoising steps; or the error).
* Denoising steps: the tiny base's chunk latency and closed-loop success (simulated time, its
  base task's never-seen scenes) at 10, 5, 3, 2 and 1 steps.
* Hot swap: adapter versions swapped in during a running async episode (verify + merge time
  in the loader thread, there and with the engine idle; starved and missed ticks meanwhile).

The swapped adapters are real artifacts whose LoRA B matrices are drawn at random (timing only).
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer

from zk0.agent.inference.backends import BackendName
from zk0.bench._arch import arch_figures
from zk0.bench._common import random_observation, time_calls, write_result
from zk0.bench._denoising import success_by_steps

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
POLICY = "tiny-sim-base"
HELD_OUT_SEED = 4242  # the base task, episodes the base never saw


def _robot(horizon_s: float) -> Any:
    from zk0.shared.sim_variants import BASE_VARIANT, variant_config

    return variant_config({**BASE_VARIANT, "seed": HELD_OUT_SEED}, horizon_s)


def make_adapters(
    features: Any, stats: Any, count: int, root: Path, policy: str = POLICY
) -> list[Path]:
    """``count`` artifacts for ``policy`` carrying ``stats`` (None: none); B drawn at random."""
    from zk0.shared.artifact import save_adapter
    from zk0.shared.lora import LoraSpec, apply_lora
    from zk0.shared.normalization import NORMALIZATION_FILE, dumps
    from zk0.shared.policy_factory import build_policy

    loaded = build_policy(policy, features, device="cpu")
    peft_model = apply_lora(loaded.policy, LoraSpec(), loaded.base.name_or_path)
    generator = torch.Generator().manual_seed(0)
    folders = []
    for version in range(1, count + 1):
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if ".lora_B." in name:
                    param.copy_(0.02 * torch.randn(param.shape, generator=generator))
        folder = root / f"v{version}"
        save_adapter(
            peft_model,
            folder,
            version=version,
            base=loaded.base,
            lora=LoraSpec(),
            extra_files={NORMALIZATION_FILE: dumps(stats)} if stats is not None else None,
        )
        folders.append(folder)
    return folders


def _mode_figures(report: Any) -> dict[str, Any]:
    summary = report.summary()
    keep = ("success_rate", "mean_episode_s", "chunk_latency_p50_s", "chunk_latency_p95_s")
    return {
        **{key: summary[key] for key in keep},
        "idle_s": summary["idle_s"],
        "starved_fraction": summary["starved_fraction"],
        "starved_ticks": summary["starved_ticks"],
        "missed_ticks": summary["missed_ticks"],
        "mean_first_chunk_s": summary["mean_first_chunk_s"],
        "chunks_by_backend": summary["chunks_by_backend"],
        "episode_s": [e["duration_s"] for e in summary["per_episode"]],
        "episode_success": [e["success"] for e in summary["per_episode"]],
    }


def closed_loop(backend: BackendName, episodes: int, horizon_s: float) -> dict[str, Any]:
    from zk0.agent.inference.evaluation import evaluate, open_session

    with open_session(_robot(horizon_s), POLICY, backend=backend) as session:
        sync = evaluate(session, episodes, mode="sync")
        run = evaluate(session, episodes, mode="async")
        info = session.info
    figures = {"sync": _mode_figures(sync), "async": _mode_figures(run)}
    idle_sync = figures["sync"]["idle_s"]
    return {
        **figures,
        "idle_ratio_async_over_sync": figures["async"]["idle_s"] / idle_sync if idle_sync else None,
        "completion_time_ratio_async_over_sync": figures["async"]["mean_episode_s"]
        / figures["sync"]["mean_episode_s"],
        "horizon_steps": sync.info["horizon_steps"],
        "fps": info["fps"],
        "chunk_actions": info["chunk_actions"],
        "threshold": info["engine"]["threshold"],
    }


def hot_swap(swaps: int, horizon_s: float, root: Path) -> dict[str, Any]:
    """``swaps`` versions, each offered once the previous one computed a chunk, then rollback."""
    from zk0.agent.inference.evaluation import base_task_feature_stats, open_session

    with open_session(_robot(horizon_s), POLICY) as session:
        engine, slot = session.engine, session.slot
        stats = base_task_feature_stats(slot.base.policy.config)
        folders = make_adapters(slot.base.features, stats, swaps, root)
        in_use: list[int | None] = []
        engine.on_version_in_use = in_use.append
        box: dict[str, Any] = {}
        runner = threading.Thread(
            target=lambda: box.update(result=engine.run_episode(0, 100_000, max_s=600))
        )
        runner.start()
        try:
            _wait(lambda: engine.queue.depth() > 0)  # the episode's first chunk has arrived
            for version, folder in enumerate(folders, start=1):
                engine.offer_adapter(version, folder)
                _wait(lambda v=version: in_use[-1] == v)
            engine.rollback()
            _wait(lambda: in_use[-1] == swaps - 1)
        finally:
            engine.end_episode()
            runner.join()
        result = box["result"]
        offers = [s for s in slot.swaps if s.kind == "offer"]
        idle = []
        for folder in folders:  # the same work with nothing else running
            start = time.perf_counter()
            slot.build(folder)
            idle.append(time.perf_counter() - start)
    windows = []
    for swap in offers:
        first = next(c for c in result.chunks if c.version == swap.version)
        windows.append((swap.offered_at, first.ready_at))
    loads = [s.load_s for s in offers]
    return {
        "swaps": len(offers),
        "hot_swap_s": float(np.median(loads)),
        "hot_swap_max_s": max(loads),
        "hot_swap_idle_s": float(np.median(idle)),
        "offer_to_first_chunk_s": float(np.median([end - start for start, end in windows])),
        "starved_ticks_during_swaps": sum(result.starved_between(*w) for w in windows),
        "missed_ticks_during_swaps": sum(result.missed_between(*w) for w in windows),
        "episode_starved_ticks": result.starved_ticks,
        "episode_s": result.duration_s,
        "versions_in_use": in_use,
        "load_errors": slot.errors,
    }


def _wait(predicate: Any, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("hot swap did not take effect")
        time.sleep(0.01)


def onnx_vs_torch(repeats: int, threads: int, root: Path) -> dict[str, Any]:
    """Whole-chunk latency of both backends on ``tiny-sim-base``, and their largest difference
    (normalized model outputs and robot units), for the base and for a swapped adapter."""
    from zk0.agent.inference.backends import (
        InferencePolicy,
        OnnxBackend,
        TorchBackend,
        predict_chunk,
    )
    from zk0.agent.inference.evaluation import base_task_feature_stats
    from zk0.agent.inference.onnx_export import OnnxExport
    from zk0.agent.inference.onnx_graphs import META_FILE, signature_of
    from zk0.agent.inference.swap import AdapterSlot
    from zk0.shared.features import PolicyFeatures
    from zk0.shared.normalization import to_lerobot
    from zk0.shared.policy_factory import build_policy

    robot = _robot(8.0)
    loaded = build_policy(POLICY, PolicyFeatures.from_robot_config(robot), device="cpu")
    stats = base_task_feature_stats(loaded.policy.config)
    slot = AdapterSlot(loaded, to_lerobot(stats))
    policy = InferencePolicy(loaded.policy)
    base = slot.active
    frames = [random_observation(policy.policy, seed, robot.task) for seed in range(4)]
    signature = signature_of(policy.policy, base.preprocessor(dict(frames[0])))
    export = OnnxExport(loaded.base, loaded.features, signature)
    cached = export.ready()
    export.export_now(policy.policy)
    onnx = OnnxBackend(export.folder, export.signature, policy, threads)
    reference = TorchBackend(policy)
    adapter = slot.build(make_adapters(loaded.features, stats, 1, root)[0])
    normalized_diff = robot_units_diff = 0.0
    for runtime in (base, adapter):
        for seed, frame in enumerate(frames):
            noise = torch.randn(1, 50, 32, generator=torch.Generator().manual_seed(seed))
            batch = runtime.preprocessor(dict(frame))
            a = reference.predict(runtime, dict(batch), noise).numpy()
            b = onnx.predict(runtime, dict(batch), noise).numpy()
            normalized_diff = max(normalized_diff, float(np.abs(a - b).max()))
            a_units = predict_chunk(runtime, reference, frame, noise)
            b_units = predict_chunk(runtime, onnx, frame, noise)
            robot_units_diff = max(robot_units_diff, float(np.abs(a_units - b_units).max()))
    noise = torch.randn(1, 50, 32, generator=torch.Generator().manual_seed(0))
    batch = base.preprocessor(dict(frames[0]))
    timings = {
        "torch": time_calls(lambda: reference.predict(base, dict(batch), noise), repeats, 3),
        "onnxruntime": time_calls(lambda: onnx.predict(base, dict(batch), noise), repeats, 3),
        "torch_with_processing": time_calls(
            lambda: predict_chunk(base, reference, frames[0], noise), repeats, 3
        ),
        "onnxruntime_with_processing": time_calls(
            lambda: predict_chunk(base, onnx, frames[0], noise), repeats, 3
        ),
    }
    meta = json.loads((export.folder / META_FILE).read_text())
    return {
        "torch_chunk_s": timings["torch"]["median_s"],
        "onnx_chunk_s": timings["onnxruntime"]["median_s"],
        "onnx_speedup": timings["torch"]["median_s"] / timings["onnxruntime"]["median_s"],
        "onnx_max_abs_diff": normalized_diff,
        "onnx_max_abs_diff_robot_units": robot_units_diff,
        "export_s": meta["seconds"].get("total_s"),
        "export_was_cached": cached,
        "timings": timings,
        "repeats": repeats,
    }


PARTS = ("closed_loop", "hot_swap", "tiny", "arch", "steps")


@app.command()
def main(
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the result here.")] = None,
    parts: Annotated[str, typer.Option(help=f"Comma-separated: {', '.join(PARTS)}.")] = ",".join(
        PARTS
    ),
    episodes: Annotated[int, typer.Option(min=1, help="Episodes per mode and backend.")] = 3,
    horizon_s: Annotated[float, typer.Option(help="Policy actions per episode / fps.")] = 8.0,
    repeats: Annotated[int, typer.Option(min=1, help="Timed chunks per backend.")] = 20,
    swaps: Annotated[int, typer.Option(min=2)] = 10,
    arch_timeout_s: Annotated[float, typer.Option(help="Per full-size probe.")] = 1800.0,
    steps_episodes: Annotated[
        int, typer.Option(min=1, help="Simulated episodes per denoising step count.")
    ] = 20,
    threads: Annotated[int, typer.Option(help="torch/onnxruntime threads.")] = 1,
) -> None:
    """Async vs sync on the simulated arm, torch vs ONNX Runtime, hot-swap time, full size,
    denoising steps."""
    chosen = [part for part in parts.split(",") if part]
    if unknown := [part for part in chosen if part not in PARTS]:
        raise typer.BadParameter(f"unknown part {unknown[0]!r} (known: {', '.join(PARTS)})")
    torch.set_num_threads(threads)
    result: dict[str, Any] = {"parts": chosen, "policy": POLICY, "episodes": episodes}
    lines = []
    with tempfile.TemporaryDirectory(prefix="zk0-bench-inference-") as tmp:
        if "closed_loop" in chosen:
            backends: tuple[BackendName, ...] = ("torch", "onnx")
            loops = {name: closed_loop(name, episodes, horizon_s) for name in backends}
            headline = loops["torch"]
            ratio = headline["idle_ratio_async_over_sync"]
            result |= {
                "idle_ratio_async_over_sync": ratio,
                "completion_time_ratio_async_over_sync": headline[
                    "completion_time_ratio_async_over_sync"
                ],
                "starved_fraction_async": headline["async"]["starved_fraction"],
                "starved_fraction_sync": headline["sync"]["starved_fraction"],
                "idle_s_async": headline["async"]["idle_s"],
                "idle_s_sync": headline["sync"]["idle_s"],
                "closed_loop": loops,
            }
            lines.append(
                f"arm idle async/sync {'n/a' if ratio is None else f'{ratio:.3f}'} "
                f"({headline['async']['idle_s']:.2f} s vs {headline['sync']['idle_s']:.2f} s), "
                f"completion {headline['completion_time_ratio_async_over_sync']:.3f}x, starved "
                f"{headline['async']['starved_fraction']:.1%} async vs "
                f"{headline['sync']['starved_fraction']:.1%} sync"
            )
        if "hot_swap" in chosen:
            swap = hot_swap(swaps, horizon_s, Path(tmp) / "swap")
            result |= {
                "hot_swap_s": swap["hot_swap_s"],
                "starved_ticks_during_swaps": swap["starved_ticks_during_swaps"],
                "hot_swap": swap,
            }
            lines.append(
                f"hot swap {swap['hot_swap_s'] * 1e3:.0f} ms, "
                f"{swap['starved_ticks_during_swaps']} starved ticks during {swap['swaps']} swaps"
            )
        if "tiny" in chosen:
            tiny = onnx_vs_torch(repeats, threads, Path(tmp) / "tiny")
            result |= {
                "onnx_speedup_tiny": tiny["onnx_speedup"],
                "onnx_max_abs_diff": tiny["onnx_max_abs_diff"],
                "tiny_sim_base": tiny,
            }
            lines.append(
                f"ONNX Runtime {tiny['onnx_speedup']:.1f}x torch on the tiny chunk "
                f"(max diff {tiny['onnx_max_abs_diff']:.1e})"
            )
    if "arch" in chosen:
        full = arch_figures(arch_timeout_s)
        result["smolvla_arch"] = full
        latencies = [
            f"{kind} {full[kind]['chunk_s_p50']:.2f} s" if "chunk_s_p50" in full[kind] else kind
            for kind in ("torch", "onnx", "onnx_int8")
        ]
        lines.append("full-size chunk " + ", ".join(latencies))
    if "steps" in chosen:
        steps = success_by_steps(steps_episodes)
        result["denoising_steps"] = steps
        lines.append(
            "tiny base success by denoising steps "
            + ", ".join(
                f"{n}: {r['success']['successes']}/{r['success']['episodes']}"
                for n, r in steps["by_steps"].items()
            )
        )
    write_result(json_path, result, "inference: " + "; ".join(lines))


if __name__ == "__main__":
    app()

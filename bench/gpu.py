"""``zk0 bench gpu``: full-size SmolVLA on an NVIDIA GPU, in one command.

What an arm's PC with a GPU would run, on ``smolvla-arch`` (the full-size architecture with
random weights, built offline) and the simulated SO-101's features::

    chunk latency     torch fp32 and torch bf16 autocast: predict_action_chunk, p50 / p95
    ONNX Runtime      the exported VLM prefix and denoising step (adapter weights as inputs) on
                      the CUDA execution provider (``onnxruntime-gpu``; else recorded unavailable)
    training step     one LoRA step at the round's batch size under bf16 autocast, p50 / p95
    hot swap          a full-size version verified, merged into the expert and made active
                      (``AdapterSlot.load``), p50 / max

Writes ``--json`` (``bench/results/policy_gpu.json``). Without a CUDA device it stops with one
line; ``--device cpu --policy tiny`` runs the same code as a smoke test. Neither the CPU build
nor the tests need it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from zk0.bench._common import synthetic_batch, time_calls, write_result

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _samples(fn: Callable[[], object], repeats: int, warmup: int = 2) -> dict[str, Any]:
    """p50 / p95 / max seconds of ``repeats`` calls after ``warmup`` (``time_calls``)."""
    timed = time_calls(fn, repeats, warmup)
    return {"p50_s": timed["median_s"], "p95_s": timed["p95_s"], "max_s": timed["max_s"],
            "repeats": repeats}  # fmt: skip


def chunk_and_step(spec: str, device: str, repeats: int, batch_size: int) -> dict[str, Any]:
    """Chunk latency in fp32 and bf16 autocast; one LoRA training step under bf16 autocast."""
    from zk0.bench.policy import _train_step_fn
    from zk0.shared.config import load_robot_config
    from zk0.shared.features import PolicyFeatures
    from zk0.shared.lora import LoraSpec, apply_lora
    from zk0.shared.policy_factory import build_fresh_policy, make_processors
    from zk0.shared.sim_variants import SIM_ROBOT

    features = PolicyFeatures.from_robot_config(load_robot_config(SIM_ROBOT))
    policy = build_fresh_policy(spec, features).to(device)
    policy.config.device = device
    preprocessor, _ = make_processors(policy.config)
    peft_model = apply_lora(policy, LoraSpec())
    one = synthetic_batch(policy, preprocessor, batch_size=1)
    noise = torch.randn(1, policy.config.chunk_size, policy.config.max_action_dim, device=device)
    bf16 = device == "cuda"  # autocast is measured where agents would use it

    def chunk() -> None:
        with torch.no_grad():
            peft_model.predict_action_chunk(dict(one), noise=noise)

    peft_model.eval()
    result: dict[str, Any] = {"chunk_fp32": _samples(chunk, repeats)}
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        result["chunk_bf16_autocast"] = _samples(chunk, repeats) if bf16 else None
        batch = synthetic_batch(policy, preprocessor, batch_size=batch_size)
        step, trainable = _train_step_fn(peft_model, batch)
        result["lora_train_step"] = {
            **_samples(step, repeats),
            "batch_size": batch_size,
            "bf16_autocast": bf16,
            "trainable_params": trainable,
        }
    return result


def onnx_runtime(spec: str, device: str, repeats: int) -> dict[str, Any]:
    """The exported prefix and denoising step on ONNX Runtime's CUDA (or CPU) provider."""
    import onnxruntime as ort  # type: ignore[import-untyped]

    from zk0.bench._arch import arch_probe

    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    available = ort.get_available_providers()
    if provider not in available:
        return {"error": f"{provider} not in onnxruntime's providers {available}"}
    with tempfile.TemporaryDirectory(prefix="zk0-gpu-onnx-") as tmp:
        exported = arch_probe("export", Path(tmp), spec=spec)
        timed = arch_probe("onnx", Path(tmp), spec=spec, provider=provider, repeats=repeats)
    return {"provider": provider, "export": exported, **timed}


def hot_swap(spec: str, device: str, repeats: int) -> dict[str, Any]:
    """``AdapterSlot.load`` of full-size versions, alternating two, on ``device``."""
    from zk0.agent.inference.swap import AdapterSlot
    from zk0.bench.inference import make_adapters
    from zk0.shared.config import load_robot_config
    from zk0.shared.features import PolicyFeatures
    from zk0.shared.policy_factory import build_policy
    from zk0.shared.sim_variants import SIM_ROBOT

    features = PolicyFeatures.from_robot_config(load_robot_config(SIM_ROBOT))
    loaded = build_policy(spec, features, device=device)
    with tempfile.TemporaryDirectory(prefix="zk0-gpu-swap-") as tmp:
        folders = make_adapters(features, None, 2, Path(tmp), policy=spec)
        slot = AdapterSlot(loaded)
        turn = iter(range(10**9))
        figures = _samples(lambda: slot.load(folders[next(turn) % 2]), repeats, warmup=1)
        figures["adapter_bytes"] = sum(p.stat().st_size for p in folders[0].iterdir())
    return figures


@app.command()
def main(
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the result here.")] = None,
    policy: Annotated[str, typer.Option(help="Architecture (generated, random weights).")] = (
        "smolvla-arch"
    ),
    device: Annotated[str, typer.Option(help="cuda, or cpu for a smoke run.")] = "cuda",
    repeats: Annotated[int, typer.Option(min=2, help="Timed calls per figure.")] = 20,
    batch_size: Annotated[int, typer.Option(min=1, help="Training step batch.")] = 16,
) -> None:
    """Full-size chunk latency (torch fp32 / bf16, ONNX Runtime CUDA), training step, hot swap."""
    if device == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("no CUDA device here (--device cpu runs a smoke test)")
    result: dict[str, Any] = {"policy": policy, "device": device}
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)
    result |= chunk_and_step(policy, device, repeats, batch_size)
    result["onnxruntime"] = onnx_runtime(policy, device, max(2, repeats // 4))
    result["hot_swap"] = hot_swap(policy, device, max(2, repeats // 4))
    if device == "cuda":
        result["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    bf16 = result.get("chunk_bf16_autocast") or {}
    summary = (
        f"gpu: {policy} on {result.get('gpu', device)}: chunk p50 fp32 "
        f"{result['chunk_fp32']['p50_s'] * 1e3:.0f} ms"
        + (f", bf16 {bf16['p50_s'] * 1e3:.0f} ms" if bf16 else "")
        + f"; LoRA step {result['lora_train_step']['p50_s'] * 1e3:.0f} ms at batch {batch_size}"
        + f"; hot swap p50 {result['hot_swap']['p50_s'] * 1e3:.0f} ms"
    )
    write_result(json_path, result, summary)

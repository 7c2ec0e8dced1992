"""``zk0 bench policy``: what LoRA on the action expert costs and saves, tiny and full size.

For each architecture: parameter counts, adapter bytes, one optimizer step at batch 1 with LoRA
vs with the whole expert trainable (ratio from the same run), and ``predict_action_chunk`` time.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from zk0.bench._common import synthetic_batch, time_calls, write_result
from zk0.shared.cli import RobotOption
from zk0.shared.config import DEFAULT_ROBOT_CONFIG, load_robot_config
from zk0.shared.features import PolicyFeatures
from zk0.shared.lora import LoraSpec, apply_lora, summarize
from zk0.shared.policy_factory import build_fresh_policy, default_device, make_processors

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _train_step_fn(model: Any, batch: dict[str, Any]) -> Any:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step() -> None:
        loss, _ = model.forward(dict(batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def measure(
    spec: str, features: PolicyFeatures, repeats: int, device: str, bf16: bool = False
) -> dict[str, Any]:
    """One architecture's figures; ``bf16`` runs steps and chunks under CUDA autocast (AMP)."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        return _measure(spec, features, repeats, device)


def _measure(spec: str, features: PolicyFeatures, repeats: int, device: str) -> dict[str, Any]:
    policy = build_fresh_policy(spec, features).to(device)
    policy.config.device = device
    preprocessor, _ = make_processors(policy.config)
    batch = synthetic_batch(policy, preprocessor, batch_size=1)
    state_bytes = sum(t.numel() * 4 for t in policy.state_dict().values())

    full_step, full_trainable = _train_step_fn(policy, batch)  # LeRobot's default: VLM frozen
    full = time_calls(full_step, repeats)
    del full_step
    gc.collect()

    peft_model = apply_lora(policy, LoraSpec())
    summary = summarize(peft_model)
    lora_step, _ = _train_step_fn(peft_model, batch)
    lora = time_calls(lora_step, repeats)
    del lora_step
    gc.collect()

    peft_model.eval()
    noise = torch.randn(1, policy.config.chunk_size, policy.config.max_action_dim, device=device)
    chunk = time_calls(lambda: peft_model.predict_action_chunk(dict(batch), noise=noise), repeats)
    return {
        **summary.as_dict(),
        "wrapped_modules": len(summary.wrapped_modules),
        "full_expert_trainable_params": full_trainable,
        "policy_state_bytes_fp32": state_bytes,
        "full_expert_step_s": full["median_s"],
        "lora_step_s": lora["median_s"],
        "lora_step_over_full_step": lora["median_s"] / full["median_s"],
        "predict_action_chunk_s": chunk["median_s"],
        "timings": {"full_expert_step": full, "lora_step": lora, "predict_action_chunk": chunk},
        "repeats": repeats,
    }


@app.command()
def main(
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the result here.")] = None,
    specs: Annotated[
        str, typer.Option(help="Comma-separated architectures.")
    ] = "tiny,smolvla-arch",
    repeats: Annotated[int, typer.Option(min=1)] = 2,
    robot_config: RobotOption = DEFAULT_ROBOT_CONFIG,
    threads: Annotated[int, typer.Option(help="torch CPU threads (1 is steadiest here).")] = 1,
    bf16: Annotated[
        bool, typer.Option(help="bf16 autocast (AMP), as agents train on a GPU.")
    ] = False,
) -> None:
    """Parameter counts, adapter bytes, LoRA vs full-expert step time, chunk latency."""
    torch.set_num_threads(threads)
    features = PolicyFeatures.from_robot_config(load_robot_config(robot_config))
    device = default_device()
    if bf16 and device != "cuda":
        raise ValueError("--bf16 measures CUDA autocast; no GPU here")
    results = {spec: measure(spec, features, repeats, device, bf16) for spec in specs.split(",")}
    result: dict[str, Any] = {"device": device, "bf16_autocast": bf16, "specs": results}
    full_size = results.get("smolvla-arch")
    headline = full_size or next(iter(results.values()))
    if full_size:
        result |= {
            "lora_params_full_size": full_size["lora_params"],
            "adapter_bytes_fp32_full_size": full_size["adapter_bytes_fp32"],
            "adapter_bytes_bf16_full_size": full_size["adapter_bytes_bf16"],
            "total_params_full_size": full_size["total_params"],
        }
    result["lora_step_over_full_step"] = headline["lora_step_over_full_step"]
    summary = (
        "policy: "
        + "; ".join(
            f"{spec} {r['lora_params']:,} LoRA of {r['total_params']:,} params, "
            f"adapter {r['adapter_bytes_fp32'] / 1e6:.2f} MB fp32, "
            f"LoRA/full-expert step {r['lora_step_over_full_step']:.2f} "
            f"({r['lora_step_s'] * 1e3:.0f}/{r['full_expert_step_s'] * 1e3:.0f} ms), "
            f"chunk {r['predict_action_chunk_s'] * 1e3:.0f} ms"
            for spec, r in results.items()
        )
        + f" [{device}{', bf16 autocast' if bf16 else ''}]"
    )
    write_result(json_path, result, summary)

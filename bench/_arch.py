"""Full-size SmolVLA (``smolvla-arch``, random weights) in torch and ONNX Runtime, for
``zk0 bench inference``: the VLM prefix and one denoising step, their ONNX export, each probe in
a child process (``python -m zk0.bench._arch KIND DIR OUT``) so its peak memory is its own."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zk0.bench._common import time_calls

ARCH = "smolvla-arch"


def arch_probe(
    kind: str,
    folder: Path,
    spec: str = ARCH,
    provider: str = "CPUExecutionProvider",
    repeats: int = 2,
) -> dict[str, Any]:
    """One full-size measurement in this process: ``torch``, ``export`` or ``onnx`` (on
    ONNX Runtime's ``provider``)."""
    from zk0.agent.inference.onnx_graphs import (
        DENOISE_FILE,
        PREFIX_FILE,
        _modules,
        export_graphs,
        input_names,
        prepare_inputs,
        signature_of,
    )
    from zk0.agent.inference.swap import expert_weight_names
    from zk0.shared.config import load_robot_config
    from zk0.shared.features import PolicyFeatures
    from zk0.shared.policy_factory import build_fresh_policy, make_processors
    from zk0.shared.sim_variants import SIM_ROBOT

    config = load_robot_config(SIM_ROBOT)
    policy = build_fresh_policy(spec, PolicyFeatures.from_robot_config(config)).eval()
    preprocessor, _ = make_processors(policy.config)
    frame: dict[str, Any] = {
        key: torch.rand(feature.shape, generator=torch.Generator().manual_seed(0))
        for key, feature in policy.config.input_features.items()
    }
    frame["task"] = config.task
    batch = preprocessor(frame)
    signature = signature_of(policy, batch)
    result: dict[str, Any] = {"params": sum(p.numel() for p in policy.parameters())}
    prefix_cls, _ = _modules()
    with torch.no_grad():
        inputs = prepare_inputs(policy, batch)
        prefix = prefix_cls(policy.model, len(signature.images)).eval()
        cache = prefix(*inputs)
    x_t = torch.randn(1, signature.chunk_size, signature.action_dim)
    timestep = torch.ones(1)
    if kind == "torch":
        from transformers import DynamicCache

        def step() -> None:
            kv = DynamicCache()
            for layer in range((len(cache) - 1) // 2):
                kv.update(cache[1 + 2 * layer], cache[2 + 2 * layer], layer)
            policy.model.denoise_step(cache[0], kv, x_t, timestep)

        with torch.no_grad():
            result["prefix_s"] = time_calls(lambda: prefix(*inputs), 2)["median_s"]
            result["denoise_step_s"] = time_calls(step, 2)["median_s"]
    elif kind == "export":
        result |= export_graphs(policy, signature, folder)
        result["bytes"] = sum(p.stat().st_size for p in folder.iterdir())
    else:
        import onnxruntime as ort  # type: ignore[import-untyped]

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        start = time.perf_counter()
        providers = [provider]
        prefix_session = ort.InferenceSession(
            str(folder / PREFIX_FILE), options, providers=providers
        )
        step_session = ort.InferenceSession(
            str(folder / DENOISE_FILE), options, providers=providers
        )
        result["session_load_s"] = time.perf_counter() - start
        feeds = {n: t.numpy() for n, t in zip(input_names(signature), inputs, strict=True)}
        outputs = prefix_session.run(None, feeds)
        result["prefix_s"] = time_calls(lambda: prefix_session.run(None, feeds), repeats)[
            "median_s"
        ]
        names = [o.name for o in prefix_session.get_outputs()]
        params = dict(policy.named_parameters())
        step_feeds = {
            **dict(zip(names, outputs, strict=True)),
            **{f"weight:{n}": params[n].detach().numpy() for n in expert_weight_names(policy)},
            "x_t": x_t.numpy(),
            "timestep": timestep.numpy(),
        }
        result["denoise_step_s"] = time_calls(
            lambda: step_session.run(["v_t"], step_feeds), repeats
        )["median_s"]
        reference = np.asarray(outputs[1])
        result["prefix_max_abs_diff"] = float(np.abs(reference - cache[1].numpy()).max())
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return result


def arch_figures(timeout_s: float) -> dict[str, Any]:
    """Each full-size measurement in a child process, so its peak memory is its own."""
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="zk0-arch-onnx-") as tmp:
        for kind in ("torch", "export", "onnx"):
            out = Path(tmp) / f"{kind}.json"
            argv = [sys.executable, "-m", "zk0.bench._arch", kind, tmp, str(out)]
            try:
                run = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                figures[kind] = {"error": f"timed out after {timeout_s:.0f} s"}
                continue
            if run.returncode != 0 or not out.exists():
                tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
                figures[kind] = {"error": f"exit {run.returncode}: {tail}"}
                continue
            figures[kind] = json.loads(out.read_text())
    return figures


if __name__ == "__main__":
    kind, folder, out = sys.argv[1:4]
    torch.set_num_threads(1)
    Path(out).write_text(json.dumps(arch_probe(kind, Path(folder))))

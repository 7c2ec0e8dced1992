"""Full-size SmolVLA (``smolvla-arch``, random weights) in torch and ONNX Runtime, for
``zk0 bench inference``: a whole action chunk (VLM prefix, then the denoising steps) through the
product's backends, its ONNX export (float32 and int8), each probe in a child process (``python
-m zk0.bench._arch KIND DIR OUT``) so its peak memory is its own. The torch probe runs first and
leaves its chunk in DIR; the ONNX probes report their largest difference from it (normalized
action units: the random-weight base has no dataset statistics)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zk0.bench._common import time_calls

ARCH = "smolvla-arch"
KINDS = ("torch", "export", "onnx", "onnx_int8")
REFERENCE = "torch_chunk.npy"
#: Denoising steps whose chunk latency is measured besides the policy's own 10.
FEWER_STEPS = (5, 2)


def arch_probe(
    kind: str,
    folder: Path,
    spec: str = ARCH,
    provider: str = "CPUExecutionProvider",
    repeats: int = 5,
) -> dict[str, Any]:
    """One full-size measurement in this process: ``torch``, ``export``, ``onnx`` or
    ``onnx_int8`` (on ONNX Runtime's ``provider``)."""
    from zk0.agent.inference.backends import (
        InferencePolicy,
        OnnxBackend,
        Precision,
        TorchBackend,
    )
    from zk0.agent.inference.onnx_export import OnnxExport
    from zk0.agent.inference.onnx_graphs import GRAPH_FILES, signature_of
    from zk0.agent.inference.swap import AdapterSlot
    from zk0.shared.config import load_robot_config
    from zk0.shared.features import PolicyFeatures
    from zk0.shared.policy_factory import build_policy
    from zk0.shared.sim_variants import SIM_ROBOT

    config = load_robot_config(SIM_ROBOT)
    loaded = build_policy(spec, PolicyFeatures.from_robot_config(config), device="cpu")
    runtime = AdapterSlot(loaded).active
    inference = InferencePolicy(loaded.policy, copy_policy=False)
    generator = torch.Generator().manual_seed(0)
    frame: dict[str, Any] = {
        key: torch.rand(feature.shape, generator=generator)
        for key, feature in loaded.policy.config.input_features.items()
    }
    frame["task"] = config.task
    batch = runtime.preprocessor(frame)
    export = OnnxExport(loaded.base, loaded.features, signature_of(inference.policy, batch),
                        root=folder)  # fmt: skip
    policy_config = inference.config
    noise = torch.randn(1, policy_config.chunk_size, policy_config.max_action_dim,
                        generator=generator)  # fmt: skip
    result: dict[str, Any] = {"params": sum(p.numel() for p in loaded.policy.parameters())}
    if kind == "export":
        export.export_now(inference.policy)
        result |= export.seconds
        for name, files in GRAPH_FILES.items():
            result[f"bytes_{name}"] = sum(
                p.stat().st_size for p in export.folder.iterdir() if p.name.startswith(files)
            )
    else:
        if kind == "torch":
            backend: Any = TorchBackend(inference)
        else:
            precision: Precision = "int8" if kind == "onnx_int8" else "fp32"
            backend = OnnxBackend(export.folder, export.signature, inference, 1, precision,
                                  provider)  # fmt: skip

        def chunk() -> Any:
            return backend.predict(runtime, dict(batch), noise)

        actions = np.asarray(chunk())
        timed = time_calls(chunk, repeats, warmup=0)
        result |= {"chunk_s_p50": timed["median_s"], "chunk_s_p95": timed["p95_s"],
                   "timings": timed, "repeats": repeats}  # fmt: skip
        if kind == "torch":
            np.save(folder / REFERENCE, actions)
        elif (folder / REFERENCE).is_file():
            result["max_abs_diff_vs_torch"] = float(
                np.abs(actions - np.load(folder / REFERENCE)).max()
            )
        steps = {int(policy_config.num_steps): timed["median_s"]}
        for count in FEWER_STEPS:
            policy_config.num_steps = count
            steps[count] = time_calls(chunk, 2, warmup=0)["median_s"]
        result["chunk_s_by_denoising_steps"] = steps
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return result


def arch_figures(timeout_s: float) -> dict[str, Any]:
    """Each full-size measurement in a child process, so its peak memory is its own."""
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="zk0-arch-onnx-") as tmp:
        for kind in KINDS:
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

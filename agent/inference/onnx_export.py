"""ONNX export of SmolVLA's chunk computation, once per base policy, cached by what made it.

The chunk is two graphs (``zk0.agent.inference.onnx_graphs``: the VLM prefix, and one denoise
step of the action expert taking the adapter's merged weights as inputs). Exporting takes from
seconds (tiny) to minutes (full size), so graphs are cached under
``$ZK0_CACHE/onnx/<spec>-<key>/``, the key being a hash of the base id, the input shapes, the
weight names and the torch/onnx versions; ``OnnxExport.start_background`` exports in a child
process (``python -m zk0.agent.inference.onnx_export``) while the engine serves with torch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loguru import logger

from zk0.agent.inference.onnx_graphs import (
    META_FILE,
    GraphSignature,
    export_graphs,
    export_key,
)
from zk0.shared.features import PolicyFeatures
from zk0.shared.fsutil import file_lock, publish_dir, staging_dir_for
from zk0.shared.policy_factory import BaseRef, cache_root


class OnnxExport:
    """The cached ONNX graphs of one base policy for one input signature."""

    def __init__(
        self,
        base: BaseRef,
        features: PolicyFeatures,
        signature: GraphSignature,
        root: Path | None = None,
    ) -> None:
        self.base, self.features, self.signature = base, features, signature
        name = Path(base.spec).name if Path(base.spec).exists() else base.spec.replace("/", "--")
        self.folder = (root or cache_root() / "onnx") / f"{name}-{export_key(base, signature)[:16]}"
        self.status = "ready" if self.ready() else "missing"
        self.error: str | None = None
        self.seconds: dict[str, float] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None

    def ready(self) -> bool:
        return (self.folder / META_FILE).is_file()

    @property
    def log_path(self) -> Path:
        return self.folder.with_name(self.folder.name + ".export.log")

    def export_now(self, policy: Any) -> Path:
        """Export in this process (once: later calls, here or elsewhere, find the cache)."""
        with file_lock(self.folder.with_name(self.folder.name + ".lock")):
            if self.ready():
                return self.folder
            logger.info("exporting ONNX graphs of {} into {}", self.base.spec, self.folder)
            staging = staging_dir_for(self.folder)
            try:
                start = time.perf_counter()
                self.seconds = export_graphs(policy, self.signature, staging)
                self.seconds["total_s"] = time.perf_counter() - start
                meta = {
                    "base": asdict(self.base),
                    "signature": self.signature.as_dict(),
                    "seconds": self.seconds,
                    "key": export_key(self.base, self.signature),
                }
                (staging / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
                publish_dir(staging, self.folder)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        self.status = "ready"
        logger.info("ONNX export of {} took {:.1f} s", self.base.spec, self.seconds["total_s"])
        return self.folder

    def start_background(self, on_ready: Callable[[Path], None] | None = None) -> None:
        """Export in a child process unless cached; ``on_ready(folder)`` runs in a watcher thread.

        The child rebuilds the base from its spec; dynamo tracing holds the GIL for long
        stretches, which a thread beside the control loop must not do.
        """
        if self.ready():
            self.status = "ready"
            if on_ready is not None:
                on_ready(self.folder)
            return
        if self._thread is not None:
            return
        from zk0.shared.processes import ManagedProcess

        argv = [
            sys.executable,
            "-m",
            "zk0.agent.inference.onnx_export",
            "--spec",
            self.base.spec,
            "--base-id",
            self.base.base_id,
            "--features",
            json.dumps(self.features.as_dict()),
            "--signature",
            json.dumps(self.signature.as_dict()),
            "--out",
            str(self.folder),
        ]
        process = ManagedProcess("onnx-export", argv, dict(os.environ), self.log_path)
        self.status = "exporting"
        started = time.perf_counter()
        self._process = process.start()

        def watch() -> None:
            assert self._process is not None
            code = self._process.wait()
            if code == 0 and self.ready():
                self.status = "ready"
                self.seconds = {"background_s": time.perf_counter() - started}
                logger.info(
                    "ONNX graphs of {} ready ({:.0f} s)",
                    self.base.spec,
                    self.seconds["background_s"],
                )
                if on_ready is not None:
                    on_ready(self.folder)
            else:
                self.status = "failed"
                self.error = f"export exited with {code}; see {self.log_path}"
                logger.error("ONNX export of {} failed: {}", self.base.spec, self.error)

        self._thread = threading.Thread(target=watch, name="onnx-export-watch", daemon=True)
        self._thread.start()

    def wait(self, timeout_s: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout_s)
        return self.ready()

    def cancel(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(30)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export SmolVLA's chunk graphs to ONNX (cache).")
    parser.add_argument("--spec", required=True)
    parser.add_argument("--base-id", required=True)
    parser.add_argument("--features", required=True, help="PolicyFeatures as JSON")
    parser.add_argument("--signature", required=True, help="GraphSignature as JSON")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    # Stopped with SIGTERM (the engine closing): unwind, so the staging folder is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    import torch

    from zk0.shared.policy_factory import build_policy

    torch.set_num_threads(1)
    signature = GraphSignature.from_dict(json.loads(args.signature))
    raw = json.loads(args.features)
    features = PolicyFeatures(
        state_dim=int(raw["state_dim"]),
        action_dim=int(raw["action_dim"]),
        images={key: (int(c), int(h), int(w)) for key, (c, h, w) in raw["images"].items()},
    )
    loaded = build_policy(args.spec, features, device="cpu")
    if loaded.base.base_id != args.base_id:
        logger.error("{} resolves to {}, not {}", args.spec, loaded.base.base_id, args.base_id)
        return 2
    export = OnnxExport(loaded.base, features, signature, root=args.out.parent)
    if export.folder != args.out:
        logger.error("export folder {} differs from the requested {}", export.folder, args.out)
        return 2
    export.export_now(loaded.policy)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())

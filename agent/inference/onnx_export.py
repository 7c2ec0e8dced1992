"""ONNX export of SmolVLA's chunk computation, once per base policy, cached by what made it.

The chunk is two graphs, exported with ``torch.onnx.export(dynamo=True)`` (the legacy exporter
fails on SmolVLA):

* ``prefix.onnx``: prepared images, language tokens and state -> the VLM's key/value cache
  (the expensive part, run once per chunk; no adapter weight is in it);
* ``denoise.onnx``: one flow-matching step of the action expert, ``(x_t, t, cache) -> v_t``,
  with the expert's attention projection weights as *inputs*. The backend runs it
  ``num_steps`` times (Euler, as LeRobot does), feeding the weights of whichever adapter
  version is active: a new version needs no new export.

Exporting takes from seconds (tiny) to minutes (full size), so graphs are cached under
``$ZK0_CACHE/onnx/<spec>-<key>/``, the key being a hash of the base id, the input shapes, the
weight names and the torch/onnx versions; ``OnnxExport.start_background`` exports in a child
process (``python -m zk0.agent.inference.onnx_export``) while the engine serves with torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from zk0.shared.features import PolicyFeatures
from zk0.shared.fsutil import file_lock, publish_dir, staging_dir_for
from zk0.shared.policy_factory import BaseRef, cache_root

EXPORT_FORMAT = 1
OPSET = 18
PREFIX_FILE = "prefix.onnx"
DENOISE_FILE = "denoise.onnx"
META_FILE = "export.json"
#: Input names of the denoise graph for the expert weights: this prefix + the parameter name.
WEIGHT_INPUT = "weight:"


@dataclass(frozen=True)
class GraphSignature:
    """The shapes the graphs are exported for (static: one task's token count, one camera set)."""

    images: tuple[tuple[int, ...], ...]  # prepared images, (1, 3, H, W) each
    lang_len: int
    state_dim: int  # padded to the policy's max_state_dim
    chunk_size: int
    action_dim: int  # padded to the policy's max_action_dim
    num_steps: int
    weights: tuple[tuple[str, tuple[int, ...]], ...]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GraphSignature:
        return cls(
            images=tuple(tuple(int(v) for v in shape) for shape in raw["images"]),
            lang_len=int(raw["lang_len"]),
            state_dim=int(raw["state_dim"]),
            chunk_size=int(raw["chunk_size"]),
            action_dim=int(raw["action_dim"]),
            num_steps=int(raw["num_steps"]),
            weights=tuple((str(n), tuple(int(v) for v in s)) for n, s in raw["weights"]),
        )

    @property
    def weight_names(self) -> list[str]:
        return [name for name, _ in self.weights]


def prepare_inputs(policy: Any, batch: dict[str, Any]) -> list[Any]:
    """The prefix graph's inputs from a preprocessed batch: images, masks, tokens, state."""
    from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS

    images, masks = policy.prepare_images(batch)
    state = policy.prepare_state(batch)
    return [
        *images,
        *masks,
        batch[OBS_LANGUAGE_TOKENS],
        batch[OBS_LANGUAGE_ATTENTION_MASK],
        state,
    ]


def signature_of(policy: Any, batch: dict[str, Any]) -> GraphSignature:
    from zk0.agent.inference.swap import expert_weight_names

    inputs = prepare_inputs(policy, batch)
    count = (len(inputs) - 3) // 2
    params = dict(policy.named_parameters())
    config = policy.config
    return GraphSignature(
        images=tuple(tuple(int(v) for v in t.shape) for t in inputs[:count]),
        lang_len=int(inputs[2 * count].shape[1]),
        state_dim=int(inputs[-1].shape[1]),
        chunk_size=int(config.chunk_size),
        action_dim=int(config.max_action_dim),
        num_steps=int(config.num_steps),
        weights=tuple(
            (name, tuple(int(v) for v in params[name].shape))
            for name in expert_weight_names(policy)
        ),
    )


def input_names(signature: GraphSignature) -> list[str]:
    count = len(signature.images)
    return [
        *(f"image_{i}" for i in range(count)),
        *(f"image_mask_{i}" for i in range(count)),
        "lang_tokens",
        "lang_masks",
        "state",
    ]


def example_inputs(signature: GraphSignature) -> list[Any]:
    """Inputs of the right shapes and types for tracing (values do not shape the graph)."""
    import torch

    images = [torch.zeros(shape) for shape in signature.images]
    masks = [torch.ones(1, dtype=torch.bool) for _ in signature.images]
    tokens = torch.arange(1, signature.lang_len + 1, dtype=torch.long)[None]
    lang_masks = torch.ones(1, signature.lang_len, dtype=torch.bool)
    return [*images, *masks, tokens, lang_masks, torch.zeros(1, signature.state_dim)]


def _modules() -> tuple[type[Any], type[Any]]:
    """The two export wrappers (defined lazily: torch is imported on first use only)."""
    import torch
    from lerobot.policies.smolvla.modeling_smolvla import make_att_2d_masks
    from torch.nn.utils.stateless import _reparametrize_module
    from transformers import DynamicCache

    class Prefix(torch.nn.Module):
        def __init__(self, model: Any, image_count: int) -> None:
            super().__init__()
            self.model, self.image_count = model, image_count

        def forward(self, *args: Any) -> tuple[Any, ...]:
            n = self.image_count
            images, masks = list(args[:n]), list(args[n : 2 * n])
            tokens, lang_masks, state = args[2 * n :]
            embs, pad_masks, att_masks = self.model.embed_prefix(
                images, masks, tokens, lang_masks, state=state
            )
            _, cache = self.model.vlm_with_expert.forward(
                attention_mask=make_att_2d_masks(pad_masks, att_masks),
                position_ids=torch.cumsum(pad_masks, dim=1) - 1,
                past_key_values=None,
                inputs_embeds=[embs, None],
                use_cache=True,
            )
            kv: list[Any] = []
            for layer in cache.layers:
                kv += [layer.keys, layer.values]
            return (pad_masks, *kv)

    class DenoiseStep(torch.nn.Module):
        def __init__(self, model: Any, kv_count: int, weight_names: list[str]) -> None:
            super().__init__()
            self.model, self.kv_count, self.weight_names = model, kv_count, weight_names

        def forward(self, x_t: Any, timestep: Any, pad_masks: Any, *rest: Any) -> Any:
            kv, weights = rest[: self.kv_count], rest[self.kv_count :]
            cache = DynamicCache()
            for layer in range(self.kv_count // 2):
                cache.update(kv[2 * layer], kv[2 * layer + 1], layer)
            # LeRobot's policy prefixes its parameters with "model."; this module holds .model
            params = {
                name.removeprefix("model."): weight
                for name, weight in zip(self.weight_names, weights, strict=True)
            }
            with _reparametrize_module(self.model, params):
                return self.model.denoise_step(pad_masks, cache, x_t, timestep)

    return Prefix, DenoiseStep


def export_graphs(policy: Any, signature: GraphSignature, out_dir: Path) -> dict[str, float]:
    """Write ``prefix.onnx`` and ``denoise.onnx`` for ``policy`` into ``out_dir``; seconds each."""
    import torch

    prefix_cls, step_cls = _modules()
    model = policy.model.eval()
    inputs = example_inputs(signature)
    seconds: dict[str, float] = {}
    prefix = prefix_cls(model, len(signature.images)).eval()
    with torch.no_grad():
        prefix_out = prefix(*inputs)
    kv_count = len(prefix_out) - 1
    kv_names = [f"{kind}_{i}" for i in range(kv_count // 2) for kind in ("key", "value")]
    start = time.perf_counter()
    torch.onnx.export(
        prefix,
        tuple(inputs),
        str(out_dir / PREFIX_FILE),
        dynamo=True,
        opset_version=OPSET,
        input_names=input_names(signature),
        output_names=["prefix_pad_masks", *kv_names],
        verbose=False,
    )
    seconds["prefix_s"] = time.perf_counter() - start
    params = dict(policy.named_parameters())
    weights = [params[name].detach() for name in signature.weight_names]
    step = step_cls(model, kv_count, signature.weight_names).eval()
    x_t = torch.zeros(1, signature.chunk_size, signature.action_dim)
    timestep = torch.ones(1)
    start = time.perf_counter()
    torch.onnx.export(
        step,
        (x_t, timestep, prefix_out[0], *prefix_out[1:], *weights),
        str(out_dir / DENOISE_FILE),
        dynamo=True,
        opset_version=OPSET,
        input_names=[
            "x_t",
            "timestep",
            "prefix_pad_masks",
            *kv_names,
            *(WEIGHT_INPUT + name for name in signature.weight_names),
        ],
        output_names=["v_t"],
        verbose=False,
    )
    seconds["denoise_s"] = time.perf_counter() - start
    return seconds


def export_key(base: BaseRef, signature: GraphSignature) -> str:
    import onnx
    import torch

    payload = {
        "format": EXPORT_FORMAT,
        "opset": OPSET,
        "base": base.base_id,
        "signature": signature.as_dict(),
        "torch": torch.__version__.split("+")[0],
        "onnx": onnx.__version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


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

"""Chunk predictors: torch and ONNX Runtime, one interface.

``backend.predict(runtime, batch, noise)`` takes a preprocessed batch and the flow-matching
noise and returns the normalized action chunk ``(1, chunk_size, action_dim)``, as LeRobot's
``predict_action_chunk`` does, computed with the runtime's (merged) expert weights: torch sets
them on its one inference copy of the policy when the version changes, ONNX Runtime feeds them
to the denoise graph. ``predict_chunk`` wraps it with the runtime's pre- and postprocessor: raw
frame in, actions in robot units out.

``BackendSelector`` is what the engine asks for a backend on every chunk: with ``onnx`` or
``onnx_int8`` requested it answers torch until the exported graphs are loaded (exporting in the
background on first use), then ONNX Runtime.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from loguru import logger
from numpy.typing import NDArray

from zk0.agent.inference.onnx_export import OnnxExport
from zk0.agent.inference.onnx_graphs import (
    GRAPH_FILES,
    WEIGHT_INPUT,
    GraphSignature,
    input_names,
    prepare_inputs,
)
from zk0.agent.inference.swap import PolicyRuntime, expert_weight_names

#: onnx: ONNX Runtime, float32 graphs; onnx_int8: its int8-weight graphs (less than half the
#: size; faster where the CPU has int8 dot products, VNNI: 6 % on this AVX2-only one).
BackendName = Literal["torch", "onnx", "onnx_int8"]
Precision = Literal["fp32", "int8"]


class ChunkBackend(Protocol):
    name: str

    def predict(self, runtime: PolicyRuntime, batch: dict[str, Any], noise: Any) -> Any:
        """Normalized actions ``(1, chunk_size, action_dim)`` for a preprocessed batch."""


class InferencePolicy:
    """The policy object inference runs: the base policy (a copy, or the object itself with
    ``copy=False``) whose expert attention weights are those of the runtime last applied.
    Applying rebinds parameters and never writes into tensors, so weights taken from the base
    beforehand (``AdapterSlot``'s) stay the base's. Use it from one thread at a time."""

    def __init__(
        self, base_policy: Any, copy_policy: bool = True, denoising_steps: int | None = None
    ) -> None:
        """``denoising_steps``: flow-matching steps per chunk (None: the policy's ``num_steps``,
        10 for SmolVLA); set on this policy's config, which torch and ONNX Runtime both read."""
        self.policy = (copy.deepcopy(base_policy) if copy_policy else base_policy).eval()
        self.config = self.policy.config
        if denoising_steps is not None:
            self.config.num_steps = denoising_steps
        modules = dict(self.policy.named_modules())
        self._slots = {
            name: modules[name.rsplit(".", 1)[0]] for name in expert_weight_names(self.policy)
        }
        self._applied: PolicyRuntime | None = None

    def apply(self, runtime: PolicyRuntime) -> Any:
        """Run ``runtime``'s weights from now on (a few attribute swaps; nothing is copied)."""
        if runtime is not self._applied:
            import torch

            if set(runtime.weights) != set(self._slots):
                raise ValueError("the runtime's weights do not fit this policy")
            for name, weight in runtime.weights.items():
                self._slots[name].weight = torch.nn.Parameter(weight, requires_grad=False)
            self._applied = runtime
        return self.policy


class TorchBackend:
    name = "torch"

    def __init__(self, policy: InferencePolicy) -> None:
        self.policy = policy

    def predict(self, runtime: PolicyRuntime, batch: dict[str, Any], noise: Any) -> Any:
        import torch

        policy = self.policy.apply(runtime)
        with torch.inference_mode():
            return policy.predict_action_chunk(batch, noise=noise)


class SignatureMismatchError(ValueError):
    """The batch's shapes are not those the graphs were exported for (e.g. another task)."""


class OnnxBackend:
    """Runs the exported prefix graph once and the denoise graph ``num_steps`` times."""

    def __init__(
        self,
        folder: Path,
        signature: GraphSignature,
        policy: InferencePolicy,
        threads: int = 1,
        precision: Precision = "fp32",
        provider: str = "CPUExecutionProvider",
    ) -> None:
        import onnxruntime as ort  # type: ignore[import-untyped]

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = [provider]
        self.folder, self.signature, self.policy = folder, signature, policy
        self.name = "onnxruntime" if precision == "fp32" else "onnxruntime-int8"
        prefix_file, denoise_file = GRAPH_FILES[precision]
        self.prefix = ort.InferenceSession(str(folder / prefix_file), options, providers=providers)
        self.denoise = ort.InferenceSession(
            str(folder / denoise_file), options, providers=providers
        )
        self._prefix_inputs = input_names(signature)
        self._cache_names = [o.name for o in self.prefix.get_outputs()]
        expected = {WEIGHT_INPUT + name for name in signature.weight_names}
        graph_weights = {
            i.name for i in self.denoise.get_inputs() if i.name.startswith(WEIGHT_INPUT)
        }
        if graph_weights != expected:
            raise ValueError(f"{folder}: denoise graph's weight inputs differ from the policy's")

    def predict(self, runtime: PolicyRuntime, batch: dict[str, Any], noise: Any) -> Any:
        import torch

        with torch.inference_mode():  # image resizing and padding: no weights involved
            inputs = prepare_inputs(self.policy.policy, batch)
        arrays = [t.detach().cpu().numpy() for t in inputs]
        shapes = tuple(tuple(a.shape) for a in arrays[: len(self.signature.images)])
        lang_len = arrays[2 * len(self.signature.images)].shape[1]
        if shapes != self.signature.images or lang_len != self.signature.lang_len:
            raise SignatureMismatchError(
                f"inputs {shapes}, {lang_len} tokens; graphs take {self.signature.images}, "
                f"{self.signature.lang_len} tokens"
            )
        cache = self.prefix.run(None, dict(zip(self._prefix_inputs, arrays, strict=True)))
        feeds: dict[str, NDArray[Any]] = dict(zip(self._cache_names, cache, strict=True))
        for name, weight in runtime.arrays.items():
            feeds[WEIGHT_INPUT + name] = weight
        steps = int(self.policy.config.num_steps)
        dt = -1.0 / steps
        x_t = noise.detach().cpu().numpy().astype(np.float32)
        for step in range(steps):
            feeds["x_t"] = x_t
            feeds["timestep"] = np.array([1.0 + step * dt], dtype=np.float32)
            (v_t,) = self.denoise.run(["v_t"], feeds)
            x_t = x_t + dt * v_t
        action_dim = self.policy.config.action_feature.shape[0]
        return torch.from_numpy(np.ascontiguousarray(x_t[:, :, :action_dim]))


def predict_chunk(
    runtime: PolicyRuntime, backend: ChunkBackend, frame: dict[str, Any], noise: Any
) -> NDArray[np.float64]:
    """Raw frame -> ``(chunk_size, action_dim)`` actions in robot units (degrees, 0..100)."""
    batch = runtime.preprocessor(dict(frame))
    normalized = backend.predict(runtime, batch, noise)
    actions = runtime.postprocessor(normalized)
    return np.asarray(actions.detach().cpu().numpy()[0], dtype=np.float64)


class BackendSelector:
    """Torch now; ONNX Runtime once its graphs are exported and loaded (if asked for).

    ``predict`` is serialized (the policy worker, and ``engine.predict`` between episodes)."""

    def __init__(
        self,
        requested: BackendName,
        policy: InferencePolicy,
        export: OnnxExport | None = None,
        threads: int = 1,
    ) -> None:
        if requested != "torch" and export is None:
            raise ValueError(f"the {requested} backend needs an OnnxExport")
        self.requested = requested
        self.policy = policy
        self.export = export
        self.threads = threads
        self.torch = TorchBackend(policy)
        self._onnx: OnnxBackend | None = None
        self._lock = threading.Lock()
        self._mismatch_logged = False

    def start(self, wait: bool = False) -> BackendSelector:
        """Begin the export in the background (or, with ``wait``, export here and load now)."""
        if self.requested == "torch":
            return self
        assert self.export is not None
        if wait:
            if not self.export.ready():
                with self._lock:
                    self.export.export_now(self.policy.policy)
            self._load(self.export.folder)
        else:
            self.export.start_background(self._load)
        return self

    def _load(self, folder: Path) -> None:
        assert self.export is not None
        try:
            precision: Precision = "int8" if self.requested == "onnx_int8" else "fp32"
            backend = OnnxBackend(
                folder, self.export.signature, self.policy, self.threads, precision
            )
        except Exception as error:
            logger.error("cannot load the ONNX graphs in {}: {}; staying on torch", folder, error)
            return
        self._onnx = backend
        logger.info("ONNX Runtime backend ready: chunks from now on run in {}", backend.name)

    @property
    def onnx_ready(self) -> bool:
        return self._onnx is not None

    def current(self) -> ChunkBackend:
        onnx = self._onnx
        return onnx if onnx is not None else self.torch

    def predict(
        self, runtime: PolicyRuntime, frame: dict[str, Any], noise: Any
    ) -> tuple[NDArray[np.float64], str]:
        """Actions for ``frame`` and the name of the backend that computed them."""
        backend = self.current()
        with self._lock:
            try:
                return predict_chunk(runtime, backend, frame, noise), backend.name
            except SignatureMismatchError as error:
                if not self._mismatch_logged:
                    logger.warning("ONNX graphs do not fit this input ({}); using torch", error)
                    self._mismatch_logged = True
                return predict_chunk(runtime, self.torch, frame, noise), self.torch.name

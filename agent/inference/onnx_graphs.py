"""SmolVLA's chunk computation as two ONNX graphs: what is exported, for which shapes, how.

* ``prefix.onnx``: prepared images, language tokens and state -> the VLM's key/value cache
  (the expensive part, run once per chunk; no adapter weight is in it);
* ``denoise.onnx``: one flow-matching step of the action expert, ``(x_t, t, cache) -> v_t``,
  with the expert's attention projection weights as *inputs*. The backend runs it
  ``num_steps`` times (Euler, as LeRobot does; ``EngineConfig.denoising_steps``), feeding the
  weights of whichever adapter version is active: a new version needs no new export.

Each graph is also written with int8 weights (``*.int8.onnx``: ONNX Runtime's dynamic
quantization of every MatMul/Gemm weight stored in the graph, activations quantized on the
fly). The adapter's weights are inputs, not stored weights, so they stay float32 and a hot swap
still needs no new export.

Both are exported with ``torch.onnx.export(dynamo=True)`` (the legacy exporter fails on
SmolVLA). ``zk0.agent.inference.onnx_export`` caches them per base and signature.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from zk0.shared.policy_factory import BaseRef

EXPORT_FORMAT = 2  # 2: int8 graphs beside the float32 ones; the step count is not exported
OPSET = 18
PREFIX_FILE = "prefix.onnx"
DENOISE_FILE = "denoise.onnx"
#: The graph files of each precision: (prefix, denoise step).
GRAPH_FILES = {
    "fp32": (PREFIX_FILE, DENOISE_FILE),
    "int8": ("prefix.int8.onnx", "denoise.int8.onnx"),
}
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
    start = time.perf_counter()
    quantize_graphs(out_dir)
    seconds["int8_s"] = time.perf_counter() - start
    return seconds


def quantize_graphs(folder: Path) -> None:
    """Write the int8 graphs from the float32 ones in ``folder`` (see the module docstring)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic  # type: ignore[import-untyped]

    for fp32, int8 in zip(GRAPH_FILES["fp32"], GRAPH_FILES["int8"], strict=True):
        quantize_dynamic(folder / fp32, folder / int8, weight_type=QuantType.QInt8)


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

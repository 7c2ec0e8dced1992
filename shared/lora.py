"""LoRA on SmolVLA's action expert, and only there.

The expert's attention projections (``lm_expert.layers.<i>.self_attn.{q,k,v,o}_proj``) carry the
adaptation; the vision encoder and the language model stay frozen and untouched, so an adapter
is megabytes and every arm can share the same frozen base.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch

EXPERT_LAYERS = r"model\.vlm_with_expert\.lm_expert\.layers\.\d+\.self_attn"
Projection = Literal["q_proj", "k_proj", "v_proj", "o_proj"]
ADAPTER_NAME = "default"
#: The personalized mode's local part: a second LoRA adapter on the same projections, trained with
#: the shared one but never sent (``zk0.agent.personal``). PEFT keys its tensors by this name.
PERSONAL_ADAPTER = "personal"


class LoraSpec(BaseModel):
    """Rank, scale, dropout and which expert projections get adapters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(default=16, gt=0, le=512, description="LoRA rank r.")
    alpha: float = Field(default=32.0, gt=0, description="LoRA alpha (scale alpha / r).")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0, description="LoRA dropout.")
    targets: tuple[Projection, ...] = Field(
        default=("q_proj", "k_proj", "v_proj", "o_proj"),
        min_length=1,
        description="Expert attention projections that get adapters.",
    )

    @property
    def target_regex(self) -> str:
        return rf"{EXPERT_LAYERS}\.({'|'.join(sorted(set(self.targets)))})"

    def peft_config(self, base_model_name_or_path: str | None = None) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_regex,
            bias="none",
            base_model_name_or_path=base_model_name_or_path,
        )


@dataclass(frozen=True)
class LoraSummary:
    total_params: int
    trainable_params: int
    lora_params: int
    wrapped_modules: tuple[str, ...]
    adapter_bytes_fp32: int
    adapter_bytes_bf16: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "lora_params": self.lora_params,
            "trainable_outside_lora": self.trainable_params - self.lora_params,
            "wrapped_modules": list(self.wrapped_modules),
            "adapter_bytes_fp32": self.adapter_bytes_fp32,
            "adapter_bytes_bf16": self.adapter_bytes_bf16,
        }


def apply_lora(policy: Any, spec: LoraSpec, base_model_name_or_path: str | None = None) -> Any:
    """Wrap ``policy`` (in place) with LoRA adapters; only adapter weights stay trainable."""
    from peft import get_peft_model

    for parameter in policy.parameters():
        parameter.requires_grad_(False)
    if base_model_name_or_path:
        policy.name_or_path = base_model_name_or_path  # PEFT records the base from this attribute
    name = getattr(policy, "name_or_path", None)
    return get_peft_model(policy, spec.peft_config(name))


def is_lora_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def summarize(peft_model: Any) -> LoraSummary:
    from peft.tuners.lora import LoraLayer

    total = trainable = lora = 0
    for name, parameter in peft_model.named_parameters():
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
        lora += parameter.numel() if is_lora_parameter(name) else 0
    prefix = "base_model.model."
    wrapped = tuple(
        name.removeprefix(prefix)
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    )
    return LoraSummary(total, trainable, lora, wrapped, lora * 4, lora * 2)


def adapter_state(peft_model: Any) -> dict[str, torch.Tensor]:
    """The adapter tensors exactly as PEFT saves them (``lora_A``/``lora_B``, no adapter name)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach() for k, v in get_peft_model_state_dict(peft_model).items()}


def load_adapter_state(peft_model: Any, state: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors into ``peft_model``; refuses missing or unexpected keys."""
    from peft import set_peft_model_state_dict

    expected = set(adapter_state(peft_model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(
            f"adapter tensors do not fit the model: missing {missing[:3]}, extra {extra[:3]}"
        )
    result = set_peft_model_state_dict(peft_model, state)
    if result.unexpected_keys:
        raise ValueError(f"adapter tensors not used by the model: {result.unexpected_keys[:3]}")


def add_personal_adapter(peft_model: Any, spec: LoraSpec) -> None:
    """Add the local part beside the shared adapter and make both active and trainable.

    PEFT starts its ``lora_B`` at zero, so a fresh local part changes nothing until it trains.
    Both adapters then add their ``(alpha / r) B A x`` in every forward pass; the shared one keeps
    PEFT's default name, so ``adapter_state`` still returns exactly its tensors.
    """
    peft_model.add_adapter(PERSONAL_ADAPTER, spec.peft_config())
    # LoraModel's set_adapter takes several names (PeftModel's only one) and marks them trainable.
    peft_model.base_model.set_adapter([ADAPTER_NAME, PERSONAL_ADAPTER])


def personal_state(peft_model: Any) -> dict[str, torch.Tensor]:
    """The local part's tensors, under the same names as ``adapter_state`` gives the shared."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, adapter_name=PERSONAL_ADAPTER)
    return {k: v.detach() for k, v in state.items()}


def load_personal_state(peft_model: Any, state: dict[str, torch.Tensor]) -> None:
    """Load the local part's tensors; refuses missing, unexpected or misshapen ones."""
    from peft import set_peft_model_state_dict

    expected = personal_state(peft_model)
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(
            f"local adapter tensors do not fit the model: missing {missing[:3]}, extra {extra[:3]}"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            shapes = f"{tuple(tensor.shape)}, the model has {tuple(expected[name].shape)}"
            raise ValueError(f"local adapter tensor {name}: {shapes}")
    set_peft_model_state_dict(peft_model, state, adapter_name=PERSONAL_ADAPTER)


def merged_copy(base_policy: Any, spec: LoraSpec, state: dict[str, torch.Tensor]) -> Any:
    """A plain policy with the adapter merged into a copy of the base weights (for inference).

    The base is left untouched, so swapping to another adapter is another call on the same base.
    """
    peft_model = apply_lora(copy.deepcopy(base_policy), spec)
    load_adapter_state(peft_model, state)
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged

"""One factory for every SmolVLA policy zk0 runs, from a policy spec.

A spec is one of:

* ``tiny``: a tiny SmolVLA on a generated SmolVLM backbone (tests, demos, CPU);
* ``tiny-sim-base``: the tiny SmolVLA pretrained on the simulated base task (committed here,
  built by ``zk0 base build``);
* ``smolvla-arch``: the full-size architecture (SmolVLM2-500M dimensions), random weights,
  to measure real-size cost without the Hugging Face Hub;
* a local folder holding a SmolVLA checkpoint (``config.json`` + ``model.safetensors``);
* a Hugging Face repo id such as ``lerobot/smolvla_base`` (the users' default), optionally
  ``@revision``.

Generated bases are written once as ordinary LeRobot checkpoints under the zk0 cache, named
by the hash of their recipe, so that PEFT and LeRobot can load adapters built on them as they
are, and every process on a machine shares the same base.

torch is imported inside the functions that build models: the adapter store and the agent's
subscriber use ``BaseRef`` from here and must stay light.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from loguru import logger

from zk0.shared.backbone import SMOLVLM2_500M, TINY, BackboneRecipe, write_backbone
from zk0.shared.features import PolicyFeatures
from zk0.shared.fsutil import file_lock, publish_dir, sha256_file, staging_dir_for

CACHE_ENV = "ZK0_CACHE"
#: Bases shipped in the package (pretrained here, small): ``tiny-sim-base``.
#: The bases shipped as package data (``shared/bases/<name>/``).
COMMITTED_BASES = Path(str(files("zk0.shared") / "bases"))
#: A committed base's config names its generated backbone as ``zk0-backbone:<name>``, since
#: the backbone folder's path differs from machine to machine.
BACKBONE_SCHEME = "zk0-backbone:"
DEFAULT_POLICY = "lerobot/smolvla_base"
CHECKPOINT_FILES = ("config.json", "model.safetensors")


class PolicySpecError(ValueError):
    """A policy spec names nothing that can be loaded."""


@dataclass(frozen=True)
class GeneratedBase:
    """How a generated base is made: its backbone and the SmolVLA settings on top."""

    spec: str
    backbone: BackboneRecipe
    smolvla_overrides: dict[str, Any]
    seed: int = 0


GENERATED_BASES = {
    "tiny": GeneratedBase(
        spec="tiny",
        backbone=TINY,
        smolvla_overrides={"resize_imgs_with_padding": (64, 64), "num_vlm_layers": 4},
    ),
    "smolvla-arch": GeneratedBase(
        spec="smolvla-arch", backbone=SMOLVLM2_500M, smolvla_overrides={}
    ),
}


@dataclass(frozen=True)
class BaseRef:
    """Identity of a base policy: what the user named, what it resolved to, its content id."""

    spec: str
    #: What ``PeftConfig.base_model_name_or_path`` records: a repo id or a local checkpoint path.
    name_or_path: str
    #: ``repo@revision`` for Hub checkpoints, ``sha256:<hex>`` of config and weights otherwise.
    base_id: str


@dataclass
class LoadedPolicy:
    policy: Any  # lerobot SmolVLAPolicy
    preprocessor: Any
    postprocessor: Any
    base: BaseRef
    features: PolicyFeatures


def _stdout_to_stderr() -> contextlib.redirect_stdout[Any]:
    """LeRobot prints progress while building SmolVLA; keep stdout for our own output (JSON)."""
    return contextlib.redirect_stdout(sys.stderr)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "zk0")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def checkpoint_id(folder: Path) -> str:
    """Content id of a local checkpoint: sha256 over its weights and config.

    A generated backbone lives at a machine-specific path, so the config's ``vlm_model_name``
    counts by the content of that folder, not its path: the hub and every agent compute the
    same id for the same base.
    """
    config = json.loads((folder / "config.json").read_text())
    backbone = Path(str(config.get("vlm_model_name", "")))
    if backbone.is_absolute() and backbone.is_dir():
        config["vlm_model_name"] = f"backbone-sha256:{_folder_digest(backbone)}"
    digest = hashlib.sha256()
    digest.update(json.dumps(config, sort_keys=True).encode() + b"\n")
    digest.update(sha256_file(folder / "model.safetensors").encode())
    return f"sha256:{digest.hexdigest()}"


def _folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder)}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def _recipe_digest(base: GeneratedBase, features: PolicyFeatures) -> str:
    import torch

    payload = {
        "backbone": base.backbone.digest(),
        "overrides": {
            k: list(v) if isinstance(v, tuple) else v for k, v in base.smolvla_overrides.items()
        },
        "seed": base.seed,
        "features": features.as_dict(),
        "torch": torch.__version__.split("+")[0],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def smolvla_config(
    backbone_dir: Path, features: PolicyFeatures, overrides: dict[str, Any], device: str
) -> Any:
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

    inputs, outputs = features.to_lerobot()
    return SmolVLAConfig(
        vlm_model_name=str(backbone_dir),
        load_vlm_weights=False,
        input_features=inputs,
        output_features=outputs,
        device=device,
        **overrides,
    )


def _ensure_backbone(recipe: BackboneRecipe) -> Path:
    folder = cache_root() / "backbones" / f"{recipe.name}-{recipe.digest()[:16]}"
    with file_lock(folder.with_name(folder.name + ".lock")):
        if not (folder / "config.json").exists():
            staging = staging_dir_for(folder)
            write_backbone(recipe, staging)
            publish_dir(staging, folder)
    return folder


def build_fresh_policy(spec: str, features: PolicyFeatures) -> Any:
    """An untrained policy of a generated architecture, in memory, seeded deterministically."""
    import torch
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    if spec not in GENERATED_BASES:
        raise PolicySpecError(f"{spec!r} is not one of {', '.join(GENERATED_BASES)}")
    generated = GENERATED_BASES[spec]
    backbone = _ensure_backbone(generated.backbone)
    config = smolvla_config(backbone, features, generated.smolvla_overrides, "cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generated.seed)
        with _stdout_to_stderr():
            return SmolVLAPolicy(config)


def _materialize(base: GeneratedBase, features: PolicyFeatures) -> Path:
    """Write (once) the checkpoint folder of a generated base and return it."""
    folder = cache_root() / "bases" / f"{base.spec}-{_recipe_digest(base, features)[:16]}"
    with file_lock(folder.with_name(folder.name + ".lock")):
        if not all((folder / name).exists() for name in CHECKPOINT_FILES):
            logger.info("generating base {} into {}", base.spec, folder)
            staging = staging_dir_for(folder)
            build_fresh_policy(base.spec, features).save_pretrained(staging)
            publish_dir(staging, folder)
    return folder


def committed_bases() -> list[str]:
    """Names of the bases shipped in the package (``tiny-sim-base``)."""
    return sorted(p.parent.name for p in COMMITTED_BASES.glob("*/model.safetensors"))


def policy_backbone_name(architecture: str) -> str:
    return GENERATED_BASES[architecture].backbone.name


def _materialize_committed(name: str) -> Path:
    """Copy a committed base into the cache, pointing its config at the local backbone."""
    source = COMMITTED_BASES / name
    config = json.loads((source / "config.json").read_text())
    backbone_name = str(config["vlm_model_name"]).removeprefix(BACKBONE_SCHEME)
    recipes = [g.backbone for g in GENERATED_BASES.values() if g.backbone.name == backbone_name]
    if not recipes:
        raise PolicySpecError(f"{source}: unknown backbone {backbone_name!r} in config.json")
    recipe = recipes[0]
    config["vlm_model_name"] = str(_ensure_backbone(recipe))
    weights = sha256_file(source / "model.safetensors")
    folder = cache_root() / "bases" / f"{name}-{weights[:16]}"
    with file_lock(folder.with_name(folder.name + ".lock")):
        if not all((folder / n).exists() for n in CHECKPOINT_FILES):
            staging = staging_dir_for(folder)
            shutil.copyfile(source / "model.safetensors", staging / "model.safetensors")
            (staging / "config.json").write_text(json.dumps(config, indent=4))
            publish_dir(staging, folder)
    return folder


def resolve_base(spec: str, features: PolicyFeatures | None = None) -> BaseRef:
    """Find (or generate) the checkpoint folder ``spec`` names; no network for local specs."""
    if spec in committed_bases():
        folder = _materialize_committed(spec)
        return BaseRef(spec=spec, name_or_path=str(folder), base_id=checkpoint_id(folder))
    if spec in GENERATED_BASES:
        if features is None:
            raise PolicySpecError(f"policy {spec!r} is generated and needs the robot's features")
        folder = _materialize(GENERATED_BASES[spec], features)
        return BaseRef(spec=spec, name_or_path=str(folder), base_id=checkpoint_id(folder))
    path = Path(spec).expanduser()
    if path.exists():
        missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
        if missing:
            raise PolicySpecError(
                f"{path}: not a SmolVLA checkpoint (missing {', '.join(missing)})"
            )
        return BaseRef(spec=spec, name_or_path=str(path.resolve()), base_id=checkpoint_id(path))
    repo_id, _, revision = spec.partition("@")
    if repo_id.count("/") != 1 or spec.startswith((".", "/", "~")):
        raise PolicySpecError(
            f"policy {spec!r}: no such folder, and not a Hub id (owner/name[@revision]) "
            f"or one of {', '.join(GENERATED_BASES)}"
        )
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=revision or None))
    except Exception as error:  # the hub client raises many types; all mean "not available"
        raise PolicySpecError(f"policy {spec!r}: cannot fetch from the Hub ({error})") from None
    return BaseRef(spec=spec, name_or_path=repo_id, base_id=f"{repo_id}@{folder.name}")


def _checkpoint_folder(base: BaseRef) -> Path:
    folder = Path(base.name_or_path)
    if folder.exists():
        return folder
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(base.name_or_path, revision=base.base_id.split("@", 1)[1]))


def make_processors(
    policy_config: Any, dataset_stats: dict[str, Any] | None = None
) -> tuple[Any, Any]:
    """LeRobot's SmolVLA pre/post processors; features without stats pass un-normalized."""
    from lerobot.policies.smolvla.processor_smolvla import make_smolvla_pre_post_processors

    preprocessor, postprocessor = make_smolvla_pre_post_processors(policy_config, dataset_stats)
    return preprocessor, postprocessor


def build_policy(
    spec: str = DEFAULT_POLICY,
    features: PolicyFeatures | None = None,
    device: str | None = None,
    dataset_stats: dict[str, Any] | None = None,
) -> LoadedPolicy:
    """Build the SmolVLA policy ``spec`` names, with its pre/post processors, in eval mode."""
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    device = device or default_device()
    base = resolve_base(spec, features)
    folder = _checkpoint_folder(base)
    with _stdout_to_stderr():
        policy = SmolVLAPolicy.from_pretrained(str(folder), local_files_only=True)
    policy.config.device = device
    policy.name_or_path = base.name_or_path
    policy.to(device).eval()
    loaded_features = PolicyFeatures.from_lerobot(
        policy.config.input_features, policy.config.output_features
    )
    if features is not None and features.state_dim != loaded_features.state_dim:
        raise PolicySpecError(
            f"policy {spec!r} takes state of {loaded_features.state_dim} values, "
            f"the robot gives {features.state_dim}"
        )
    preprocessor, postprocessor = make_processors(policy.config, dataset_stats)
    return LoadedPolicy(policy, preprocessor, postprocessor, base, loaded_features)

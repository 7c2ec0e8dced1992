"""``zk0 policy`` and ``zk0 adapter``: inspect SmolVLA policies; make, check and describe adapter
artifacts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from zk0.shared.artifact import read_manifest, verify_artifact
from zk0.shared.cli import JsonFlag, PolicyOption, RobotOption, from_options, new_app, option_help
from zk0.shared.config import DEFAULT_ROBOT_CONFIG, load_robot_config
from zk0.shared.features import PolicyFeatures
from zk0.shared.lora import LoraSpec
from zk0.shared.policy_factory import DEFAULT_POLICY, GENERATED_BASES

policy_app = new_app("Inspect SmolVLA policies.")
adapter_app = new_app("Create, verify and describe adapter artifacts.")

RankOption = Annotated[int | None, typer.Option(help=option_help(LoraSpec, "rank"))]
AlphaOption = Annotated[float | None, typer.Option(help=option_help(LoraSpec, "alpha"))]
DropoutOption = Annotated[float | None, typer.Option(help=option_help(LoraSpec, "dropout"))]
TargetsOption = Annotated[
    str | None, typer.Option(help=option_help(LoraSpec, "targets") + " Comma-separated.")
]


def lora_spec(
    rank: int | None, alpha: float | None, dropout: float | None, targets: str | None
) -> LoraSpec:
    """The LoRA options as the model (its defaults for what was not given)."""
    projections = tuple(targets.split(",")) if targets is not None else None
    return from_options(LoraSpec, rank=rank, alpha=alpha, dropout=dropout, targets=projections)


def _features(robot_config: str) -> PolicyFeatures:
    return PolicyFeatures.from_robot_config(load_robot_config(robot_config))


@policy_app.command("info")
def policy_info(
    policy: PolicyOption = DEFAULT_POLICY,
    robot_config: RobotOption = DEFAULT_ROBOT_CONFIG,
    rank: RankOption = None,
    alpha: AlphaOption = None,
    dropout: DropoutOption = None,
    targets: TargetsOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Parameter counts (total, trainable, LoRA), LoRA-wrapped modules and adapter size."""
    from zk0.shared.lora import apply_lora, summarize
    from zk0.shared.policy_factory import build_fresh_policy, build_policy

    spec = lora_spec(rank, alpha, dropout, targets)
    features = _features(robot_config)
    if policy in GENERATED_BASES:  # no need to write a full-size base to disk just to count it
        model = build_fresh_policy(policy, features)
    else:
        model = build_policy(policy, features, device="cpu").policy
    summary = summarize(apply_lora(model, spec))
    report = {"policy": policy, "lora": spec.model_dump(mode="json"), **summary.as_dict()}
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"policy            {policy}")
    typer.echo(f"total params      {summary.total_params:,}")
    typer.echo(f"trainable params  {summary.trainable_params:,}")
    typer.echo(
        f"LoRA params       {summary.lora_params:,} (rank {spec.rank}, alpha {spec.alpha:g})"
    )
    typer.echo(
        f"adapter size      {summary.adapter_bytes_fp32 / 1e6:.2f} MB fp32, "
        f"{summary.adapter_bytes_bf16 / 1e6:.2f} MB bf16"
    )
    typer.echo(f"wrapped modules   {len(summary.wrapped_modules)}")
    for name in summary.wrapped_modules:
        typer.echo(f"  {name}")


@adapter_app.command("init")
def adapter_init(
    out: Annotated[Path, typer.Option("--out", help="Folder to create (must not exist).")],
    policy: PolicyOption = DEFAULT_POLICY,
    robot_config: RobotOption = DEFAULT_ROBOT_CONFIG,
    rank: RankOption = None,
    alpha: AlphaOption = None,
    dropout: DropoutOption = None,
    targets: TargetsOption = None,
) -> None:
    """Write a fresh version-0 adapter (B = 0: the base's own behaviour) for POLICY."""
    from zk0.shared.artifact import save_adapter
    from zk0.shared.lora import apply_lora
    from zk0.shared.policy_factory import build_policy

    spec = lora_spec(rank, alpha, dropout, targets)
    loaded = build_policy(policy, _features(robot_config), device="cpu")
    peft_model = apply_lora(loaded.policy, spec, loaded.base.name_or_path)
    manifest = save_adapter(peft_model, out, version=0, base=loaded.base, lora=spec)
    typer.echo(f"{out}  version 0  id {manifest.artifact_id}")


@adapter_app.command("verify")
def adapter_verify(
    folder: Annotated[Path, typer.Argument(help="Adapter artifact folder.")],
    base: Annotated[
        str | None, typer.Option("--base", help="Policy spec it must be built on.")
    ] = None,
    artifact_id: Annotated[
        str | None, typer.Option("--id", help="Artifact id it must have.")
    ] = None,
    robot_config: RobotOption = DEFAULT_ROBOT_CONFIG,
) -> None:
    """Exit 0 only if every file is intact and, if given, the base and id match."""
    base_ref = None
    expected = None
    if base is not None:
        from zk0.shared.artifact import expected_tensors
        from zk0.shared.lora import apply_lora
        from zk0.shared.policy_factory import build_policy

        loaded = build_policy(base, _features(robot_config), device="cpu")
        base_ref = loaded.base
        lora = read_manifest(folder).lora
        expected = expected_tensors(apply_lora(loaded.policy, lora))
    manifest = verify_artifact(folder, artifact_id, base_ref, expected)
    typer.echo(f"ok  {folder}  version {manifest.version}  id {manifest.artifact_id}")


@adapter_app.command("info")
def adapter_info(
    folder: Annotated[Path, typer.Argument(help="Adapter artifact folder.")],
    as_json: JsonFlag = False,
) -> None:
    """Describe an artifact (after verifying it)."""
    manifest = verify_artifact(folder)
    report: dict[str, Any] = {
        "artifact_id": manifest.artifact_id,
        **manifest.model_dump(mode="json"),
    }
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    lora = manifest.lora
    typer.echo(f"artifact id   {manifest.artifact_id}")
    typer.echo(
        f"version       {manifest.version} "
        f"(parent {manifest.parent_version}, round {manifest.round})"
    )
    typer.echo(f"base          {manifest.base.spec}  {manifest.base.id}")
    typer.echo(
        f"LoRA          rank {lora.rank}, alpha {lora.alpha:g}, dropout {lora.dropout:g}, "
        f"targets {','.join(lora.targets)}"
    )
    typer.echo(f"tensors       {len(manifest.tensors)}, {manifest.adapter_bytes:,} bytes")
    typer.echo(f"created at    {manifest.created_at}")
    for key, value in sorted(manifest.metrics.items()):
        typer.echo(f"metric        {key} = {value}")

"""``zk0``: inspect policies, make and check adapter artifacts, run benchmarks."""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from zk0.shared.artifact import ArtifactError, read_manifest, verify_artifact
from zk0.shared.config import ConfigError, load_robot_config
from zk0.shared.control import ControlError
from zk0.shared.features import PolicyFeatures
from zk0.shared.lora import LoraSpec
from zk0.shared.policy_factory import DEFAULT_POLICY, GENERATED_BASES, PolicySpecError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROBOT_CONFIG = REPO_ROOT / "robot_configs" / "sim_so101.yaml"
#: Errors a user can fix; they print as one line and exit 2, never as a traceback.
USER_ERRORS = (
    ConfigError,
    PolicySpecError,
    ArtifactError,
    ControlError,
    FileNotFoundError,
    ValueError,
)

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)
policy_app = typer.Typer(help="Inspect SmolVLA policies.", no_args_is_help=True)
adapter_app = typer.Typer(
    help="Create, verify and describe adapter artifacts.", no_args_is_help=True
)
app.add_typer(policy_app, name="policy")
app.add_typer(adapter_app, name="adapter")

PolicyOption = Annotated[
    str,
    typer.Option(
        "--policy",
        help=f"Hub id or local checkpoint folder, or one of {', '.join(GENERATED_BASES)}.",
    ),
]
RobotOption = Annotated[
    Path,
    typer.Option("--robot-config", help="Robot config whose cameras and joints shape the policy."),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def run_cli(typer_app: typer.Typer) -> None:
    """Run ``typer_app``; a user error prints one line on stderr and exits 2."""
    try:
        typer_app()
    except USER_ERRORS as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)


def main() -> None:
    run_cli(app)


def lora_options(
    rank: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.1,
    targets: str = "q_proj,k_proj,v_proj,o_proj",
) -> LoraSpec:
    return LoraSpec(rank=rank, alpha=alpha, dropout=dropout, targets=tuple(targets.split(",")))  # type: ignore[arg-type]


def _features(robot_config: Path) -> PolicyFeatures:
    return PolicyFeatures.from_robot_config(load_robot_config(robot_config))


@policy_app.command("info")
def policy_info(
    policy: PolicyOption = DEFAULT_POLICY,
    robot_config: RobotOption = DEFAULT_ROBOT_CONFIG,
    rank: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.1,
    targets: str = "q_proj,k_proj,v_proj,o_proj",
    as_json: JsonFlag = False,
) -> None:
    """Parameter counts (total, trainable, LoRA), LoRA-wrapped modules and adapter size."""
    from zk0.shared.lora import apply_lora, summarize
    from zk0.shared.policy_factory import build_fresh_policy, build_policy

    features = _features(robot_config)
    if policy in GENERATED_BASES:  # no need to write a full-size base to disk just to count it
        model = build_fresh_policy(policy, features)
    else:
        model = build_policy(policy, features, device="cpu").policy
    spec = lora_options(rank, alpha, dropout, targets)
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
    rank: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.1,
    targets: str = "q_proj,k_proj,v_proj,o_proj",
) -> None:
    """Write a fresh version-0 adapter (B = 0: the base's own behaviour) for POLICY."""
    from zk0.shared.artifact import save_adapter
    from zk0.shared.lora import apply_lora
    from zk0.shared.policy_factory import build_policy

    loaded = build_policy(policy, _features(robot_config), device="cpu")
    spec = lora_options(rank, alpha, dropout, targets)
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


def _bench_names() -> list[str]:
    import zk0.bench

    return sorted(
        m.name for m in pkgutil.iter_modules(zk0.bench.__path__) if not m.name.startswith("_")
    )


@app.command(
    "bench",
    context_settings={
        "allow_extra_args": True,
        "ignore_unknown_options": True,
        "help_option_names": [],
    },
)
def bench(
    ctx: typer.Context, name: Annotated[str | None, typer.Argument(help="Benchmark to run.")] = None
) -> None:
    """Run a benchmark from bench/: ``zk0 bench NAME --json F`` (``zk0 bench NAME --help``)."""
    if name is None or name in ("--help", "-h"):
        typer.echo(
            "usage: zk0 bench NAME [--json F] [options]; "
            f"NAME is one of: {', '.join(_bench_names())}"
        )
        return
    if name not in _bench_names():
        raise ValueError(f"no benchmark {name!r}; there are: {', '.join(_bench_names())}")
    module = importlib.import_module(f"zk0.bench.{name}")
    module.app(ctx.args, prog_name=f"zk0 bench {name}")


if __name__ == "__main__":
    main()


@app.command("demo")
def demo(
    agents: Annotated[int, typer.Option(min=1, max=4, help="Simulated SO-101 agents.")] = 3,
    rounds: Annotated[int, typer.Option(min=1, help="Federated LoRA rounds.")] = 3,
    episodes: Annotated[int, typer.Option(min=2, help="Episodes each agent records.")] = 8,
    policy: PolicyOption = "tiny-sim-base",
    outputs: Annotated[Path, typer.Option(help="Root of the run folders.")] = Path("outputs"),
    chaos_kill_round: Annotated[
        int | None,
        typer.Option(help="SIGKILL the first agent while it trains in this round (it restarts)."),
    ] = None,
) -> None:
    """A hub and simulated agents on loopback: record, federate, push, evaluate (offline)."""
    # The umbrella CLI reaches into the hub package here: the demo drives the hub's daemons.
    demo_module = importlib.import_module("zk0.hub.demo")
    options = demo_module.DemoOptions(
        agents=agents,
        rounds=rounds,
        episodes=episodes,
        policy=policy,
        outputs=outputs,
        chaos_kill_round=chaos_kill_round,
    )
    demo_module.run_demo(options)


base_app = typer.Typer(help="Pretrained bases shipped with zk0.", no_args_is_help=True)
app.add_typer(base_app, name="base")


@base_app.command("build")
def base_build() -> None:
    """Rebuild ``tiny-sim-base``: record the base task, pretrain the tiny SmolVLA, check it."""
    # The one place the umbrella CLI reaches into the agent package (it records and trains).
    builder = importlib.import_module("zk0.agent.base_builder")
    report = builder.build()
    typer.echo(json.dumps(report, indent=2))

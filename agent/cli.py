"""``zk0-agent``: the robot-workstation side of zk0."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from zk0.agent.daemon_cli import register as register_daemon_commands
from zk0.agent.inference.engine_config import EngineConfig
from zk0.shared.cli import RobotOption, from_options, new_app, option_help, run_cli
from zk0.shared.config import AgentConfig, ConfigError, load_agent_config
from zk0.shared.features import PolicyFeatures

app = new_app(__doc__)
config_app = new_app("Agent configuration.")
app.add_typer(config_app, name="config")
keys_app = new_app("This agent's CURVE key pair for the hub.")
app.add_typer(keys_app, name="keys")


@config_app.command("check")
def config_check(config: Annotated[Path, typer.Option("--config", help="agent.yaml")]) -> None:
    """Validate an agent config and the robot config it names (its ``options:`` exactly as
    recording does); print what the agent will use."""
    from zk0.agent.robots import robot_options

    agent = load_agent_config(config)
    robot = agent.load_robot_config()
    try:
        robot_options(robot)
    except ConfigError as error:
        raise ConfigError(f"{agent.robot_config}: {error}") from None
    features = PolicyFeatures.from_robot_config(robot)
    typer.echo(f"agent id      {agent.agent_id}")
    typer.echo(
        f"robot         {robot.robot.type} ({robot.robot.id}) "
        f"at {robot.robot.port or '-'}, {robot.fps} fps"
    )
    for name, camera in robot.cameras.items():
        typer.echo(f"camera        {name}: {camera.width}x{camera.height} -> {camera.policy_key}")
    typer.echo(
        f"policy        {agent.policy} (state {features.state_dim}, action {features.action_dim})"
    )
    typer.echo(f"data root     {agent.data_root}")
    typer.echo(f"hub           {agent.hub.host} (flower {agent.hub.flower_port})")


def _key_paths(agent: AgentConfig) -> tuple[Path, Path]:
    if agent.keys is not None:
        return agent.keys.curve_secret, agent.keys.curve_public
    folder = agent.data_root / "keys"
    return folder / f"{agent.agent_id}.key_secret", folder / f"{agent.agent_id}.key"


def _node_key_path(agent: AgentConfig) -> Path:
    if agent.keys is not None and agent.keys.supernode_private_key is not None:
        return agent.keys.supernode_private_key
    return agent.data_root / "keys" / f"{agent.agent_id}.supernode"


@keys_app.command("init")
def keys_init(config: Annotated[Path, typer.Option("--config", help="agent.yaml")]) -> None:
    """Make both of this agent's key pairs (secrets 0600): CURVE for adapter distribution and
    ECDSA for Flower SuperNode authentication."""
    from zk0.shared.distribution.keys import create_keypair, key_id
    from zk0.shared.flower_keys import make_node_keypair

    agent = load_agent_config(config)
    secret, public = _key_paths(agent)
    if _node_key_path(agent).exists():
        raise ValueError(f"{_node_key_path(agent)}: already exists; keys are never overwritten")
    pair = create_keypair(secret, public, agent.agent_id)
    node_public = make_node_keypair(_node_key_path(agent))
    typer.echo(f"agent {agent.agent_id} key {key_id(pair.public)}: secret {secret} (0600)")
    typer.echo(f"SuperNode key: secret {_node_key_path(agent)} (0600), public {node_public}")
    typer.echo(
        f"on the hub: zk0-hub keys add {agent.agent_id} {public.name} "
        f"--supernode-key {node_public.name} --config hub.yaml"
    )
    if agent.keys is None:
        typer.echo(
            f"then add to {config}:\nkeys:\n  curve_secret: {secret}\n  curve_public: {public}\n"
            f"  supernode_private_key: {_node_key_path(agent)}\n"
            "  hub_curve_public: <the hub's public .key file>\n"
            "  hub_ca_cert: <the hub's TLS CA certificate>"
        )


@keys_app.command("show")
def keys_show(config: Annotated[Path, typer.Option("--config", help="agent.yaml")]) -> None:
    """Print this agent's public key and key id (after checking the secret file is private)."""
    from zk0.shared.distribution.keys import key_id, load_keypair

    agent = load_agent_config(config)
    secret, public = _key_paths(agent)
    pair = load_keypair(secret)
    typer.echo(f"agent {agent.agent_id} key {key_id(pair.public)} public {pair.public.decode()}")
    typer.echo(f"public key file {public}")


@app.command("record")
def record(
    robot_config: RobotOption,
    episodes: Annotated[int, typer.Option("--episodes", min=1, help="Episodes to add.")] = 1,
    task: Annotated[
        str | None, typer.Option("--task", help="Task text (default: the robot config's).")
    ] = None,
    root: Annotated[
        Path | None,
        typer.Option("--root", help="Dataset folder (default: DATA_ROOT/datasets/<robot id>)."),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Add to an existing dataset.")] = False,
    config: Annotated[
        Path | None, typer.Option("--config", help="agent.yaml: data root and agent id.")
    ] = None,
    progress: Annotated[
        bool | None, typer.Option("--progress/--no-progress", help="Default: on a terminal.")
    ] = None,
) -> None:
    """Record teleoperated episodes into a LeRobot v3.0 dataset (crash-safe, resumable).

    DATA_ROOT is the agent config's data_root, else $ZK0_DATA_ROOT, else outputs/data.
    """
    import os
    import sys

    from zk0.shared.config import dataset_root_for, load_robot_config
    from zk0.shared.logs import new_run_dir, setup_logging

    agent = load_agent_config(config) if config is not None else None
    robot = load_robot_config(robot_config)
    data_root = agent.data_root if agent else Path(os.environ.get("ZK0_DATA_ROOT", "outputs/data"))
    dataset_root = root if root is not None else dataset_root_for(data_root, robot)
    run_dir = new_run_dir()
    if agent is not None:
        log = setup_logging(run_dir, "agent", agent.agent_id, level="WARNING")
    else:
        log = setup_logging(run_dir, "record", level="WARNING")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_CACHE", str(run_dir / "hf-datasets"))
    from zk0.agent.recording import record_episodes

    typer.echo(f"recording {episodes} episodes of {robot.robot.type} into {dataset_root}")
    typer.echo(f"log {log}")
    try:
        result = record_episodes(
            robot,
            dataset_root,
            episodes,
            task=task,
            resume=resume,
            progress=sys.stderr.isatty() if progress is None else progress,
            on_episode=lambda summary: typer.echo(summary.describe()),
        )
    except ConfigError as error:  # a backend's options: name the file too
        raise ConfigError(f"{robot_config}: {error}") from None
    rate = result.success_rate
    typer.echo(
        f"dataset {result.root}: {result.total_episodes} episodes ({len(result.saved)} new"
        + (f", success {rate:.0%}" if rate is not None else "")
        + (f"; stopped by {result.stopped_by}" if result.stopped_by else "")
        + ")"
    )
    typer.echo(f'load it with LeRobotDataset("{result.repo_id}", root="{result.root}")')
    if result.stopped_by == "SIGINT":
        raise typer.Exit(130)


@app.command("recover")
def recover(
    root: Annotated[Path, typer.Argument(help="Dataset folder.")],
) -> None:
    """Roll back an episode a crash cut short, so plain LeRobot loads the dataset.

    ``zk0-agent record`` does this itself before recording; this is for reading right after a
    crash.
    """
    from zk0.agent.recording.journal import recover_dataset

    report = recover_dataset(root)
    typer.echo(f"{root}: {report.describe()}")


@app.command("eval")
def evaluate_policy(
    robot_config: RobotOption,
    policy: Annotated[str, typer.Option("--policy", help="Policy spec (e.g. tiny-sim-base).")],
    adapter: Annotated[
        Path | None, typer.Option("--adapter", help="Adapter artifact folder to run.")
    ] = None,
    stats: Annotated[
        Path | None,
        typer.Option("--stats", help="normalization.json (default: the adapter's)."),
    ] = None,
    episodes: Annotated[int, typer.Option("--episodes", min=1)] = 1,
    mode: Annotated[str | None, typer.Option(help=option_help(EngineConfig, "mode"))] = None,
    backend: Annotated[
        str, typer.Option("--backend", help="torch, onnx (ONNX Runtime) or onnx_int8.")
    ] = "torch",
    aggregate: Annotated[
        str | None, typer.Option(help=option_help(EngineConfig, "aggregate"))
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(help=option_help(EngineConfig, "threshold"))
    ] = None,
    horizon_s: Annotated[
        float | None, typer.Option(help="Actions per episode / fps (default episode_time_s).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help=option_help(EngineConfig, "seed"))] = None,
    denoising_steps: Annotated[
        int | None, typer.Option(help=option_help(EngineConfig, "denoising_steps"))
    ] = None,
    threads: Annotated[int, typer.Option(min=1, help="torch/onnxruntime threads.")] = 1,
    onnx_wait: Annotated[
        bool,
        typer.Option(
            "--onnx-wait/--no-onnx-wait",
            help="Export (once per base) before the first episode, or serve torch meanwhile.",
        ),
    ] = True,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Queue-depth plot (PNG).")] = None,
) -> None:
    """Closed-loop episodes on the arm (simulated: paced in real time), with metrics.

    Reports success rate, mean episode time, chunk latency p50/p95, the fraction of ticks on
    which the arm had no action (starved) and the queue depth over time.
    """
    import json
    import os
    from typing import get_args

    import torch

    from zk0.agent.inference.backends import BackendName
    from zk0.agent.inference.evaluation import evaluate, load_stats, open_session, plot_queue_depth
    from zk0.shared.config import load_robot_config
    from zk0.shared.logs import new_run_dir, setup_logging

    if backend not in get_args(BackendName):
        raise ValueError(f"--backend: one of {', '.join(get_args(BackendName))}, got {backend!r}")
    engine_config = from_options(
        EngineConfig, mode=mode, aggregate=aggregate, threshold=threshold, seed=seed,
        denoising_steps=denoising_steps,
    )  # fmt: skip
    robot = load_robot_config(robot_config)
    run_dir = new_run_dir()
    log = setup_logging(run_dir, "eval", level="WARNING")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(threads)
    typer.echo(f"log {log}")
    with open_session(
        robot,
        policy,
        adapter=adapter,
        stats=load_stats(stats) if stats is not None else None,
        engine_config=engine_config,
        backend=backend,  # type: ignore[arg-type]
        wait_for_onnx=onnx_wait,
        threads=threads,
    ) as session:
        report = evaluate(session, episodes, horizon_s)
    summary = report.summary()
    if plot is not None:
        summary["plot"] = str(plot_queue_depth(report, plot))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(summary, indent=1) + "\n")
    for episode in summary["per_episode"]:
        typer.echo(
            f"episode {episode['index']}: success {episode['success']}, "
            f"{episode['duration_s']:.2f} s, {episode['chunks']} chunks, "
            f"{episode['starved_ticks']} starved ticks"
        )
    typer.echo(report.describe())


register_daemon_commands(app)


def main() -> None:
    run_cli(app)


if __name__ == "__main__":
    main()

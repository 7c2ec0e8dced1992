"""``zk0-agent``: the robot-workstation side of zk0."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from zk0.shared.cli import run_cli
from zk0.shared.config import load_agent_config
from zk0.shared.features import PolicyFeatures

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)
config_app = typer.Typer(help="Agent configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("check")
def config_check(config: Annotated[Path, typer.Option("--config", help="agent.yaml")]) -> None:
    """Validate an agent config and the robot config it names; print what the agent will use."""
    agent = load_agent_config(config)
    robot = agent.load_robot_config()
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


def main() -> None:
    run_cli(app)


if __name__ == "__main__":
    main()

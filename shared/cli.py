"""What zk0's three commands (``zk0``, ``zk0-agent``, ``zk0-hub``) share: how a user error ends a
command (one line on stderr, exit 2, never a traceback) and the options they spell alike."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from pydantic import BaseModel, ValidationError

from zk0.shared.artifact import ArtifactError
from zk0.shared.config import DEFAULT_ROBOT_CONFIG, ConfigError
from zk0.shared.control import ControlError
from zk0.shared.policy_factory import GENERATED_BASES, PolicySpecError

#: Errors a user can fix; they print as one line and exit 2, never as a traceback.
USER_ERRORS = (
    ConfigError,
    PolicySpecError,
    ArtifactError,
    ControlError,
    FileNotFoundError,
    ValueError,
)

PolicyOption = Annotated[
    str,
    typer.Option(
        "--policy",
        help=f"Hub id or local checkpoint folder, or one of {', '.join(GENERATED_BASES)}.",
    ),
]
RobotOption = Annotated[
    str,
    typer.Option(
        "--robot-config",
        help=f"Robot config file, or a shipped one by name ({DEFAULT_ROBOT_CONFIG}, ...).",
    ),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def option_help(model: type[BaseModel], field: str) -> str:
    """A model field's description: the one help text of a setting, CLI included."""
    return model.model_fields[field].description or ""


def from_options[M: BaseModel](model: type[M], **options: Any) -> M:
    """``model`` from a command's options; one left out (None) takes the model's default, so
    defaults and bounds are the model's alone. A bad value is one line naming the option."""
    try:
        return model.model_validate({k: v for k, v in options.items() if v is not None})
    except ValidationError as error:
        first = error.errors()[0]
        option = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "options"
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ValueError(f"{option}: {message}") from None


def new_app(help_text: str | None) -> typer.Typer:
    """A command group as all of zk0's are made: help on no arguments, no rich tracebacks."""
    return typer.Typer(help=help_text, no_args_is_help=True, pretty_exceptions_enable=False)


def run_cli(typer_app: typer.Typer) -> None:
    """Run ``typer_app``; a user error prints one line on stderr and exits 2."""
    try:
        typer_app()
    except USER_ERRORS as error:
        line = str(error).splitlines()[0] if str(error) else type(error).__name__
        typer.echo(f"error: {line}", err=True)
        sys.exit(2)

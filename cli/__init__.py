"""``zk0``: inspect policies, make and check adapter artifacts, run benchmarks, the demo.

The umbrella command is the one module that may reach both sides (``zk0.hub``, ``zk0.agent``):
the demo drives the hub's daemons and ``base build`` records and trains as an agent does. It
imports them only inside the commands that need them, so ``zk0 --help`` stays quick.
"""

from __future__ import annotations

import json
import pkgutil
from pathlib import Path
from typing import Annotated

import typer

from zk0.cli.policy import adapter_app, policy_app
from zk0.shared.cli import from_options, new_app, option_help, run_cli

app = new_app(__doc__.splitlines()[0] if __doc__ else None)
app.add_typer(policy_app, name="policy")
app.add_typer(adapter_app, name="adapter")
base_app = new_app("Pretrained bases shipped with zk0.")
app.add_typer(base_app, name="base")


def main() -> None:
    run_cli(app)


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
    import importlib

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


def _demo_help(field: str) -> str:
    # The demo's options are DemoOptions' fields, help text included (a light import).
    from zk0.hub.demo_fleet import DemoOptions

    return option_help(DemoOptions, field)


@app.command("demo")
def demo(
    agents: Annotated[int | None, typer.Option(help=_demo_help("agents"))] = None,
    rounds: Annotated[int | None, typer.Option(help=_demo_help("rounds"))] = None,
    episodes: Annotated[int | None, typer.Option(help=_demo_help("episodes"))] = None,
    policy: Annotated[str | None, typer.Option(help=_demo_help("policy"))] = None,
    outputs: Annotated[Path | None, typer.Option(help=_demo_help("outputs"))] = None,
    chaos_kill_round: Annotated[
        int | None, typer.Option(help=_demo_help("chaos_kill_round"))
    ] = None,
    inject_bad_version: Annotated[
        bool | None, typer.Option(help=_demo_help("inject_bad_version"))
    ] = None,
    keep_serving: Annotated[bool | None, typer.Option(help=_demo_help("keep_serving"))] = None,
) -> None:
    """A hub and simulated agents on loopback: record, federate, push, evaluate (offline)."""
    from zk0.hub.demo import run_demo
    from zk0.hub.demo_fleet import DemoOptions

    run_demo(
        from_options(
            DemoOptions,
            agents=agents,
            rounds=rounds,
            episodes=episodes,
            policy=policy,
            outputs=outputs,
            chaos_kill_round=chaos_kill_round,
            inject_bad_version=inject_bad_version,
            keep_serving=keep_serving,
        )
    )


@base_app.command("build")
def base_build() -> None:
    """Rebuild ``tiny-sim-base``: record the base task, pretrain the tiny SmolVLA, check it."""
    from zk0.agent.base_builder import build

    typer.echo(json.dumps(build(), indent=2))

"""The zk0 Flower App: what ``flwr run`` submits to the SuperLink, written from the package.

Flower builds a FAB from an app folder's ``pyproject.toml``: its components (the hub's
ServerApp, the agents' ClientApp, both imported from the installed zk0 package on each side)
and its run config, whose keys are the only ones ``--run-config`` may override. Those keys and
their defaults are :class:`~zk0.shared.federation.RunSettings`' fields, so the app is written
from that model here rather than kept as a second copy of it: it works the same from a source
checkout, a wheel or the image, and cannot drift from the settings it carries.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from zk0.shared.federation import RunSettings, flower_config_arg
from zk0.shared.fsutil import atomic_write_bytes

SERVER_APP = "zk0.hub.server_app:app"
CLIENT_APP = "zk0.agent.client_app:app"


def _zk0_version() -> str:
    try:
        return version("zk0")
    except PackageNotFoundError:  # imported from a tree that was never installed
        return "0.0.0"


def app_pyproject(client_app: str = CLIENT_APP) -> str:
    """The Flower App's ``pyproject.toml``; ``client_app`` (``module:attribute``) replaces the
    agents' ClientApp only where a test or bench runs a hostile one of its own."""
    defaults = "\n".join(flower_config_arg({k: v}) for k, v in RunSettings().to_flower().items())
    return (
        "# Written by zk0 (zk0.hub.flower_app) from RunSettings; do not edit.\n"
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        f'[project]\nname = "zk0"\nversion = "{_zk0_version()}"\n'
        'description = "zk0: federated LoRA for SmolVLA"\nlicense = "Apache-2.0"\n'
        "dependencies = []\n\n"
        '[tool.flwr.app]\npublisher = "zk0"\nfab-include = ["pyproject.toml"]\n\n'
        f'[tool.flwr.app.components]\nserverapp = "{SERVER_APP}"\nclientapp = "{client_app}"\n\n'
        f"[tool.flwr.app.config]\n{defaults}\n"
    )


def write_flower_app(folder: Path, client_app: str = CLIENT_APP) -> Path:
    """Write the Flower App into ``folder`` (kept if unchanged) and return the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    pyproject = folder / "pyproject.toml"
    text = app_pyproject(client_app)
    if not pyproject.is_file() or pyproject.read_text() != text:
        atomic_write_bytes(pyproject, text.encode())
    return folder

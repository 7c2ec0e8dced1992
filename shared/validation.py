"""What every zk0 config and protocol message shares: strict models, one-line errors, versions.

* :class:`WireModel` is the base of every message that crosses a process boundary: strict types
  (an integer is never a boolean or a string), frozen, and unknown fields ignored, so that a
  newer peer of the same major version may add optional fields.
* :func:`describe` turns a pydantic ``ValidationError`` into one line naming the field, and
  :func:`load_yaml_model` a YAML file into a config model (``ConfigError`` naming file and field).
* :class:`Protocol` carries a protocol's ``"MAJOR.MINOR"`` version. A fleet upgrades its hub and
  its agents at different times: peers of the same major understand each other (a minor only
  adds optional fields), and a peer of another major is refused with one line naming both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

_VERSION = re.compile(r"^(\d{1,4})\.(\d{1,4})$")


class WireModel(BaseModel):
    """A message (or part of one) as it travels: strict, frozen, forward compatible."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


def describe(error: ValidationError, prefix: str = "", dashed: bool = False) -> str:
    """``prefix.field: what is wrong`` for the first error, ``(and N more)`` if there are more.

    ``dashed`` spells field names as Flower's configs do (``local-steps``, not ``local_steps``).
    """
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    if dashed:
        where = where.replace("_", "-")
    where = ".".join(part for part in (prefix, where) if part) or "(top level)"
    message = str(first["msg"]).removeprefix("Value error, ")
    more = len(error.errors()) - 1
    return f"{where}: {message}" + (f" (and {more} more)" if more else "")


class ProtocolVersionError(ValueError):
    """The peer speaks another major version of the protocol (one line naming both)."""


@dataclass(frozen=True)
class Protocol:
    """A protocol's name and the ``"MAJOR.MINOR"`` version this side speaks."""

    name: str
    version: str

    def __post_init__(self) -> None:
        if not _VERSION.match(self.version):
            raise ValueError(f"{self.name}: version {self.version!r} is not MAJOR.MINOR")

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    def check(self, received: object) -> None:
        """Raise :class:`ProtocolVersionError` unless ``received`` is a version of our major."""
        found = _VERSION.match(received) if isinstance(received, str) else None
        if found is None:
            raise ProtocolVersionError(
                f"{self.name} protocol: the peer sent version {received!r:.20}, not MAJOR.MINOR; "
                f"this side speaks {self.version}"
            )
        if int(found[1]) != self.major:
            raise ProtocolVersionError(
                f"{self.name} protocol: the peer speaks {received}, this side speaks "
                f"{self.version} (another major version: upgrade the older side)"
            )


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message is one line naming file and field."""


class _StrictLoader(yaml.SafeLoader):
    """YAML loader that refuses duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml_model[M: BaseModel](path: Path, model: type[M]) -> M:
    """Load ``path`` into ``model``; relative paths inside resolve against the file's folder."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a YAML file") from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}: not a UTF-8 text file (byte {error.start}); is it the right file?"
        ) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "not valid YAML"
        raise ConfigError(f"{path}:{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        loaded = model.model_validate(raw, context={"base_dir": path.parent})
    except ValidationError as error:
        raise ConfigError(f"{path}: {describe(error)}") from None
    return _resolve_paths(loaded, path.parent.resolve())


def _resolve_paths[M: BaseModel](model: M, base_dir: Path) -> M:
    updates: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Path) and not value.is_absolute():
            updates[name] = base_dir / value
        elif isinstance(value, BaseModel):
            updates[name] = _resolve_paths(value, base_dir)
    return model.model_copy(update=updates) if updates else model

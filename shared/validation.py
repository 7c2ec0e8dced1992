"""What every zk0 config and protocol message shares: strict models, one-line errors, versions.

* :class:`WireModel` is the base of every message that crosses a process boundary: strict types
  (an integer is never a boolean or a string), frozen, and unknown fields ignored, so that a
  newer peer of the same major version may add optional fields.
* :func:`describe` turns a pydantic ``ValidationError`` into one line naming the field.
* :class:`Protocol` carries a protocol's ``"MAJOR.MINOR"`` version. A fleet upgrades its hub and
  its agents at different times: peers of the same major understand each other (a minor only
  adds optional fields), and a peer of another major is refused with one line naming both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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

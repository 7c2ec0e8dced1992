"""The personalized mode's local part: revisions of a second LoRA adapter that stays on the arm.

In a personalized run (``personal-rank`` > 0) an arm trains two adapters jointly: the shared one,
which it sends, the hub aggregates and publishes (and which inference-only and newly enrolled arms
run alone: it is a complete adapter), and a small local one that is never sent and never
aggregated. What an arm runs is then (fleet version, local revision). This store keeps the local
revisions, in the agent's own folder (``NodeSettings.personal_dir``)::

    <personal_dir>/<rev>/personal.safetensors  the local adapter's tensors (PEFT names)
    <personal_dir>/<rev>/meta.json             revision, parent, LoRA spec, provenance, sha256
    <personal_dir>/current.json                {"revision": n, "sha256": ...}, switched atomically
    <personal_dir>/personal.lock               held while a revision is numbered or current moves

The round worker writes a revision after each round it trained; the agent daemon follows the
pointer (``zk0.agent.personal_follow``). A revision appears whole (staging folder, fsync, rename)
and is verified before anything uses it: sha256, names and shapes, finite values.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field, ValidationError

from zk0.shared.config import StrictModel
from zk0.shared.federation import PERSONAL_KEEP
from zk0.shared.fsutil import (
    atomic_write_bytes,
    file_lock,
    publish_dir,
    sha256_file,
    staging_dir_for,
)
from zk0.shared.lora import LoraSpec, Projection
from zk0.shared.validation import describe

if TYPE_CHECKING:
    import torch

TENSORS = "personal.safetensors"
META = "meta.json"
CURRENT = "current.json"


class PersonalError(ValueError):
    """A local revision that must not run, or a pointer that cannot move (one line)."""


class PersonalMeta(StrictModel):
    """What ``meta.json`` says about one revision (the tensors' sha256 binds it to them)."""

    revision: Annotated[int, Field(ge=1)]
    #: The revision its training resumed from (None: a fresh local part, B = 0).
    parent: Annotated[int, Field(ge=1)] | None
    rank: Annotated[int, Field(ge=1, le=64)]
    alpha: Annotated[float, Field(gt=0)]
    dropout: Annotated[float, Field(ge=0, lt=1)]
    targets: tuple[Projection, ...]
    #: The fleet adapter it was trained beside: its version where the hub says so, and always the
    #: sha256 of its tensors as received (``shared_digest``).
    fleet_version: Annotated[int, Field(ge=0)] | None
    shared_sha256: str
    run_id: int | None
    server_round: Annotated[int, Field(ge=0)]
    tensors: dict[str, tuple[int, ...]]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    created_at: float

    @property
    def spec(self) -> LoraSpec:
        return LoraSpec(
            rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.targets
        )


@dataclass(frozen=True, eq=False)
class PersonalPart:
    """One verified revision, ready to load into PEFT or to merge for inference."""

    revision: int
    spec: LoraSpec
    state: dict[str, torch.Tensor]
    meta: PersonalMeta


def shared_digest(state: Mapping[str, Any]) -> str:
    """sha256 of adapter tensors by name, dtype, shape and bytes (names the fleet adapter)."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype, bf16 too
    return digest.hexdigest()


def _check_tensors(state: Mapping[str, Any], rank: int) -> None:
    """LoRA pairs of rank ``rank``, finite: else PersonalError naming the first bad tensor."""
    import torch

    modules: dict[str, set[str]] = {}
    for name, tensor in sorted(state.items()):
        module, _, kind = name.rpartition(".lora_")
        if kind not in ("A.weight", "B.weight") or tensor.dim() != 2:
            raise PersonalError(f"tensor {name!r} is not a LoRA A or B matrix")
        if tensor.shape[0 if kind == "A.weight" else 1] != rank:
            raise PersonalError(f"tensor {name!r} has shape {tuple(tensor.shape)}, not rank {rank}")
        if not bool(torch.isfinite(tensor).all()):
            raise PersonalError(f"tensor {name!r} is not finite")
        modules.setdefault(module, set()).add(kind[0])
    unpaired = sorted(m for m, kinds in modules.items() if kinds != {"A", "B"})
    if not modules or unpaired:
        raise PersonalError(f"LoRA A and B do not pair up ({unpaired[:1] or 'no tensors'})")


class PersonalStore:
    """Local revisions of one arm, numbered from 1, with an atomically switched current one."""

    def __init__(self, root: Path, keep: int = PERSONAL_KEEP) -> None:
        if keep < 2:
            raise ValueError("keep must be at least 2 (rollback needs an earlier revision)")
        self.root, self.keep = Path(root), keep
        self._lock = self.root / "personal.lock"

    def path(self, revision: int) -> Path:
        return self.root / str(revision)

    def revisions(self) -> list[int]:
        """Complete revisions, oldest first (a crash's staging folders are hidden, not listed)."""
        if not self.root.is_dir():
            return []
        return sorted(int(p.name) for p in self.root.iterdir() if p.name.isdigit())

    def current(self) -> int | None:
        """The revision the pointer names (not verified; ``load`` verifies)."""
        pointer = self._pointer()
        return pointer[0] if pointer is not None else None

    def _pointer(self) -> tuple[int, str] | None:
        with contextlib.suppress(FileNotFoundError):
            try:
                raw = json.loads((self.root / CURRENT).read_text())
                return int(raw["revision"]), str(raw["sha256"])
            except (ValueError, KeyError, TypeError) as error:
                raise PersonalError(f"{self.root / CURRENT}: unreadable ({error!r:.80})") from None
        return None

    def stamp(self) -> tuple[int, int] | None:
        """Changes whenever the pointer is rewritten (a new file replaces it): cheap to poll."""
        try:
            info = (self.root / CURRENT).stat()
        except FileNotFoundError:
            return None
        return info.st_ino, info.st_mtime_ns

    # -- reading -------------------------------------------------------------------------------
    def load(self, revision: int) -> PersonalPart:
        """Revision ``revision``, verified (sha256, names, shapes, rank, finite); else
        PersonalError with one line saying why."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = self.path(revision)
        where = f"local revision r{revision} ({folder})"
        try:
            meta = PersonalMeta.model_validate_json((folder / META).read_bytes())
            if meta.revision != revision:
                raise PersonalError(f"{where}: meta.json says revision {meta.revision}")
            if sha256_file(folder / TENSORS) != meta.sha256:
                raise PersonalError(f"{where}: {TENSORS} does not match its sha256 (tampered?)")
            state = load_file(folder / TENSORS)
        except OSError as error:
            raise PersonalError(f"{where}: {error.strerror or error}: {error.filename}") from None
        except ValidationError as error:
            raise PersonalError(f"{where}: meta.json: {describe(error)}") from None
        except SafetensorError as error:
            raise PersonalError(f"{where}: {TENSORS}: {error}") from None
        shapes = {name: tuple(tensor.shape) for name, tensor in state.items()}
        if shapes != meta.tensors:
            raise PersonalError(f"{where}: its tensors' names or shapes differ from meta.json")
        try:
            _check_tensors(state, meta.rank)
        except PersonalError as error:
            raise PersonalError(f"{where}: {error}") from None
        return PersonalPart(revision, meta.spec, state, meta)

    def load_current(self) -> PersonalPart | None:
        """The current revision, verified against the pointer's sha256 (None: no revision yet)."""
        pointer = self._pointer()
        if pointer is None:
            return None
        part = self.load(pointer[0])
        if pointer[1] != part.meta.sha256:
            raise PersonalError(f"local revision r{pointer[0]}: not the one current.json names")
        return part

    def load_usable(self, rank: int | None = None) -> tuple[PersonalPart | None, list[str]]:
        """The current revision, else the newest older one that verifies (and has ``rank``);
        with the one-line reason of each revision passed over."""
        skipped: list[str] = []
        try:
            part = self.load_current()
        except PersonalError as error:
            part, current = None, self.current_or_none()
            skipped.append(str(error))
            older = [r for r in self.revisions() if current is None or r < current]
            for revision in reversed(older):
                with contextlib.suppress(PersonalError):
                    part = self.load(revision)
                    break
        if part is not None and rank is not None and part.spec.rank != rank:
            skipped.append(f"local revision r{part.revision} has rank {part.spec.rank}, not {rank}")
            part = None
        return part, skipped

    def current_or_none(self) -> int | None:
        with contextlib.suppress(PersonalError):
            return self.current()
        return None

    # -- writing -------------------------------------------------------------------------------
    def save(
        self,
        state: Mapping[str, torch.Tensor],
        spec: LoraSpec,
        *,
        parent: int | None,
        shared_sha256: str,
        server_round: int,
        fleet_version: int | None = None,
        run_id: int | None = None,
    ) -> tuple[int, bool]:
        """Write a new revision (verified, atomic) and make it current unless the pointer moved
        since ``parent`` was read (an operator's rollback wins). Returns (revision, current)."""
        from safetensors.torch import save_file

        tensors = {name: t.detach().cpu().contiguous().float() for name, t in state.items()}
        _check_tensors(tensors, spec.rank)  # never store what must not run
        self.root.mkdir(parents=True, exist_ok=True)
        with file_lock(self._lock):
            revision = max([*self.revisions(), 0]) + 1
            final = self.path(revision)
            staging = staging_dir_for(final)
            try:
                save_file(tensors, str(staging / TENSORS))
                meta = PersonalMeta(
                    revision=revision,
                    parent=parent,
                    rank=spec.rank,
                    alpha=spec.alpha,
                    dropout=spec.dropout,
                    targets=spec.targets,
                    fleet_version=fleet_version,
                    shared_sha256=shared_sha256,
                    run_id=run_id,
                    server_round=server_round,
                    tensors={name: tuple(t.shape) for name, t in tensors.items()},
                    sha256=sha256_file(staging / TENSORS),
                    created_at=time.time(),
                )
                (staging / META).write_text(meta.model_dump_json(indent=1) + "\n")
                publish_dir(staging, final)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            moved = self.current_or_none() != parent
            if not moved:
                self._point(revision, meta.sha256)
            self._prune()
        return revision, not moved

    def set_current(self, revision: int) -> PersonalPart:
        """Verify ``revision``, then point ``current`` at it."""
        part = self.load(revision)
        with file_lock(self._lock):
            self._point(revision, part.meta.sha256)
        return part

    def rollback(self) -> PersonalPart:
        """Point ``current`` at the newest revision before it that verifies; returns it."""
        with file_lock(self._lock):
            current = self.current_or_none()
            if current is None:
                raise PersonalError(f"{self.root}: no local revision to roll back from")
            reasons = []
            for revision in reversed([r for r in self.revisions() if r < current]):
                try:
                    part = self.load(revision)
                except PersonalError as error:
                    reasons.append(str(error))
                    continue
                self._point(revision, part.meta.sha256)
                return part
        why = f" ({reasons[0]})" if reasons else ""
        raise PersonalError(f"no local revision before r{current} to roll back to{why}")

    def _point(self, revision: int, sha256: str) -> None:
        pointer = json.dumps({"revision": revision, "sha256": sha256}) + "\n"
        atomic_write_bytes(self.root / CURRENT, pointer.encode())

    def _prune(self) -> None:
        """Keep the newest ``keep`` revisions and the current one; clear crash leftovers."""
        current = self.current_or_none()
        for revision in self.revisions()[: -self.keep]:
            if revision != current:
                trash = self.root / f".{revision}.deleting"
                self.path(revision).rename(trash)
                shutil.rmtree(trash)
        for leftover in [*self.root.glob(".*.staging"), *self.root.glob(".*.deleting")]:
            shutil.rmtree(leftover, ignore_errors=True)

"""A server optimizer on the adapter delta (FedAvgM, FedAdam): pure functions and their state.

Flower's ``FedAvgM`` and ``FedAdam`` apply an optimizer on the hub to the round's pseudo-gradient,
the aggregated adapter minus the previous global one; here the same update rules run after
``zk0.hub.aggregation`` (so after the per-reply validation and any of its modes but ``svd``).
Per tensor, in fp32, with Δ = aggregated - previous and t the step count (1 for the first):

``fedavgm`` (Hsu et al. 2019, ``flwr.serverapp.strategy.FedAvgM``)
    v = β·v + Δ;  x = previous + η·v.  With β = 0 and η = 1 this is plain aggregation.
    (Flower keeps the momentum of -Δ and subtracts it; the result is the same.)
``fedadam`` (Reddi et al. 2020, ``flwr.serverapp.strategy.FedAdam``)
    m = β1·m + (1-β1)·Δ;  v = β2·v + (1-β2)·Δ²;
    x = previous + η·√(1-β2^(t+1)) / (1-β1^(t+1)) · m / (√v + τ).
    The bias correction's exponent is t+1 exactly as Flower's (its ``server_round + 1``), so a
    run gives Flower's numbers; t comes from the saved state, so it continues across a restart.

η is ``server-lr``, β ``server-momentum``, β1/β2/τ ``server-beta1/beta2/tau`` in the run config
(:class:`~zk0.shared.federation.RunSettings`). ``aggregation: svd`` is refused there: SVD
re-factors every round's mean product in a new basis, so a momentum of the factors is
meaningless (it would have to be kept on ΔW = B·A, which a rank-r adapter cannot carry).

The state (:class:`OptimizerState`) is fp32 and lives in the run folder, never in adapter
artifacts: ``<run dir>/hub/server-optimizer.npz``, written atomically after every published
version together with the run it belongs to and that version. A hub restarted on the same run
continues from it when the store's current version is still the one it recorded; anything
else (another run, another version, another optimizer, a damaged or mismatched file) starts
from a fresh state with a logged reason, never a crash. A new run has a new folder, hence a
fresh state.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from loguru import logger
from numpy.typing import NDArray

from zk0.hub.aggregation import Arrays
from zk0.shared.fsutil import atomic_write_bytes

Kind = Literal["fedavgm", "fedadam"]
STATE_FILE = Path("hub") / "server-optimizer.npz"
FORMAT = 1
_META = "meta"  # npz entry: the JSON metadata as UTF-8 bytes (no pickles in the file)


class OptimizerSettings(Protocol):
    """What :func:`step` reads; :class:`~zk0.shared.federation.RunSettings` declares them."""

    @property
    def server_optimizer(self) -> Literal["none", "fedavgm", "fedadam"]: ...
    @property
    def server_lr(self) -> float: ...
    @property
    def server_momentum(self) -> float: ...
    @property
    def server_beta1(self) -> float: ...
    @property
    def server_beta2(self) -> float: ...
    @property
    def server_tau(self) -> float: ...


@dataclass(frozen=True)
class OptimizerState:
    """The server optimizer's memory: fp32 arrays per adapter tensor name and a step count.

    ``first`` is FedAvgM's momentum v, or FedAdam's first moment m; ``second`` is FedAdam's
    second moment v (empty for FedAvgM). Empty dicts at step 0 stand for zeros, as in Flower.
    """

    kind: Kind
    step: int = 0
    first: Arrays = field(default_factory=dict)
    second: Arrays = field(default_factory=dict)


class StateError(ValueError):
    """A saved state that cannot be continued (one line: what is wrong and where)."""


def step(
    previous: Arrays, aggregated: Arrays, state: OptimizerState, settings: OptimizerSettings
) -> tuple[Arrays, OptimizerState]:
    """The new global adapter and state after one server step from ``previous`` (the global
    adapter the round started from) towards ``aggregated`` (the round's aggregate)."""
    if settings.server_optimizer != state.kind:
        raise ValueError(f"server optimizer {settings.server_optimizer}, but a {state.kind} state")
    if set(previous) != set(aggregated):
        raise ValueError("server optimizer: aggregated tensor names differ from the previous")
    t = state.step + 1
    if state.kind == "fedavgm":
        updates, first, second = _fedavgm(previous, aggregated, state, settings)
    else:
        updates, first, second = _fedadam(previous, aggregated, state, settings, t)
    result = {
        name: (old.astype(np.float32) + updates[name]).astype(old.dtype)
        for name, old in previous.items()
    }
    return result, OptimizerState(state.kind, t, first, second)


def _delta(previous: Arrays, aggregated: Arrays, name: str) -> NDArray[np.float32]:
    return aggregated[name].astype(np.float32) - previous[name].astype(np.float32)


def _fedavgm(
    previous: Arrays, aggregated: Arrays, state: OptimizerState, settings: OptimizerSettings
) -> tuple[Arrays, Arrays, Arrays]:
    """(η·v, v, {}) per tensor, with v = β·v + Δ."""
    momentum: Arrays = {}
    for name in previous:
        delta = _delta(previous, aggregated, name)
        before = state.first.get(name, np.zeros_like(delta))
        momentum[name] = settings.server_momentum * before + delta
    return {n: settings.server_lr * v for n, v in momentum.items()}, momentum, {}


def _fedadam(
    previous: Arrays,
    aggregated: Arrays,
    state: OptimizerState,
    settings: OptimizerSettings,
    t: int,
) -> tuple[Arrays, Arrays, Arrays]:
    """(η_t·m / (√v + τ), m, v) per tensor, with Flower's bias-corrected η_t."""
    beta1, beta2 = settings.server_beta1, settings.server_beta2
    eta_t = settings.server_lr * float(np.sqrt(1.0 - beta2 ** (t + 1)) / (1.0 - beta1 ** (t + 1)))
    first: Arrays = {}
    second: Arrays = {}
    updates: Arrays = {}
    for name in previous:
        delta = _delta(previous, aggregated, name)
        zeros = np.zeros_like(delta)
        first[name] = beta1 * state.first.get(name, zeros) + (1.0 - beta1) * delta
        second[name] = beta2 * state.second.get(name, zeros) + (1.0 - beta2) * (delta * delta)
        denominator = np.sqrt(second[name]).astype(np.float32, copy=False) + settings.server_tau
        updates[name] = eta_t * first[name] / denominator
    return updates, first, second


def state_path(run_dir: Path) -> Path:
    return run_dir / STATE_FILE


def run_key(run_dir: Path) -> str:
    """What identifies a run in its state: its folder, resolved."""
    return str(run_dir.resolve())


def save_state(path: Path, state: OptimizerState, *, run: str, version: int) -> None:
    """Write ``state`` atomically, recording the run and the adapter version it continues from
    (the version published from its last step)."""
    meta = {
        "format": FORMAT,
        "kind": state.kind,
        "run": run,
        "version": version,
        "step": state.step,
    }
    entries = {f"first/{name}": value for name, value in state.first.items()}
    entries |= {f"second/{name}": value for name, value in state.second.items()}
    entries[_META] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())


def read_state(
    path: Path, *, kind: Kind, run: str, version: int, reference: Arrays
) -> OptimizerState:
    """The saved state, if it belongs to this run, optimizer and adapter version and fits
    ``reference`` (the adapter it will update); else :class:`StateError` saying why."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with loaded as npz:
            entries = {name: npz[name] for name in npz.files}
        meta = json.loads(entries.pop(_META).tobytes().decode())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise StateError(f"{path}: unreadable ({type(error).__name__}: {error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StateError(f"{path}: not a format-{FORMAT} server optimizer state")
    if meta.get("kind") != kind:
        raise StateError(f"{path}: saved for {meta.get('kind')!r}, this run uses {kind}")
    if meta.get("run") != run:
        raise StateError(f"{path}: belongs to run {meta.get('run')!r}, not {run!r}")
    if meta.get("version") != version:
        raise StateError(
            f"{path}: computed against version {meta.get('version')!r}, "
            f"the store's current version is {version}"
        )
    steps = meta.get("step")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise StateError(f"{path}: step {steps!r} is not a positive integer")
    moments = ("first", "second") if kind == "fedadam" else ("first",)
    if unexpected := sorted(n for n in entries if n.split("/", 1)[0] not in moments)[:2]:
        raise StateError(f"{path}: unexpected entries {unexpected}")
    found: dict[str, Arrays] = {}
    for moment in moments:
        prefix = f"{moment}/"
        found[moment] = {
            n.removeprefix(prefix): a for n, a in entries.items() if n.startswith(prefix)
        }
        _check_arrays(path, moment, found[moment], reference)
    return OptimizerState(kind, steps, found["first"], found.get("second", {}))


def _check_arrays(path: Path, moment: str, arrays: Arrays, reference: Arrays) -> None:
    if set(arrays) != set(reference):
        missing = sorted(set(reference) - set(arrays))[:2]
        extra = sorted(set(arrays) - set(reference))[:2]
        raise StateError(
            f"{path}: {moment} tensor names differ from the adapter's "
            f"(missing {missing}, unexpected {extra})"
        )
    for name, value in arrays.items():
        if value.dtype != np.float32 or value.shape != reference[name].shape:
            raise StateError(
                f"{path}: {moment}/{name}: {value.dtype}{list(value.shape)}, "
                f"expected float32{list(reference[name].shape)}"
            )
        if not np.isfinite(value).all():
            raise StateError(f"{path}: {moment}/{name}: non-finite values")


def load_state(
    path: Path, *, kind: Kind, run: str, version: int, reference: Arrays
) -> OptimizerState:
    """The state to continue from: the saved one (:func:`read_state`), or a fresh one, with
    the reason logged as a warning (a damaged file, or the state of another run or version)."""
    if not path.exists():
        logger.info("server optimizer {}: fresh state (no {} yet)", kind, path)
        return OptimizerState(kind)
    try:
        state = read_state(path, kind=kind, run=run, version=version, reference=reference)
    except StateError as error:
        logger.warning("server optimizer {}: fresh state: {}", kind, error)
        return OptimizerState(kind)
    logger.info(
        "server optimizer {}: continuing from step {} (version {}, {})",
        kind,
        state.step,
        version,
        path,
    )
    return state

"""The malicious side of ``zk0 bench robustness``: what a bad insider replies.

A malicious client does not train: it takes the round's mean honest update (what an insider who
knows the fleet could send unnoticed) and attacks it. Updates are changes from the round's
starting adapter (the *reference*), and only the tensors that travel are touched, so a reply
is never refused for a trivial reason (in ffa an attacker that moved A would be dropped by the
protocol check before any robust code ran):

``scaled-1e4``        reference + 1e4·Δ
``sign-flipped-10``   reference - 10·Δ
``noise-honest-norm`` reference + Gaussian noise with ‖Δ‖ per tensor (a random direction)
``values-1e30``       every travelling value 1e30 (finite in float32)
``claims-10M``        reference - Δ (the honest step undone, at the honest norm), claiming
                      10,000,000 examples (the most ``validate_update`` lets through): the
                      count is the lever, the norm is unremarkable
``poisoned-stats``    the shared normalization statistics: count 1e15, mean + 1e6; the update
                      is the mean honest one with the median honest count

Every other attack reports no statistics (it skips the stats query), so its fleet normalizes
exactly as its honest-only baseline does and the measured change is the update attack's alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from numpy.typing import NDArray

from zk0.hub.aggregation import MAX_EXAMPLES_PER_CLIENT, Arrays
from zk0.shared.adapter_wire import pack
from zk0.shared.federation import AGENT_ID, ARRAYS_KEY, EXAMPLES, META_KEY, METRICS_KEY
from zk0.shared.normalization import Stats

#: (mean honest arrays, reference, malicious index, round) -> the malicious arrays.
Forge = Callable[[Arrays, Arrays, int, int], Arrays]


def _delta(mean: Arrays, reference: Arrays, name: str) -> NDArray[np.float64]:
    delta: NDArray[np.float64] = np.asarray(mean[name], np.float64) - reference[name]
    return delta


def _along(factor: float) -> Forge:
    def forge(mean: Arrays, reference: Arrays, index: int, round_: int) -> Arrays:
        return {
            n: (reference[n] + factor * _delta(mean, reference, n)).astype(np.float32)
            for n in reference
        }

    return forge


def _noise(mean: Arrays, reference: Arrays, index: int, round_: int) -> Arrays:
    rng = np.random.default_rng([index, round_, 7])
    result = {}
    for name in sorted(reference):
        delta = _delta(mean, reference, name)
        noise = rng.standard_normal(delta.shape)
        noise *= np.linalg.norm(delta) / max(float(np.linalg.norm(noise)), 1e-300)
        result[name] = (reference[name] + noise).astype(np.float32)
    return result


def _huge(mean: Arrays, reference: Arrays, index: int, round_: int) -> Arrays:
    # Tensors the mode keeps frozen (ffa's A: the honest mean equals the reference) stay.
    return {
        n: np.full_like(reference[n], 1e30) if np.any(mean[n] != reference[n]) else reference[n]
        for n in reference
    }


def _honest(mean: Arrays, reference: Arrays, index: int, round_: int) -> Arrays:
    return {n: np.asarray(v, np.float32) for n, v in mean.items()}


@dataclass(frozen=True)
class Attack:
    name: str
    forge: Forge
    #: The claimed example count (None: the median honest client's).
    examples: int | None = None
    poisons_stats: bool = False


ATTACKS: dict[str, Attack] = {
    a.name: a
    for a in (
        Attack("scaled-1e4", _along(1e4)),
        Attack("sign-flipped-10", _along(-10.0)),
        Attack("noise-honest-norm", _noise),
        Attack("values-1e30", _huge),
        Attack("claims-10M", _along(-1.0), examples=MAX_EXAMPLES_PER_CLIENT),
        Attack("poisoned-stats", _honest, poisons_stats=True),
    )
}


def poisoned(stats: Stats) -> Stats:
    """The attacker's own statistics with a count of 1e15 and every mean moved by 1e6."""
    return {
        key: replace(value, count=10**15, mean=value.mean + 1e6) for key, value in stats.items()
    }


def mean_arrays(replies: list[Arrays]) -> Arrays:
    """Coordinate-wise mean (float64 accumulation) in the replies' dtype."""
    return {
        name: np.mean([np.asarray(r[name], np.float64) for r in replies], axis=0).astype(
            first.dtype
        )
        for name, first in replies[0].items()
    }


def train_reply(arrays: Arrays, examples: int, agent: str) -> Message:
    """A ClientApp's train reply as the strategy receives it (tests/conftest.py's helper)."""
    content = RecordDict(
        {
            ARRAYS_KEY: pack(arrays),
            METRICS_KEY: MetricRecord({EXAMPLES: examples}),
            META_KEY: ConfigRecord({AGENT_ID: agent}),
        }
    )
    return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)

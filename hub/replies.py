"""The hub's ROUTER socket: requests in, replies out, a bounded queue per connection.

libzmq keeps one pipe per connected agent. ``ZMQ_SNDHWM`` and ``ZMQ_RCVHWM`` bound, in
messages, what the hub queues for and from each one (``DistributionLimits.max_queued_replies``
and ``max_queued_requests``; a reply is at most 1 MiB + 64 KiB, a request 64 KiB), and
``ZMQ_ROUTER_MANDATORY`` makes a send to a full pipe raise ``zmq.Again`` instead of queueing or
silently dropping. A full pipe means the agent does not read what it asked for: its requests
are then dropped unread for ``SLOW_READER_PAUSE_S`` (each counted as a fault and logged, per
agent), after which one is served again. libzmq cannot disconnect one peer of a bound socket,
so this is how such a client is cut off: it costs the hub nothing and never more than its
queue.
"""

from __future__ import annotations

import time

import zmq
from loguru import logger

from zk0.hub.serving import FaultLog, FetchService
from zk0.shared.distribution.limits import DistributionLimits

#: How long a peer whose reply queue was full has its requests dropped unread. An agent that
#: reads again is served after this; its download re-asks after ``request_timeout_s``.
SLOW_READER_PAUSE_S = 0.5
#: Messages handled per loop turn, so that a flood never starves the heartbeat.
BATCH = 100


def bound_queues(router: zmq.Socket[bytes], limits: DistributionLimits) -> None:
    """Per-connection queue bounds of the ROUTER; set before it binds (they apply to pipes
    made afterwards)."""
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full or unknown peer raises, never blocks
    router.setsockopt(zmq.SNDHWM, limits.max_queued_replies)
    router.setsockopt(zmq.RCVHWM, limits.max_queued_requests)


def user_id(frame: zmq.Frame) -> str | None:
    """The ZAP User-Id libzmq attached to a received frame (the client's z85 public key)."""
    try:
        value = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return value if isinstance(value, str) and value else None


class ReplyRouter:
    """Answers the ROUTER's requests through ``FetchService``; drops those of peers that do not
    read their replies."""

    def __init__(
        self, service: FetchService, faults: FaultLog, limits: DistributionLimits, curve: bool
    ) -> None:
        self.service, self.faults, self.limits, self.curve = service, faults, limits, curve
        self.dropped = 0  # requests dropped because their sender's reply queue was full
        self._paused: dict[bytes, float] = {}  # routing id -> monotonic time its pause ends

    def drain(self, router: zmq.Socket[bytes]) -> None:
        now = time.monotonic()
        if self._paused:  # at most one entry per connected slow peer
            self._paused = {peer: end for peer, end in self._paused.items() if end > now}
        for _ in range(BATCH):
            try:
                frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue
            peer = frames[0].bytes
            user = user_id(frames[1]) if self.curve else None
            if peer in self._paused:
                self._drop(user)
                continue
            reply = self.service.handle([f.bytes for f in frames[1:]], user, peer)
            try:
                router.send_multipart([peer, *reply], zmq.NOBLOCK)
            except zmq.Again:  # its queue is full: it does not read what it asked for
                self._paused[peer] = time.monotonic() + SLOW_READER_PAUSE_S
                self._drop(user)
            except zmq.ZMQError as error:  # EHOSTUNREACH: gone since it asked; it asks again
                logger.debug("reply dropped: {}", error)

    def _drop(self, user: str | None) -> None:
        self.dropped += 1
        _, source = self.service.source(user)
        self.faults.record(
            "fetch",
            source,
            f"does not read its replies ({self.limits.max_queued_replies} queued): "
            f"its requests are dropped for {SLOW_READER_PAUSE_S:g}s",
        )

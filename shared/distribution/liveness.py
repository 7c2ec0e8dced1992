"""How hub and agents notice a dead peer: TCP keepalive, never ZMTP heartbeats.

Both ends bound their receive queues (``ZMQ_RCVHWM``, ``limits.py``). A ZMTP heartbeat
(``ZMQ_HEARTBEAT_IVL``) needs the engine to read the peer's PINGs, and a full queue stops it
reading: a reader that falls behind for a few seconds (a starved thread, a paused process)
has its healthy connection timed out, and libzmq 4.3.5 then aborts the whole process when the
reader drains its queue after the reconnect (``Assertion failed: _input_stopped``;
zeromq/libzmq#3937 and #4767, fix proposed in #4830). ``tests/test_distribution_liveness.py``
starves an agent this way.

The kernel answers keepalive probes whatever the application does, and ``ZMQ_TCP_MAXRT``
(``TCP_USER_TIMEOUT``) drops a connection whose data goes unacknowledged; either way libzmq
reconnects. The protocol's own liveness is at the application level: announces and statuses
every heartbeat, ``hub_silent`` after three missed (``zk0/shared/protocol.md``).
"""

from __future__ import annotations

from typing import Any

import zmq

#: Idle seconds before the first probe, seconds between probes, and probes unanswered before
#: the connection is dropped: a vanished peer is noticed within 16 s of silence.
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES = 10, 2, 3
#: Sent data unacknowledged this long drops the connection.
UNACKNOWLEDGED_MS = 20_000


def detect_dead_peers(sock: zmq.Socket[Any]) -> None:
    """Set before ``bind``/``connect``: TCP keepalive and a retransmission limit."""
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, KEEPALIVE_IDLE_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, KEEPALIVE_INTERVAL_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, KEEPALIVE_PROBES)
    sock.setsockopt(zmq.TCP_MAXRT, UNACKNOWLEDGED_MS)

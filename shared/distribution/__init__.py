"""Adapter distribution over ZeroMQ: the wire protocol and CURVE keys, shared by hub and agents.

Nothing here imports torch: agents' subscribers use it, and many of them run per host in tests.
The protocol itself is written down once, in ``zk0/shared/protocol.md``.
"""

"""Adapter distribution over ZeroMQ: the wire protocol and CURVE keys, shared by hub and agents.

Nothing here imports torch: agents' subscribers use it, and many of them run per host in tests.
The protocol's contract is the models in ``protocol``; ``zk0/shared/protocol.md`` explains them.
"""

"""A Flower ``Grid`` that notices replies promptly: the ServerApp's half of a round's latency.

Flower 1.42's deployment grid pulls replies every 3 s, so each phase of a round (train, then
evaluate) waits 1.5 s on average, and up to 3 s, after its last reply arrived. This grid wraps
the one Flower hands the ServerApp and polls through its public ``pull_messages`` every
``poll_s`` (a request to the SuperLink on loopback or a LAN); everything else is the wrapped
grid's own. The agents' side (the SuperNode's 3 s pause between pulls, a process per message)
is Flower's and stays as it is.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

if TYPE_CHECKING:
    from flwr.supercore.run import Run  # where Flower's own Grid takes it from

#: Between two pulls of replies: a round's replies are noticed within this.
POLL_S = 0.2


class PromptGrid(Grid):
    def __init__(self, grid: Grid, poll_s: float = POLL_S) -> None:
        self.grid, self.poll_s = grid, poll_s

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``, then pull until every reply is in or ``timeout`` has passed."""
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting and (deadline is None or time.monotonic() < deadline):
            pulled = list(self.pull_messages(waiting))
            replies += pulled
            waiting -= {message.metadata.reply_to_message_id for message in pulled}
            if waiting:
                time.sleep(self.poll_s)
        return replies

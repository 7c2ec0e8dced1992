"""The shared normalization a run starts from: every node's feature statistics, bounded.

The ServerApp asks each node for its statistics (never samples) before version 0 and stores
their combination in that version's artifact (``zk0.shared.normalization``).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from loguru import logger

from zk0.hub.strategy import agent_of
from zk0.shared.federation import CONFIG_KEY, NORMALIZATION, STATS_KEY, RunSettings
from zk0.shared.normalization import (
    Stats,
    combine_all,
    dropped_from,
    loads,
    select_robust_stats,
)


def gather_stats(
    grid: Grid, nodes: list[int], timeout_s: float, settings: RunSettings
) -> tuple[Stats, dict[str, str]]:
    """Ask every node for its feature statistics (never samples) and combine them, bounded;
    also the agents whose statistics were dropped as outliers, with why.

    Self-reported, so bounded before they are combined (``zk0.shared.normalization``): each
    agent's count capped to ``max-client-share`` of the total, and with three agents or more
    one whose mean or std lies more than ``stats-outlier-z`` robust z-scores from the others'
    dropped; each with a log line naming the agent. A dropped agent's data is not what the
    fleet's normalization describes (a broken calibration, or a lie), so the run does not count
    its training either (``LoRAFedAvg(excluded=...)``).
    """
    messages = [
        Message(
            RecordDict({CONFIG_KEY: ConfigRecord({"request": "stats"})}), node, MessageType.QUERY
        )
        for node in nodes
    ]
    per_agent: dict[str, Stats] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout_s):
        agent = agent_of(reply)
        try:
            if reply.has_error():
                raise ValueError(reply.error.reason)
            if agent in per_agent:
                raise ValueError("a second reply from the same agent")
            per_agent[agent] = loads(bytes(reply.content[STATS_KEY][NORMALIZATION]))  # type: ignore[arg-type]
        except (KeyError, ValueError) as error:
            logger.warning("statistics from {} dropped: {}", agent, error)
    selected, notes = select_robust_stats(
        per_agent, settings.max_client_share, settings.stats_outlier_z
    )
    outliers = dropped_from(notes)
    for agent, note in notes.items():
        logger.warning(
            "statistics from {} {}: {}", agent, "dropped" if agent in outliers else "bounded", note
        )
    combined = combine_all(selected)
    logger.info(
        "shared normalization from {} agents, {} frames", len(selected), combined["action"].count
    )
    return combined, outliers

"""The ClientApp of ``zk0 bench robustness``'s Flower runs: the agents' own, some nodes hostile.

The last ``ZK0_BENCH_HOSTILE`` simulated nodes (by partition id) are the insiders of the
``claims-10M`` attack: each trains for real like the others, then replies the honest step undone
(global - (trained - global), at its honest norm) claiming 10,000,000 examples. Like the
in-process attackers they send no normalization statistics (their query reply lacks them, so
the hub drops it), and the fleet normalizes exactly as its honest-only baseline does.
"""

from __future__ import annotations

import os

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from zk0.agent import client_app
from zk0.hub.aggregation import MAX_EXAMPLES_PER_CLIENT
from zk0.shared.adapter_wire import from_values, values
from zk0.shared.federation import ARRAYS_KEY, EXAMPLES, METRICS_KEY, STATS_KEY

#: How many of the simulation's nodes (the highest partition ids) are hostile.
HOSTILE_ENV = "ZK0_BENCH_HOSTILE"
CLIENT_APP = "zk0.bench._robustness_clientapp:app"

app = ClientApp()


def _hostile(context: Context) -> bool:
    hostile = int(os.environ.get(HOSTILE_ENV, "0"))
    partition = int(context.node_config["partition-id"])
    return partition >= int(context.node_config["num-partitions"]) - hostile


@app.query()
def query(message: Message, context: Context) -> Message:
    reply = client_app.query(message, context)
    if _hostile(context):
        del reply.content[STATS_KEY]
    return reply


@app.train()
def train(message: Message, context: Context) -> Message:
    reply = client_app.train(message, context)
    if not _hostile(context):
        return reply
    sent = values(message.content.array_records[ARRAYS_KEY])
    trained = values(reply.content.array_records[ARRAYS_KEY])
    reply.content[ARRAYS_KEY] = from_values(2 * sent - trained)
    reply.content.metric_records[METRICS_KEY][EXAMPLES] = MAX_EXAMPLES_PER_CLIENT
    return reply


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return client_app.evaluate(message, context)

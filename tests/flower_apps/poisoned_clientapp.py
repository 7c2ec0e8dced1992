"""A ClientApp for tests only: the product's own, except that one simulated node is hostile.

Node ``sim-03`` (partition 3) trains for real like the others, then sends back the global
adapter plus its update scaled by 1e4: a finite reply that plain averaging would let move the
fleet's adapter thousands of times farther than any honest arm.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from zk0.agent import client_app
from zk0.shared.adapter_wire import from_values, values
from zk0.shared.federation import ARRAYS_KEY

HOSTILE_PARTITION = 3
SCALE = 1e4

app = ClientApp()


@app.query()
def query(message: Message, context: Context) -> Message:
    return client_app.query(message, context)


@app.train()
def train(message: Message, context: Context) -> Message:
    reply = client_app.train(message, context)
    if int(context.node_config.get("partition-id", -1)) != HOSTILE_PARTITION:  # type: ignore[arg-type]
        return reply
    sent = values(message.content.array_records[ARRAYS_KEY])
    trained = values(reply.content.array_records[ARRAYS_KEY])
    reply.content[ARRAYS_KEY] = from_values(sent + SCALE * (trained - sent))
    return reply


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return client_app.evaluate(message, context)

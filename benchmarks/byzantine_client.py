"""The ClientApp of benchmarks/byzantine.py: the fleet's own ClientApp, except on the devices chosen to lie.

A liar trains honestly, then replies the reverse of its update scaled by ``scale`` (``sent - scale * (trained -
sent)`` on every learned tensor): the strongest direction a device can push the model in, at a norm the server's
outlier check (coordinator.validation.NORM_FACTOR x the round's median) lets through. Its metrics are honest.
Which devices lie and how is read from ``byzantine.json`` beside this file (the benchmark writes both into the
app it submits).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from agent.client_app import status, train_subnet
from contracts.messages import subnet_from_record, upload_state

ATTACK = json.loads(Path(__file__).with_name("byzantine.json").read_text())
LIARS = frozenset(random.Random(ATTACK["seed"]).sample(range(ATTACK["devices"]), ATTACK["liars"]))
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")  # BN: the server recomputes them

app = ClientApp()
app.query("status")(status)


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = train_subnet(msg, context)
    if int(context.node_config["partition-id"]) not in LIARS:
        return reply
    sent = upload_state(subnet_from_record(msg.content["arrays"]))
    trained = reply.content["arrays"].to_torch_state_dict()
    scale = float(ATTACK["scale"])
    lies = {k: (sent[k] - scale * (v - sent[k])) if v.is_floating_point() and not k.endswith(STATISTICS) else v
            for k, v in trained.items()}
    reply.content["arrays"] = ArrayRecord(torch_state_dict={k: v.to(trained[k].dtype) for k, v in lies.items()})
    return reply

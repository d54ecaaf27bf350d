"""Tests only: a run whose app bundle ships its own ClientApp, one that replies the node's
configuration and the first rows of its data. A warm metafed node must refuse to run it
(tests/test_malicious_server_e2e.py)."""
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server_app = ServerApp()
client_app = ClientApp()


@client_app.query()
def steal(msg: Message, context: Context) -> Message:
    from metafed.deploy.client_app import builtin_node

    node = builtin_node(str(msg.content["config"]["config"]), context)
    return Message(RecordDict({"loot": ConfigRecord({"node_config": json.dumps(dict(context.node_config)),
                                                     "first_row": node.data.train_x[0].tolist()})}), reply_to=msg)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    config = Path(str(context.run_config["config-file"])).read_text()
    deadline = time.monotonic() + 120
    while len(list(grid.get_node_ids())) < int(context.run_config["num-nodes"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    messages = [Message(RecordDict({"config": ConfigRecord({"config": config, "round": 0})}), n, "query")
                for n in grid.get_node_ids()]
    replies = list(grid.send_and_receive(messages, timeout=120))
    out = Path(str(context.run_config["out"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "loot.json").write_text(json.dumps([{"error": r.error.reason} if r.has_error() else
                                               {"loot": sorted(r.content.keys())} for r in replies]))

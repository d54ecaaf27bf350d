"""Tests only: a ServerApp that plays a malicious server against metafed's real nodes
(tests/test_malicious_server_e2e.py). It sends each node what an honest metafed server never
would, and writes every reply (an error's reason, or the names of what came back) to
``out``/attacks.json for the test to check."""
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


def _send(grid: Grid, messages: list, timeout: float = 120.0) -> list:
    """Push and pull every 20 ms (Flower's send_and_receive waits 3 s between pulls)."""
    pending, replies, deadline = set(grid.push_messages(messages)), [], time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            pending.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
        time.sleep(0.02)
    return replies


def _reply(grid: Grid, node: int, kind: str, content: dict) -> dict:
    replies = _send(grid, [Message(RecordDict(content), node, kind)])
    if not replies:
        return {"silent": True}
    reply = replies[0]
    return {"error": reply.error.reason} if reply.has_error() else {"content": sorted(reply.content.keys())}


@app.main()
def main(grid: Grid, context: Context) -> None:
    from metafed.config import RunConfig
    from metafed.deploy.secagg_wire import round_setup, stage_request
    from metafed.deploy.wire import to_records
    from metafed.privacy.upload import UploadTransform
    from metafed.run import build_federation

    cfg = RunConfig(**json.loads(Path(str(context.run_config["config-file"])).read_text()))
    deadline = time.monotonic() + 120
    while len(list(grid.get_node_ids())) < int(context.run_config["num-nodes"]) and time.monotonic() < deadline:
        time.sleep(0.5)

    def config(run: RunConfig, rnd: int = 1, **extra) -> ConfigRecord:
        return ConfigRecord({"config": run.model_dump_json(), "round": rnd, **extra})

    who, results = {}, {}
    for node in grid.get_node_ids():  # which client each node holds (a planted node refuses to say)
        answer = _send(grid, [Message(RecordDict({"config": config(cfg, 0)}), node, "query")])
        if answer and not answer[0].has_error():
            who[int(answer[0].content["info"]["client"])] = node
        else:
            results["planted state folder"] = {"error": answer[0].error.reason} if answer else {"silent": True}
    fed = build_federation(cfg.updated(out=None))
    broadcast = to_records(fed.algorithm.broadcast(fed.state, 1))
    train = {"broadcast": broadcast}
    # node 0 keeps local DP (clip 0.1, noise multiplier 1): ask for its raw update
    results["omitted transform"] = _reply(grid, who[0], "train", {**train, "config": config(cfg)})
    # ... or for noise the server can rebuild from the seed
    insecure = cfg.updated(dp="local", dp_clip=0.1, dp_noise_multiplier=1.0, insecure_reproducible_privacy=True)
    results["insecure flag"] = _reply(grid, who[0], "train", {
        **train, "config": config(insecure), "upload": ConfigRecord(UploadTransform(0.1, 0.1).to_config())})
    # node 0 does not share its label counts
    labels = cfg.updated(aggregator="attention", attention_score="labels")
    results["labels query"] = _reply(grid, who[0], "query", {"config": config(labels, 0)})
    # node 1 holds a SecAgg key: ask for its upload in the clear
    results["hold=False"] = _reply(grid, who[1], "train", {**train, "config": config(cfg, hold=False)})
    # ... then let it hold the upload and open a secure sum over it alone
    results["held for a secure sum"] = _reply(grid, who[1], "train", {**train, "config": config(cfg, hold=True)})
    setup = round_setup([1], 1, None, 1000.0, 40, UploadTransform().to_config(), "samples")
    results["cohort of one"] = _reply(grid, who[1], "query.secagg",
                                      stage_request("advertise", 1, b"m" * 16, cfg.model_dump_json(), setup))
    # node 2 pinned this run: send it another (the clients' learning rate changed)
    results["unpinned run"] = _reply(grid, who[2], "train", {**train, "config": config(cfg.updated(lr=5.0))})
    results["pinned run"] = _reply(grid, who[2], "train", {**train, "config": config(cfg, hold=True)})  # the control
    out = Path(str(context.run_config["out"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "attacks.json").write_text(json.dumps(results, indent=1))

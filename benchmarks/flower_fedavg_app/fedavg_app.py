"""Baseline for benchmarks/deploy_bench.py: Flower's own FedAvg strategy (flwr.serverapp.
strategy.FedAvg, Message API) with the same model and node data as metafed's deployment.

The ClientApp trains the reference model with plain torch.optim.SGD for the run config's
local steps (batch size and lr from the metafed config), on the node's partition loaded by
metafed's node loader, and replies the state_dict as an ArrayRecord. No evaluation. The
ServerApp logs each round's wall time and its own peak RSS."""
import json
import logging
import resource
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from metafed.config import RunConfig
from metafed.deploy.node import load_node, parse_node_config
from metafed.models import build_model

client_app = ClientApp()
server_app = ServerApp()
log = logging.getLogger("flower-fedavg")


def _cfg(path: str) -> RunConfig:
    return RunConfig(**json.loads(Path(path).read_text()))


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = _cfg(str(msg.content["config"]["config-file"]))
    dataset, pid, parts = parse_node_config(dict(context.node_config))
    node = load_node(cfg.model_dump_json(), dataset, pid, parts, "/tmp/unused")
    model = build_model(cfg.model, node.input_shape, node.num_classes, cfg.seed, tuple(cfg.hidden))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    rng = np.random.default_rng([cfg.seed, 3, int(msg.content["config"]["server-round"]), pid])
    x, y = node.data.train_x, node.data.train_y
    for _ in range(cfg.local_steps):
        idx = torch.from_numpy(rng.choice(len(y), size=min(cfg.batch_size, len(y)), replace=False))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    reply = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                        "metrics": MetricRecord({"num-examples": len(y)})})
    return Message(reply, reply_to=msg)


class TimedFedAvg(FedAvg):
    def aggregate_train(self, server_round, replies):
        out = super().aggregate_train(server_round, replies)
        now = time.perf_counter()
        log.warning("flower round %d trained in %.3f s (%d replies)", server_round, now - self._t0, len(list(replies)))
        self._t0 = now
        return out

    def configure_train(self, server_round, arrays, config, grid):
        self._t0 = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    path = str(context.run_config["config-file"])
    cfg = _cfg(path)
    n = int(context.run_config["num-nodes"])
    deadline = time.monotonic() + 120
    while len(list(grid.get_node_ids())) < n and time.monotonic() < deadline:
        time.sleep(0.5)
    module = build_model(cfg.model, _input_shape(cfg), _num_classes(cfg), cfg.seed, tuple(cfg.hidden))
    from flwr.app import ConfigRecord

    strategy = TimedFedAvg(fraction_train=min(1.0, cfg.clients_per_round / n), fraction_evaluate=0.0,
                           min_train_nodes=min(cfg.clients_per_round, n), min_available_nodes=n)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(module.state_dict()), num_rounds=cfg.rounds,
                   train_config=ConfigRecord({"config-file": path}))
    log.warning("flower run finished server_peak_rss_mib=%.1f",
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _input_shape(cfg):
    return {"synthetic": (60,), "mnist": (784,), "digits": (64,)}[cfg.dataset]


def _num_classes(cfg):
    return 10

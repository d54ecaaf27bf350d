"""Your own model and data on Flower's deployment engine.

Write a Flower app module that builds metafed's ServerApp and ClientApp around your
``nn.Module`` factory and a function that gives each SuperNode its data::

    # my_app.py
    from metafed.deploy import NodeData, flower_apps

    def model():
        return MyNet()                       # the same architecture on every party

    def node_data(context):                  # runs on the SuperNode, reads only local files
        k = int(context.node_config["client-id"])
        return NodeData(client_id=k, num_classes=10, train=MyDataset("train"), test=MyDataset("test"))

    server_app, client_app = flower_apps(model, node_data)

and point the app's ``pyproject.toml`` at them (``serverapp = "my_app:server_app"``,
``clientapp = "my_app:client_app"``). Both sides call ``model()`` after seeding torch
with the run's seed. ``train``/``test`` are torch ``Dataset``s of (x, label) pairs, or
already-stacked tensors; they never leave the node. Without Python, a node can serve a
safetensors file instead (``--node-config 'data-file=... client-id=K num-classes=C'``,
see ``metafed.deploy.node.load_node_file``)."""
from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from metafed.config import RunConfig


@dataclass
class NodeData:
    client_id: int
    num_classes: int
    train: object  # torch Dataset of (x, label), or a (x [n, ...], y [n]) tensor pair
    test: object
    state_dir: str | None = None  # where personal state lives (default: the user's private node state folder)


def flower_apps(model: Callable | None = None, node_data: Callable | None = None):
    """(ServerApp, ClientApp) running metafed with your model factory and node data."""
    from metafed.deploy.client_app import builtin_node, make_client_app
    from metafed.deploy.server_app import make_server_app

    load = functools.partial(builtin_node, model_fn=model) if node_data is None else _user_loader(node_data, model)
    return make_server_app(model), make_client_app(load)


def _user_loader(node_data: Callable, model):
    """Node loader over the user's ``node_data(context)``; one Node per (run config, node config)."""
    from metafed.deploy.node import Node, NodeConfigError, client_data_from_datasets, client_data_from_tensors
    from metafed.deploy.private_state import default_state_root, private_folder

    cache: dict = {}
    lock = threading.Lock()

    def loader(config_json: str, context) -> Node:
        key = (config_json, tuple(sorted((k, str(v)) for k, v in dict(context.node_config).items())))
        with lock:
            if key in cache:
                return cache[key]
            cfg = RunConfig(**json.loads(config_json))
            got = node_data(context)
            if not isinstance(got, NodeData):
                raise NodeConfigError(f"node_data() must return a NodeData, got {type(got).__name__}")
            if not 0 <= int(got.client_id) < cfg.num_clients:
                raise NodeConfigError(f"client_id {got.client_id} must be in [0, num_clients={cfg.num_clients})")
            name = f"client-{got.client_id}"
            data = client_data_from_tensors(*got.train, *got.test, name=name) if isinstance(got.train, tuple) \
                else client_data_from_datasets(got.train, got.test, name=name)
            if int(max(data.train_y.max(), data.test_y.max())) >= got.num_classes:
                raise NodeConfigError(f"{name}: labels reach beyond num_classes={got.num_classes}")
            state_dir = private_folder(Path(got.state_dir or default_state_root() / f"client-{got.client_id}"))
            node = Node(cfg, int(got.client_id), data, tuple(data.train_x.shape[1:]), int(got.num_classes), state_dir,
                        "train", model)
            cache.clear()  # one run at a time per node process
            cache[key] = node
            return node

    return loader

"""What one SuperNode holds: its own data partition, the model and algorithm rebuilt from
the run's config, and its personal state on its own disk. Nothing here is sent anywhere."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from metafed import tree
from metafed.algorithms import make_algorithm
from metafed.backends.loop import LoopBackend
from metafed.config import RunConfig
from metafed.data import load_dataset
from metafed.data.federated import ClientData
from metafed.eval import Evaluator
from metafed.models import FunctionalModel, build_model
from metafed.pools.simulation import SimulationPool
from metafed.run_folder import write_text_atomic


class NodeConfigError(ValueError):
    """The SuperNode's --node-config does not describe usable data."""


@dataclass
class Node:
    cfg: RunConfig
    client_id: int  # training client id, or the index among held-out clients (role "heldout")
    data: ClientData
    input_shape: tuple[int, ...]
    num_classes: int
    state_dir: Path
    role: str = "train"  # "heldout": never trains, only scores new-client accuracy

    @functools.cached_property
    def algorithm(self):
        from metafed.data import DEFAULT_MODEL

        module = build_model(self.cfg.model or DEFAULT_MODEL[self.cfg.dataset], self.input_shape, self.num_classes,
                             self.cfg.seed, tuple(self.cfg.hidden))
        return make_algorithm(self.cfg, FunctionalModel(module))

    @functools.cached_property
    def evaluator(self) -> Evaluator:
        return Evaluator(self.algorithm, LoopBackend(), self.cfg.eval_batch_size,
                         self.cfg.personalize_lr or self.cfg.lr, self.cfg.seed)

    def pool(self) -> SimulationPool:
        """A one-client view of the simulation pool: the exact task the simulation would run."""
        from metafed.data.federated import FederatedDataset

        clients = [self.data if i == self.client_id else None for i in range(self.client_id + 1)]
        ds = FederatedDataset(self.cfg.dataset, clients, self.input_shape, self.num_classes)
        return SimulationPool(self.cfg, ds, self.algorithm, LoopBackend())

    # ------------------------------------------------------------------ personal state on disk
    def _state_path(self) -> Path:
        return self.state_dir / f"client-{self.client_id}.safetensors"

    def load_state(self, broadcast: dict) -> dict:
        path = self._state_path()
        if not path.exists():
            return self.algorithm.client_init(broadcast)
        return tree.nested_unflatten(dict(load_bytes(path.read_bytes())))

    def save_state(self, state: dict) -> None:
        if state:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            flat = {k: v.contiguous() for k, v in tree.nested_flatten(state).items()}
            write_text_atomic(self._state_path(), save_bytes(flat))


def parse_node_config(node_config: dict) -> tuple[str, int, int]:
    """(dataset, partition id, number of partitions) from a SuperNode's --node-config."""
    try:
        dataset = str(node_config["dataset"])
        pid, parts = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except (KeyError, TypeError, ValueError):
        raise NodeConfigError("--node-config needs dataset=NAME partition-id=K num-partitions=N") from None
    if not 0 <= pid < parts:
        raise NodeConfigError(f"partition-id {pid} must be in [0, num-partitions={parts})")
    return dataset, pid, parts


@functools.lru_cache(maxsize=4)
def load_node(config_json: str, dataset: str, pid: int, parts: int, state_dir: str) -> Node:
    """The node's partition of a built-in dataset: the run's config (seed, partitioner) with
    the node's dataset and partition count, so it is exactly the simulation's client from
    partition ``pid`` (a training client, or a held-out one)."""
    cfg = RunConfig(**json.loads(config_json))
    if cfg.dataset != dataset or cfg.num_clients != parts:
        raise NodeConfigError(f"this node holds {dataset} partition {pid} of {parts}, but the run asks for "
                              f"{cfg.dataset} over {cfg.num_clients} clients")
    fed = load_dataset(cfg)
    role, index = fed.role_of_partition(pid)  # held-out partitions (--heldout-fraction) never train
    data = fed.clients[index] if role == "train" else fed.heldout[index]
    return Node(cfg, index, data, fed.input_shape, fed.num_classes, Path(state_dir), role)


def seed_everything(cfg: RunConfig) -> None:
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2 ** 32)

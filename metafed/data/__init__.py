"""Federated datasets: embedded, local files, or generated. ``load_dataset(cfg)`` is the entry."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from metafed.data.federated import ClientData, FederatedDataset, hold_out_partitions, split_client
from metafed.data.loaders import DataNotFound, load_digits, load_leaf, load_mnist, standardize_features
from metafed.data.partition import PARTITIONS, partition
from metafed.data.lazy import W1_CLASSES, W1_DIM, LazyClients, w1_clients
from metafed.data.synthetic import synthetic_clients
from metafed.data.public import carve_public, heldout_public, mnist_public

if TYPE_CHECKING:
    from metafed.config import RunConfig

DATASETS = {
    "digits": "8x8 handwritten digits (UCI, shipped with metafed, 1,797 samples), partitioned over num_clients",
    "mnist": "MNIST IDX files from DATA_DIR/mnist (70,000 samples), partitioned over num_clients",
    "femnist": "LEAF FEMNIST JSON from DATA_DIR/femnist, one client per writer",
    "shakespeare": "LEAF Shakespeare JSON from DATA_DIR/shakespeare, one client per speaking role",
    "synthetic": "Synthetic(alpha, beta) of the FedProx paper, generated (or its IID variant)",
    "w1": "the W1 speed workload (Synthetic(1,1)-style, 50-200 samples per client), each client generated "
          "when sampled: federations of 10^5+ clients in bounded memory",
}
DEFAULT_MODEL = {"digits": "mlp", "mnist": "mlp", "femnist": "cnn", "shakespeare": "lstm", "synthetic": "logistic",
                 "w1": "mlp"}


def resolve_data_dir(data_dir: Path | None) -> Path:
    """--data-dir, else $METAFED_DATA, else an error naming both."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get("METAFED_DATA")
    if env:
        return Path(env)
    raise DataNotFound("this dataset is read from local files: pass --data-dir or set METAFED_DATA")


def _carve_server_root(x: np.ndarray, y: np.ndarray, size: int, seed: int):
    """Take ``size`` random samples out of a pooled dataset before it is partitioned: the
    server's own root set (FLTrust), which no client ever holds. Returns (x, y, root)."""
    if size >= len(y):
        raise ValueError(f"fltrust_root_size {size} leaves no data for the clients ({len(y)} samples)")
    pick = np.random.default_rng([seed, 11]).permutation(len(y))
    root, rest = pick[:size], np.sort(pick[size:])
    return x[rest], y[rest], (torch.from_numpy(x[root]), torch.from_numpy(y[root]))


def _heldout_root(heldout: list[ClientData], size: int, seed: int):
    """A root set from held-out clients' training data (clients that never train)."""
    if not heldout:
        raise ValueError("--aggregator fltrust needs a server-held root set: for femnist, shakespeare and synthetic "
                         "it is drawn from held-out clients, so set --heldout-fraction > 0")
    x = torch.cat([c.train_x for c in heldout])
    y = torch.cat([c.train_y for c in heldout])
    pick = torch.from_numpy(np.random.default_rng([seed, 11]).permutation(len(y))[:size])
    return x[pick], y[pick]


def _partitioned(name: str, x: np.ndarray, y: np.ndarray, cfg: "RunConfig", rng: np.random.Generator,
                 shape: tuple[int, ...]) -> list[ClientData]:
    parts = partition(cfg.partition, y, cfg.num_clients, rng, alpha=cfg.dirichlet_alpha,
                      shards_per_client=cfg.shards_per_client)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    return [split_client(xt[p], yt[p], cfg.test_fraction, rng, f"{name}-{k}") for k, p in enumerate(parts)]


def _standardize_users(users: list[tuple]) -> list[tuple]:
    """LEAF users (name, train_x, train_y, test_x, test_y): statistics over all train data."""
    pooled = np.concatenate([u[1] for u in users])
    return [(u[0], standardize_features(u[1], pooled), u[2], standardize_features(u[3], pooled), u[4]) for u in users]


def load_dataset(cfg: "RunConfig") -> FederatedDataset:
    """Build the FederatedDataset a config asks for (deterministic in cfg.seed)."""
    rng = np.random.default_rng([cfg.seed, 100])
    name = cfg.dataset
    root = public = None
    wants_public = cfg.needs_public_inputs  # only FedMD and FedDF: other runs keep every sample for the clients
    if name in ("digits", "mnist"):
        x, y = load_digits() if name == "digits" else load_mnist(resolve_data_dir(cfg.data_dir) / "mnist")
        if cfg.standardize:
            x = standardize_features(x)
        if cfg.aggregator == "fltrust":
            x, y, root = _carve_server_root(x, y, cfg.fltrust_root_size, cfg.seed)
        if wants_public and cfg.public_data == "pool":
            x, y, public = carve_public(x, y, cfg.public_size, cfg.seed)
        shape, classes = (x.shape[1],), 10
        clients = _partitioned(name, x, y, cfg, rng, shape)
    elif name in ("femnist", "shakespeare"):
        users = load_leaf(resolve_data_dir(cfg.data_dir) / name, text=name == "shakespeare")
        if cfg.max_clients is not None:
            users = users[: cfg.max_clients]
        if cfg.standardize:
            users = _standardize_users(users)
        clients = [ClientData(*(torch.from_numpy(a) for a in u[1:]), name=u[0]) for u in users]
        shape, classes = ((784,), 62) if name == "femnist" else ((80,), 80)
    elif name == "synthetic":
        gen = synthetic_clients(cfg.num_clients, cfg.synthetic_alpha, cfg.synthetic_beta, cfg.seed,
                                iid=cfg.synthetic_iid, size_multiplier=cfg.size_multiplier)
        clients = [split_client(torch.from_numpy(x), torch.from_numpy(y), cfg.test_fraction, rng, f"synthetic-{k}")
                   for k, (x, y) in enumerate(gen)]
        shape, classes = (60,), 10
    elif name == "w1":
        clients = w1_clients(cfg.num_clients, cfg.seed, cfg.test_fraction)
        shape, classes = (W1_DIM,), W1_CLASSES
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    heldout: list[ClientData] = []
    kept, out = tuple(range(len(clients))), ()
    if cfg.heldout_fraction > 0:
        kept, out = hold_out_partitions(len(clients), cfg.heldout_fraction, rng)
        heldout = [clients[i] for i in out]
        clients = clients.subset(kept) if isinstance(clients, LazyClients) else [clients[i] for i in kept]
    if cfg.aggregator == "fltrust" and root is None:
        root = _heldout_root(heldout, cfg.fltrust_root_size, cfg.seed)
    if wants_public and public is None:
        public = (mnist_public(resolve_data_dir(cfg.data_dir), cfg.public_size, cfg.seed, shape, cfg.standardize)
                  if cfg.public_data == "mnist" else heldout_public(heldout, cfg.public_size, cfg.seed))
    return FederatedDataset(name, clients, shape, classes, heldout, root, kept, out, public)


__all__ = ["ClientData", "FederatedDataset", "DataNotFound", "DATASETS", "DEFAULT_MODEL", "PARTITIONS",
           "load_dataset", "partition", "synthetic_clients", "resolve_data_dir"]

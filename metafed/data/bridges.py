"""Bridges from the Hugging Face ecosystem: a ``datasets.Dataset`` you have loaded (from
local files: ``load_dataset("parquet" | "csv" | "imagefolder", data_files=...)``; metafed
never downloads) becomes a :class:`~metafed.data.federated.FederatedDataset`, split into
clients by a column (a natural federation: one client per writer, hospital, device id) or
by a Flower Datasets partitioner (``flwr_datasets.partitioner``: IID, Dirichlet, shards,
pathological, ...). Extra ``[hf]``.

    from datasets import load_dataset
    from flwr_datasets.partitioner import DirichletPartitioner
    ds = load_dataset("parquet", data_files="digits.parquet", split="train")
    data = from_hf(ds, x="pixels", y="label",
                   partitioner=DirichletPartitioner(num_partitions=20, partition_by="label", alpha=0.5))
    metafed.run(RunConfig(num_clients=data.num_clients, ...), data=data)
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from metafed.data.federated import ClientData, FederatedDataset, hold_out, split_client

log = logging.getLogger("metafed")


def _arrays(part, x: str, y: str, x_scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A dataset's x and y columns as tensors: x float32 (divided by ``x_scale``; uint8
    pixels by 255 unless told otherwise) or int64 (token ids), y int64 class ids."""
    cols = part.with_format("numpy")[:]
    xs, ys = np.asarray(cols[x]), np.asarray(cols[y])
    if x_scale is None and xs.dtype == np.uint8:
        x_scale = 255.0
    if x_scale is not None:
        xs = xs.astype(np.float32) / np.float32(x_scale)
    elif np.issubdtype(xs.dtype, np.integer):
        xs = xs.astype(np.int64)
    else:
        xs = xs.astype(np.float32)
    if not np.issubdtype(ys.dtype, np.integer):
        raise ValueError(f"column {y!r} must hold integer class ids, got {ys.dtype}")
    return torch.from_numpy(np.ascontiguousarray(xs)), torch.from_numpy(ys.astype(np.int64))


def from_hf(dataset, *, x: str, y: str, by: str | None = None, partitioner=None, num_classes: int | None = None,
            test_fraction: float = 0.2, heldout_fraction: float = 0.0, seed: int = 0, x_scale: float | None = None,
            name: str = "hf") -> FederatedDataset:
    """Clients from a Hugging Face ``datasets.Dataset``: one per distinct value of column
    ``by``, or one per partition of a Flower Datasets ``partitioner``. Each client's samples
    are split into train and test (``test_fraction``); ``heldout_fraction`` of the clients
    never train (new-client evaluation). ``x_scale``: divide x by it (255 for pixels stored
    as integers; uint8 columns get 255 by default); integer x is otherwise kept as token ids.
    Raises ValueError naming the problem."""
    columns = list(dataset.column_names)
    for role, column in (("x", x), ("y", y), ("by", by)):
        if column is not None and column not in columns:
            raise ValueError(f"{role}={column!r} is not a column of this dataset (columns: {', '.join(columns)})")
    if (by is None) == (partitioner is None):
        raise ValueError("from_hf needs exactly one of by= (a column naming each sample's client) and "
                         "partitioner= (a flwr_datasets partitioner)")
    if partitioner is not None:
        partitioner.dataset = dataset
        parts = [(f"{name}-{i}", partitioner.load_partition(i)) for i in range(partitioner.num_partitions)]
    else:
        owners = np.asarray(dataset.with_format("numpy")[:][by])
        parts = [(f"{value}", dataset.select(np.flatnonzero(owners == value).tolist()))
                 for value in dict.fromkeys(owners.tolist())]  # first-appearance order
    rng = np.random.default_rng(seed)
    clients, too_small = [], []
    for client_name, part in parts:
        if len(part) < 2:
            too_small.append(client_name)
            continue
        xs, ys = _arrays(part, x, y, x_scale)
        clients.append(split_client(xs, ys, test_fraction, rng, client_name))
    if too_small:
        log.warning("%d client(s) with fewer than 2 samples left out (a train/test split needs 2): %s",
                    len(too_small), ", ".join(too_small[:5]) + (" ..." if len(too_small) > 5 else ""))
    if not clients:
        raise ValueError("no client has 2 or more samples")
    feature = getattr(dataset, "features", {}).get(y) if hasattr(dataset, "features") else None
    classes = num_classes or getattr(feature, "num_classes", None) or \
        int(max(int(torch.cat([c.train_y, c.test_y]).max()) for c in clients)) + 1
    train, heldout = hold_out(clients, heldout_fraction, rng) if heldout_fraction > 0 else (clients, [])
    return FederatedDataset(name, train, tuple(clients[0].train_x.shape[1:]), classes, heldout=heldout)


__all__ = ["from_hf"]

"""The federated dataset: every client has its own train and test split."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class ClientData:
    """One client's data. x: [n, *input_shape] (float32, or int64 for text); y: [n] int64 class ids
    (or float targets [n, ...] with your own loss and score, see :mod:`metafed.losses`)."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    name: str = ""

    @property
    def num_train(self) -> int:
        return int(self.train_y.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_y.shape[0])


@dataclass(frozen=True)
class FederatedDataset:
    """Clients that train, plus held-out clients that never train (new-client evaluation)."""

    name: str
    clients: list[ClientData]  # or a lazy sequence (metafed.data.lazy.LazyClients) for huge federations
    input_shape: tuple[int, ...]
    num_classes: int
    heldout: list[ClientData] = field(default_factory=list)
    # samples only the server holds (FLTrust's root set): never any client's data
    server_root: tuple[Tensor, Tensor] | None = None
    # the data partition each training / held-out client came from (a SuperNode's partition-id)
    partitions: tuple[int, ...] | None = None
    heldout_partitions: tuple[int, ...] | None = None
    # unlabelled inputs no training client holds, shared by the distillation algorithms [P, ...]
    public: Tensor | None = None

    def role_of_partition(self, partition: int) -> tuple[str, int]:
        """("train", client id) or ("heldout", held-out index) of a data partition."""
        partitions = self.partitions if self.partitions is not None else tuple(range(len(self.clients)))
        if partition in partitions:
            return "train", partitions.index(partition)
        if self.heldout_partitions is not None and partition in self.heldout_partitions:
            return "heldout", self.heldout_partitions.index(partition)
        raise ValueError(f"partition {partition} is not part of this dataset")

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def train_sizes(self) -> np.ndarray:
        if hasattr(self.clients, "train_sizes"):  # a lazy federation knows its sizes without building clients
            return self.clients.train_sizes()
        return np.array([c.num_train for c in self.clients], dtype=np.int64)

    def describe(self) -> str:
        sizes = self.train_sizes()
        return (f"{self.name}: {len(self.clients)} training clients (+{len(self.heldout)} held out), "
                f"train samples {int(sizes.sum())} (per client min {sizes.min()}, median {int(np.median(sizes))}, "
                f"max {sizes.max()}), input {self.input_shape}, {self.num_classes} classes")


def split_client(x: Tensor, y: Tensor, test_fraction: float, rng: np.random.Generator, name: str = "") -> ClientData:
    """Shuffle one client's samples and split them into train and test (each gets >= 1 sample)."""
    n = int(y.shape[0])
    if n < 2:
        raise ValueError(f"client {name or '?'} has {n} sample(s); a train/test split needs at least 2")
    perm = torch.from_numpy(rng.permutation(n))
    n_test = min(n - 1, max(1, int(round(n * test_fraction))))
    test, train = perm[:n_test], perm[n_test:]
    return ClientData(x[train], y[train], x[test], y[test], name)


def hold_out(clients: list[ClientData], fraction: float, rng: np.random.Generator) -> tuple[list[ClientData], list[ClientData]]:
    """Set aside round(fraction * n) random clients that will never train."""
    kept, out = hold_out_partitions(len(clients), fraction, rng)
    return [clients[i] for i in kept], [clients[i] for i in out]


def hold_out_partitions(n: int, fraction: float, rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(training partitions, held-out partitions), each in increasing order."""
    n_out = int(round(n * fraction))
    if n_out >= n:
        raise ValueError(f"heldout_fraction {fraction} leaves no training clients out of {n}")
    out = set(rng.permutation(n)[:n_out].tolist())
    return tuple(i for i in range(n) if i not in out), tuple(i for i in range(n) if i in out)

"""Partitioners: split one labelled pool into per-client index sets (non-IID simulation).

Each returns a list of ``num_clients`` int64 index arrays; every sample is assigned to
exactly one client.
"""
from __future__ import annotations

import numpy as np

PARTITIONS = ("iid", "dirichlet", "shards", "quantity")


def iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Uniformly random, (nearly) equal-sized parts."""
    return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, rng: np.random.Generator, alpha: float,
              min_size: int = 2, max_tries: int = 1000) -> list[np.ndarray]:
    """Label skew: for each class c, client shares p_c ~ Dir(alpha * 1_N) split class c's samples
    (Hsu et al. 2019, arXiv:1909.06335). Small alpha -> few classes per client. Redraws until
    every client has at least ``min_size`` samples."""
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * len(idx)).astype(np.int64)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise ValueError(f"dirichlet(alpha={alpha}) could not give all {num_clients} clients >= {min_size} samples "
                     f"from {len(labels)}; use fewer clients or a larger alpha")


def shards(labels: np.ndarray, num_clients: int, rng: np.random.Generator, shards_per_client: int) -> list[np.ndarray]:
    """Pathological non-IID of McMahan et al. 2017 (arXiv:1602.05629): sort by label, cut into
    num_clients * shards_per_client equal shards, give each client shards_per_client random ones."""
    n_shards = num_clients * shards_per_client
    if n_shards > len(labels):
        raise ValueError(f"{n_shards} shards requested but only {len(labels)} samples")
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, n_shards)
    assignment = rng.permutation(n_shards).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in assignment]


def quantity(labels: np.ndarray, num_clients: int, rng: np.random.Generator, alpha: float,
             min_size: int = 2) -> list[np.ndarray]:
    """Quantity skew: client sizes proportional to q ~ Dir(alpha), labels IID (Li et al. 2022,
    "Federated Learning on Non-IID Data Silos", arXiv:2102.02079)."""
    n = len(labels)
    if n < num_clients * min_size:
        raise ValueError(f"{n} samples cannot give {num_clients} clients {min_size} each")
    q = rng.dirichlet(np.full(num_clients, alpha))
    # every client first gets min_size, the rest is split by q
    extra = np.floor(q * (n - num_clients * min_size)).astype(np.int64)
    extra[: (n - num_clients * min_size) - extra.sum()] += 1
    sizes = extra + min_size
    cuts = np.cumsum(sizes)[:-1]
    return [np.sort(p) for p in np.split(rng.permutation(n), cuts)]


def partition(name: str, labels: np.ndarray, num_clients: int, rng: np.random.Generator, *,
              alpha: float = 0.5, shards_per_client: int = 2) -> list[np.ndarray]:
    """Dispatch by name; raises ValueError for an unknown partitioner."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if name == "iid":
        return iid(labels, num_clients, rng)
    if name == "dirichlet":
        return dirichlet(labels, num_clients, rng, alpha)
    if name == "shards":
        return shards(labels, num_clients, rng, shards_per_client)
    if name == "quantity":
        return quantity(labels, num_clients, rng, alpha)
    raise ValueError(f"unknown partition {name!r}; choose one of {', '.join(PARTITIONS)}")

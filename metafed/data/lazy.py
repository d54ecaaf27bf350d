"""Federations too large to hold: clients made on demand, and the W1 scale dataset.

A :class:`LazyClients` is a read-only sequence of :class:`ClientData` that builds client
``k`` when it is asked for (from a pure function of ``k``) and keeps only the last
``cache`` clients it built. A round touches its cohort, so memory follows the cohort, not
the federation: 100,000 W1 clients would take 2.5 GB as float32 tensors, and their sample
counts take 800 KB. Per-client sample counts are known up front (``train_sizes``) without
building anyone.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Callable

import numpy as np
import torch

from metafed.data.federated import ClientData

W1_DIM, W1_CLASSES = 60, 10


class LazyClients(Sequence):
    """Clients 0..n-1 built by ``make(k)`` on access; the ``cache`` most recent are kept.

    train_sizes: [n] training samples per client (must equal what ``make`` builds).
    """

    def __init__(self, train_sizes: np.ndarray, make: Callable[[int], ClientData], cache: int = 2048):
        self._sizes = np.asarray(train_sizes, dtype=np.int64)
        self._make, self._cache_size = make, cache
        self._cache: OrderedDict[int, ClientData] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sizes)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        k = int(k)
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(f"client {k} is not in this federation of {len(self)}")
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        client = self._make(k)
        if self._cache_size:
            self._cache[k] = client
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return client

    def client(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client k's training data (x, y): the interface a Ray worker reads clients through."""
        data = self[k]
        return data.train_x, data.train_y

    def train_sizes(self) -> np.ndarray:
        return self._sizes.copy()

    def subset(self, indices) -> "LazyClients":
        """Clients ``indices`` (in that order) as a new lazy sequence (e.g. the training
        clients once some are held out)."""
        idx = np.asarray(indices, dtype=np.int64)
        make = self._make
        return LazyClients(self._sizes[idx], lambda j: make(int(idx[j])), self._cache_size)

    def __getstate__(self):  # pickled (Ray's object store) without the cache
        return {**self.__dict__, "_cache": OrderedDict()}


def w1_sizes(num_clients: int, seed: int) -> np.ndarray:
    """W1's training sample counts: LogNormal(ln 100, 0.5), rounded, clipped to [50, 200]."""
    rng = np.random.default_rng([seed, 0])
    return np.clip(np.round(rng.lognormal(np.log(100), 0.5, num_clients)), 50, 200).astype(np.int64)


def w1_client(k: int, n: int, seed: int, test_fraction: float) -> ClientData:
    """Client k of W1 (Synthetic(1, 1)-style; ``../shared/peers/common.py``): its own
    generator ``default_rng([seed, 1, k])`` draws u_k, B_k, W_k [10, 60], b_k [10], v_k [60],
    then n training inputs x ~ N(v_k, diag(j^-1.2)) labelled argmax(W_k x + b_k) (exactly the
    peers' training data), then round(n * test_fraction) (at least 1) test inputs from the
    same distribution."""
    rng = np.random.default_rng([seed, 1, k])
    u, b_mean = rng.normal(0, 1.0), rng.normal(0, 1.0)
    w, b = rng.normal(u, 1, (W1_CLASSES, W1_DIM)), rng.normal(u, 1, W1_CLASSES)
    v = rng.normal(b_mean, 1, W1_DIM)
    std = np.sqrt(np.arange(1, W1_DIM + 1, dtype=np.float64) ** -1.2)
    x = rng.normal(v, std, (n, W1_DIM))
    x_test = rng.normal(v, std, (max(1, int(round(n * test_fraction))), W1_DIM))

    def labelled(inputs):
        return (torch.from_numpy(inputs.astype(np.float32)),
                torch.from_numpy(np.argmax(inputs @ w.T + b, axis=1).astype(np.int64)))

    return ClientData(*labelled(x), *labelled(x_test), name=f"w1-{k}")


def w1_clients(num_clients: int, seed: int, test_fraction: float, cache: int = 2048) -> LazyClients:
    sizes = w1_sizes(num_clients, seed)
    return LazyClients(sizes, lambda k: w1_client(k, int(sizes[k]), seed, test_fraction), cache)

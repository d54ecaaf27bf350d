"""Which samples a client sees, in which order: a pure function of (seed, round, client).

A client's local work is a fixed-shape index tensor ``[steps, batches_per_step, batch]``
padded with -1, so clients with different data sizes run in one vectorized call. The
conventions (``default_rng([seed, 3, round, client])``, one permutation per epoch, a short
last batch) match the peer baselines in ``shared/peers`` so trajectories can be compared.
"""
from __future__ import annotations

import numpy as np


def sample_clients(num_clients: int, per_round: int, rnd: int, seed: int) -> np.ndarray:
    """Uniform sampling without replacement, seeded per round (all clients if per_round >= N)."""
    if per_round >= num_clients:
        return np.arange(num_clients)
    return np.random.default_rng([seed, 2, rnd]).choice(num_clients, per_round, replace=False)


def poisson_sample_clients(num_clients: int, per_round: int, rnd: int, seed: int) -> np.ndarray:
    """Each client joins independently with probability q = per_round / num_clients (the
    sampling DP-FedAvg's privacy analysis assumes); the cohort size varies per round."""
    q = min(1.0, per_round / num_clients)
    return np.flatnonzero(np.random.default_rng([seed, 2, rnd]).random(num_clients) < q)


def epoch_batches(n: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """One epoch: a permutation of range(n) cut into batches, [ceil(n/B), B], padded with -1."""
    per_epoch = -(-n // batch_size)
    out = np.full(per_epoch * batch_size, -1, dtype=np.int64)
    out[:n] = rng.permutation(n)
    return out.reshape(per_epoch, batch_size)


def client_schedule(n: int, *, batch_size: int, epochs: int, steps: int | None, batches_per_step: int,
                    rng: np.random.Generator) -> np.ndarray:
    """Index tensor [S, k, B] for one client.

    With ``steps`` unset, the client runs ``epochs`` passes over its data: S = batches // k
    (at least 1; extra epochs are drawn when the data has fewer than k batches). With
    ``steps`` set, exactly ``steps`` steps drawn from as many epochs as needed.
    """
    if n < 1:
        raise ValueError("a client with no training samples cannot run local steps")
    k = batches_per_step
    per_epoch = -(-n // batch_size)
    needed = steps * k if steps is not None else max(epochs * per_epoch, k)
    draws = [epoch_batches(n, batch_size, rng) for _ in range(-(-needed // per_epoch))]
    batches = np.concatenate(draws)[:needed]
    s = steps if steps is not None else len(batches) // k
    return batches[: s * k].reshape(s, k, batch_size)


def straggler_steps(total_steps: int, epochs: int, steps_mode: bool, rng: np.random.Generator) -> int:
    """Steps a straggler completes: a random 1..E-1 epochs' worth (or 1..S-1 steps)."""
    if steps_mode or epochs <= 1:
        return int(rng.integers(1, max(total_steps, 2)))
    done_epochs = int(rng.integers(1, epochs))
    return max(1, total_steps * done_epochs // epochs)

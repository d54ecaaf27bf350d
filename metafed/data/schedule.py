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
    # epochs drawn in order into one array: the same draws as epoch_batches, one allocation
    draws = np.full((-(-needed // per_epoch), per_epoch * batch_size), -1, dtype=np.int64)
    for epoch in draws:
        epoch[:n] = rng.permutation(n)
    batches = draws.reshape(-1, batch_size)[:needed]
    s = steps if steps is not None else len(batches) // k
    return batches[: s * k].reshape(s, k, batch_size)


def pooled_schedule(pools: list[np.ndarray], *, batch_size: int, epochs: int, steps: int | None,
                    rng: np.random.Generator) -> np.ndarray:
    """Index tensor [S, k, B] where slot j of every step draws only from ``pools[j]`` (an
    array of sample indices), e.g. train and validation halves of a split that must stay
    disjoint. Each slot walks through epochs of its own pool; pool 0 sets the number of
    steps when ``steps`` is unset (``epochs`` passes over it)."""
    if any(len(pool) == 0 for pool in pools):
        raise ValueError(f"a client needs samples in every part of its split, got part sizes "
                         f"{[len(pool) for pool in pools]}")
    s = steps if steps is not None else max(1, epochs * -(-len(pools[0]) // batch_size))
    slots = []
    for pool in pools:
        per_epoch = -(-len(pool) // batch_size)
        drawn = np.concatenate([epoch_batches(len(pool), batch_size, rng) for _ in range(-(-s // per_epoch))])[:s]
        slots.append(np.where(drawn >= 0, pool[np.maximum(drawn, 0)], -1))
    return np.stack(slots, axis=1)


def program_schedule(program, n: int, *, batch_size: int, epochs: int, steps: int | None,
                     rng: np.random.Generator) -> np.ndarray:
    """The schedule of a LocalProgram: :func:`client_schedule`, or :func:`pooled_schedule`
    when the program splits the client's samples (``index_pools(n)``, e.g. the
    meta-updater's train and validation parts)."""
    pools = program.index_pools(n) if hasattr(program, "index_pools") else None
    if pools is None:
        return client_schedule(n, batch_size=batch_size, epochs=epochs, steps=steps,
                               batches_per_step=program.batches_per_step, rng=rng)
    if len(pools) != program.batches_per_step:
        raise ValueError(f"index_pools gave {len(pools)} pools for {program.batches_per_step} batches per step")
    return pooled_schedule(pools, batch_size=batch_size, epochs=epochs, steps=steps, rng=rng)


def straggler_steps(total_steps: int, epochs: int, steps_mode: bool, rng: np.random.Generator) -> int:
    """Steps a straggler completes: a random 1..E-1 epochs' worth (or 1..S-1 steps)."""
    if steps_mode or epochs <= 1:
        return int(rng.integers(1, max(total_steps, 2)))
    done_epochs = int(rng.integers(1, epochs))
    return max(1, total_steps * done_epochs // epochs)

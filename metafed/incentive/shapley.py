"""Shapley values of the clients of one round, from their updates, without retraining.

A coalition S of the round's clients is worth U(S): the utility (accuracy on the server's
validation split) of the model the server would hold had only S's updates been aggregated
(:mod:`metafed.incentive.contribution` builds U). U(empty) is the current global model's.

- :func:`exact_shapley`: phi_i = sum over S not containing i of |S|! (n-|S|-1)! / n! x
  (U(S + i) - U(S)). 2^n utilities: the oracle for small rounds (n <= 14) and for tests.
- :func:`gtg_shapley`: GTG-Shapley (Liu et al., "GTG-Shapley: Efficient and Accurate
  Participant Contribution Evaluation in Federated Learning", ACM TIST 2022,
  arXiv:2109.02053). Monte Carlo over permutations with three savings: (1) between-round
  truncation: if U(all) is within ``eps`` of U(empty) the round changed nothing worth
  dividing and every phi_i = (U(all) - U(empty)) / n; (2) within-permutation truncation:
  once the prefix's utility is within ``eps`` of U(all), the remaining clients' marginals
  are taken as 0; (3) guided sampling: permutation k puts client k mod n first, so every
  client's marginal on the empty coalition (the most informative one) is sampled equally.
  Stops when the estimates' mean relative change over the last n permutations falls below
  ``tolerance``, or after ``max_permutations``. Utilities are cached per coalition.
- :func:`leave_one_out`: U(all) - U(all without i).
"""
from __future__ import annotations

import math
from itertools import combinations
from typing import Callable

import numpy as np

Utility = Callable[[frozenset], float]

MAX_EXACT = 14  # 2^14 = 16,384 utilities


def exact_shapley(n: int, utility: Utility) -> np.ndarray:
    """[n] exact Shapley values of players 0..n-1 under ``utility`` (a function of frozensets)."""
    if n > MAX_EXACT:
        raise ValueError(f"exact Shapley over {n} clients needs 2^{n} utilities: use the estimator (at most "
                         f"{MAX_EXACT} for exact)")
    values = {frozenset(s): utility(frozenset(s)) for k in range(n + 1) for s in combinations(range(n), k)}
    phi = np.zeros(n)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        for k in range(n):
            weight = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
            for s in combinations(others, k):
                s = frozenset(s)
                phi[i] += weight * (values[s | {i}] - values[s])
    return phi


def leave_one_out(n: int, utility: Utility) -> np.ndarray:
    everyone = frozenset(range(n))
    full = utility(everyone)
    return np.array([full - utility(everyone - {i}) for i in range(n)])


class CachedUtility:
    """A utility that computes each coalition once (and counts how many it computed)."""

    def __init__(self, utility: Utility):
        self.utility, self.cache = utility, {}

    def __call__(self, coalition: frozenset) -> float:
        if coalition not in self.cache:
            self.cache[coalition] = float(self.utility(coalition))
        return self.cache[coalition]

    @property
    def evaluations(self) -> int:
        return len(self.cache)


def gtg_shapley(n: int, utility: Utility, rng: np.random.Generator, eps: float = 1e-3,
                max_permutations: int | None = None, tolerance: float = 0.01) -> np.ndarray:
    """[n] GTG-Shapley estimates (see the module docstring). ``rng``: the permutation stream."""
    u = utility if isinstance(utility, CachedUtility) else CachedUtility(utility)
    everyone = frozenset(range(n))
    empty, full = u(frozenset()), u(everyone)
    if abs(full - empty) <= eps:  # between-round truncation
        return np.full(n, (full - empty) / n)
    max_permutations = max_permutations or max(50, 10 * n)
    total, history = np.zeros(n), []
    for k in range(max_permutations):
        first = k % n  # guided: each client leads equally often
        rest = rng.permutation([j for j in range(n) if j != first])
        order = [first, *rest.tolist()]
        prefix, previous = frozenset(), empty
        for j in order:
            if abs(full - previous) <= eps:  # within-permutation truncation: the rest add ~nothing
                break
            prefix = prefix | {j}
            value = u(prefix)
            total[j] += value - previous
            previous = value
        history.append(total / (k + 1))
        if k + 1 >= 2 * n and (k + 1) % n == 0:
            now, before = history[-1], history[-1 - n]
            change = np.abs(now - before).sum() / max(np.abs(now).sum(), 1e-12)
            if change < tolerance:
                break
    return history[-1]


__all__ = ["exact_shapley", "gtg_shapley", "leave_one_out", "CachedUtility", "MAX_EXACT"]

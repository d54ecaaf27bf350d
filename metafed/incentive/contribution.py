"""Measuring each client's contribution to a round, and settling the round: contributions,
free-rider flags, rewards (``--contribution size|loo|shapley|shapley-exact``).

The utility of a coalition S of the round's accepted clients is the score (accuracy, or
minus the mean loss with ``--contribution-utility loss``) on the server's validation split of the model the server would hold had it
aggregated only S's updates: the sample-weighted (or uniform, per ``--weighting``) mean
of their updates, passed through the algorithm's own server update (server optimizer,
Reptile step, ...). The empty coalition is the current global model. No retraining: every
utility is one aggregation, one server step and one forward pass over the validation split.

- ``size``: the client's share of the round's weights (its sample count under sample
  weighting): free, but blind to quality (a noisy-label client of the same size earns the
  same).
- ``loo``: U(all) - U(all without i); n + 1 utilities. Duplicated clients make each other
  look useless (removing one changes nothing).
- ``shapley``: GTG-Shapley estimates (:mod:`metafed.incentive.shapley`); duplicated
  clients split their joint value. A round whose 2^n coalitions are no more than the
  estimator's budget (n x max(50, 10 n) marginals: n <= 9) gets the exact values instead:
  measured on 8 clients, the estimator evaluated 200 of the 256 coalitions anyway.
- ``shapley-exact``: 2^n utilities; cohorts of up to 14 clients.

The validation split (``--validation-size`` samples) is the server's: drawn once, seeded,
from held-out clients' data when the run holds clients out, else from the training
clients' test splits (then it overlaps what evaluation scores: documented, and fine for
ranking contributions, not for reporting accuracy).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from metafed import tree
from metafed.tree import flatten_messages, unflatten_like
from metafed.incentive.rewards import free_rider_flags, split_rewards
from metafed.incentive.shapley import CachedUtility, exact_shapley, gtg_shapley, leave_one_out

CONTRIBUTIONS = ("size", "loo", "shapley", "shapley-exact")
PREVIOUS_STEP = "incentive/previous_step"  # ServerState.extra: the last round's mean upload [D] (replay detection)
REPUTATION = "incentive/reputation"  # ServerState.extra: [clients] float64 moving average of contributions
COPY_COUNTS = "incentive/copy_counts"  # ServerState.extra: rounds each client sent an update identical to another's


def validation_split(dataset, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """``size`` samples the server holds for measuring contributions (see module docstring)."""
    sources = dataset.heldout if dataset.heldout else None
    if sources:
        x = torch.cat([c.train_x for c in sources] + [c.test_x for c in sources])
        y = torch.cat([c.train_y for c in sources] + [c.test_y for c in sources])
    else:
        rng = np.random.default_rng([seed, 21])
        order = rng.permutation(dataset.num_clients)[: max(1, min(dataset.num_clients, 4 * size))]
        x = torch.cat([dataset.clients[int(c)].test_x for c in order])
        y = torch.cat([dataset.clients[int(c)].test_y for c in order])
    pick = torch.from_numpy(np.random.default_rng([seed, 22]).permutation(len(y))[:size])
    return x[pick], y[pick]


def update_hashes(sent: dict, n: int) -> list[str]:
    """SHA-256 of each client's upload: its leaves' bytes in sorted key order."""
    flat = tree.nested_flatten(sent)
    out = []
    for i in range(n):
        h = hashlib.sha256()
        for k in sorted(flat):
            h.update(k.encode())
            h.update(flat[k][i].detach().contiguous().cpu().numpy().tobytes())
        out.append(h.hexdigest())
    return out


def weighted_mean(rows: Tensor, weights: Tensor) -> Tensor:
    """rows [n, D], weights [n] -> their weighted mean [D] (float64)."""
    w = weights.to(torch.float64)
    return (w[:, None] * rows).sum(0) / w.sum()


@dataclass
class Settlement:
    """One round's outcome per accepted client (in the round's order), and the history the
    next round reads (``extra``: ServerState.extra entries, checkpointed with the state)."""

    ids: list[int]
    hashes: list[str]
    contributions: np.ndarray
    rewards: np.ndarray
    flags: list[list[str]]
    evaluations: int
    extra: dict

    def records(self) -> list[dict]:
        return [{"client": c, "update_sha256": h, "contribution": float(p), "reward": float(r), "flags": f}
                for c, h, p, r, f in zip(self.ids, self.hashes, self.contributions, self.rewards, self.flags)]

    def metrics(self) -> dict:
        return {"rewards_paid": float(self.rewards.sum()), "free_riders_flagged": sum(bool(f) for f in self.flags),
                "contribution_evaluations": self.evaluations}


class ContributionMeter:
    """Settles rounds for a federation: see the module docstring. Holds no state between
    rounds: the history it needs (the previous round's mean upload, each client's copy count
    and reputation) is read from, and returned for, the server state's ``extra``."""

    def __init__(self, kind: str, algorithm, validation: tuple[Tensor, Tensor] | None, budget: float, floor: float,
                 seed: int, max_permutations: int | None = None, eps: float = 1e-3, value: str = "accuracy",
                 memory: float = 0.0):
        if kind not in CONTRIBUTIONS:
            raise ValueError(f"unknown contribution measure {kind!r}; choose one of {', '.join(CONTRIBUTIONS)}")
        self.kind, self.algorithm, self.validation = kind, algorithm, validation
        self.budget, self.floor, self.seed = budget, floor, seed
        self.max_permutations, self.eps, self.value, self.memory = max_permutations, eps, value, memory

    def utility(self, state, rows: Tensor, weights: Tensor, layout, reference: dict, rnd: int):
        """U(S) for coalitions of row indices (see the module docstring)."""
        alg, (vx, vy) = self.algorithm, self.validation
        model = alg.model

        def u(coalition: frozenset) -> float:
            if not coalition:
                params = alg.global_params(state)
            else:
                idx = torch.tensor(sorted(coalition))
                mean = weighted_mean(rows[idx], weights[idx])  # [D]
                params = alg.global_params(alg.server_update(state, unflatten_like(mean, layout, reference), rnd))
            with torch.no_grad():
                outputs = model.apply(params, vx)
                if self.value == "loss":
                    return -float(model.sample_loss(outputs, vy).double().mean())
                return float(model.sample_score(outputs, vy).double().mean())

        return CachedUtility(u)

    def settle(self, state, sent: dict, ids: list[int], weights: Tensor, rnd: int, num_clients: int) -> Settlement:
        """Contributions, flags and rewards of round ``rnd``'s accepted uploads ``sent``
        ([n, ...] per leaf) under the state the round started from."""
        n = len(ids)
        rows, layout = flatten_messages(sent)  # [n, D] float64
        hashes = update_hashes(sent, n)
        w = weights.to(torch.float64)
        history = state.extra
        previous = history[PREVIOUS_STEP].double() if PREVIOUS_STEP in history else None
        copies = history[COPY_COUNTS].numpy().copy() if COPY_COUNTS in history else np.zeros(num_clients, np.int64)
        reputation = history[REPUTATION].numpy().copy() if REPUTATION in history else np.zeros(num_clients)
        evaluations = 0
        if self.kind == "size":
            phi = (w / w.sum()).numpy()
        else:
            u = self.utility(state, rows, w, layout, tree.nested_index(sent, 0), rnd)
            if self.kind == "loo":
                phi = leave_one_out(n, u)
            elif self.kind == "shapley-exact" or 2 ** n <= n * (self.max_permutations or max(50, 10 * n)):
                phi = exact_shapley(n, u)  # small rounds: all 2^n coalitions cost no more than sampling
            else:
                rng = np.random.default_rng([self.seed, 20, rnd])
                phi = gtg_shapley(n, u, rng, eps=self.eps, max_permutations=self.max_permutations)
            evaluations = u.evaluations
        phi = np.asarray(phi, dtype=float)
        flags = free_rider_flags(rows, hashes, ids, None if self.kind == "size" else phi, previous, copies)
        flagged = np.array([bool(f) for f in flags])
        who = np.asarray(ids)
        ok = who[~flagged]  # flagged clients' reputation does not move
        reputation[ok] = self.memory * reputation[ok] + (1 - self.memory) * phi[~flagged]
        rewards = split_rewards(reputation[who], flagged, self.budget, self.floor)
        extra = {PREVIOUS_STEP: weighted_mean(rows, w).float(), COPY_COUNTS: torch.from_numpy(copies),
                 REPUTATION: torch.from_numpy(reputation)}
        return Settlement(list(ids), hashes, phi, rewards, flags, evaluations, extra)

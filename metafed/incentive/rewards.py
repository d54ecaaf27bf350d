"""Rewards from contributions, and the free-riders who get none.

Rule (per round, documented in docs/incentives.md): a budget B is split among the clients
not flagged as free-riders,

    reward_i = B x [ floor / m + (1 - floor) x max(phi_i, 0) / sum_j max(phi_j, 0) ]

with m the unflagged clients and phi their contributions; ``floor`` (0..1) guarantees each
a share of the equal split. If no unflagged client contributed positively, the budget is
split equally among them. Flagged clients get 0.

Free-riders (Lin et al., "Free-riders in Federated Learning: Attacks and Defenses", 2019;
Fraboni et al., AISTATS 2021) send something that costs them no training:
- **zero**: an update of (near) zero norm;
- **copy**: an update bit-identical to another client's in the same round (each of the
  group is flagged: the server cannot tell the original from the copy; an honest client
  whose update was copied loses one round's reward, the copier every round);
- **replay**: the previous round's global update sent back (the free-rider attack of Lin
  et al.), within a relative distance of 1e-4;
- **noise**: an update uncorrelated with the rest of the cohort (cosine < 0.02 with the
  mean of the others) whose measured contribution is not positive.
A slightly perturbed copy evades the copy test and is left to the contribution measure.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

NOISE_COSINE = 0.02
REPLAY_DISTANCE = 1e-4


def split_rewards(contributions: np.ndarray, flagged: np.ndarray, budget: float, floor: float = 0.0) -> np.ndarray:
    ok = ~np.asarray(flagged, dtype=bool)
    m = int(ok.sum())
    if m == 0 or budget == 0:
        return np.zeros(len(ok))
    positive = np.where(ok, np.maximum(np.asarray(contributions, dtype=float), 0.0), 0.0)
    share = positive / positive.sum() if positive.sum() > 0 else ok / m
    return budget * (floor * ok / m + (1 - floor) * share)


def free_rider_flags(updates: Tensor, hashes: list[str], ids: list[int], contributions: np.ndarray | None,
                     previous_step: Tensor | None) -> list[list[str]]:
    """Per client, the reasons it is flagged ([] if none). ``updates`` [n, D] float64,
    ``hashes`` the SHA-256 of what each sent, ``previous_step`` [D] the last round's
    aggregated update (None in the first round)."""
    n = updates.shape[0]
    flags: list[list[str]] = [[] for _ in range(n)]
    norms = updates.norm(dim=1)
    scale = float(norms.median()) if n else 0.0
    for i in range(n):
        if float(norms[i]) <= 1e-9 * max(scale, 1e-30) or float(norms[i]) == 0.0:
            flags[i].append("zero update")
    by_hash: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        by_hash.setdefault(h, []).append(i)
    for group in by_hash.values():
        if len(group) > 1:
            for i in group:
                if "zero update" not in flags[i]:
                    others = ", ".join(str(ids[j]) for j in group if j != i)
                    flags[i].append(f"identical to client {others}")
    if previous_step is not None and float(previous_step.norm()) > 0:
        gap = (updates - previous_step).norm(dim=1) / previous_step.norm()
        for i in torch.nonzero(gap <= REPLAY_DISTANCE).flatten().tolist():
            flags[i].append("replays the previous global update")
    if n > 2:
        total = updates.sum(0)
        for i in range(n):
            if flags[i]:
                continue
            rest = total - updates[i]
            cos = float(updates[i] @ rest / (norms[i] * rest.norm()).clamp_min(1e-30))
            measured_useless = contributions is None or contributions[i] <= 0
            if cos < NOISE_COSINE and measured_useless:
                flags[i].append(f"uncorrelated with the cohort (cosine {cos:.3f})")
    return flags

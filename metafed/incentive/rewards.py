"""Rewards from contributions, and the free-riders who get none.

Rule (per round, documented in docs/incentives.md): a budget B is split among the clients
not flagged as free-riders,

    reward_i = B x [ floor / m + (1 - floor) x max(r_i, 0) / sum_j max(r_j, 0) ]

with m the unflagged clients and ``floor`` (0..1) guaranteeing each a share of the equal
split. r_i is the client's reputation, an exponential moving average of its per-round
contributions phi_i over the rounds it took part in, r_i <- memory x r_i + (1 - memory) x
phi_i (``--reward-memory``; 0 pays this round's contribution alone). One round's Shapley
value is noisy (a random update can improve the validation score by luck); the average pays
what a client brings round after round. If no unflagged client has a positive reputation,
the budget is split equally among them. Flagged clients get 0 and their reputation does
not move.

Free-riders (Lin et al., "Free-riders in Federated Learning: Attacks and Defenses", 2019;
Fraboni et al., AISTATS 2021) send something that costs them no training:
- **zero**: an update of (near) zero norm;
- **copy**: an update bit-identical to another client's in the same round. One round
  cannot tell the original from the copy, so the history decides: the server counts, per
  client, the rounds it was in such a group; in a group, the members with more such rounds
  than the group's least are flagged, and all of them when the counts tie (the first
  incident). A habitual copier is then flagged every round, the client it copied only
  while the counts tie;
- **replay**: the previous round's global update sent back (the free-rider attack of Lin
  et al.), within a relative distance of 1e-4;
- **noise**: an update uncorrelated with the rest of the cohort (cosine < 0.02 with the
  sum of the others) whose measured contribution is not positive. Cosine alone is not
  enough: late in training honest updates are nearly orthogonal to the rest as well. A
  client with mostly wrong labels trains, but its update is caught the same way. Noise that
  happens to help one round's validation score is not flagged that round: the reputation
  in :func:`split_rewards` keeps its pay small.
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
                     previous_step: Tensor | None, copies: np.ndarray | None = None) -> list[list[str]]:
    """Per client, the reasons it is flagged ([] if none). ``updates`` [n, D] float64,
    ``hashes`` the SHA-256 of what each sent, ``previous_step`` [D] the last round's
    aggregated update (None in the first round). ``copies`` [clients]: how many rounds each
    client has been in a group of identical updates, updated in place: in a group, only the
    members seen in more such groups than the group's least are flagged (the habitual
    copier, not the client it copied), all of them when the counts tie."""
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
            counts = [int(copies[ids[i]]) + 1 if copies is not None else 1 for i in group]
            if copies is not None:
                copies[[ids[i] for i in group]] += 1
            for i, count in zip(group, counts):
                if "zero update" not in flags[i] and (count > min(counts) or len(set(counts)) == 1):
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
            # late in training honest updates are nearly orthogonal to the rest too: the measured
            # contribution must also say the update is useless
            measured_useless = contributions is None or contributions[i] <= 0
            if cos < NOISE_COSINE and measured_useless:
                flags[i].append(f"uncorrelated with the cohort (cosine {cos:.3f})")
    return flags

"""Secure aggregation as explicit protocol messages between clients and a server.

- SecAgg: Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
  Learning", CCS 2017, with its malicious-server variant: long-term identity keys sign every
  message and the consistency check over the survivor list.
- SecAgg+: Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
  Overhead", CCS 2020: each client shares keys and masks only with its k neighbours in a
  Harary graph over a random permutation drawn afresh each round from the hash of all
  advertised keys (no single party picks it).

Stages, each run once and in order by every client (``client.py`` holds the state machine):
(0) advertise keys and a commitment to the self-mask seed b -> (1) share keys: Shamir
shares of the mask key s_sk and of b, AES-GCM-encrypted per recipient, each with a
commitment -> (2) masked input y_u = x_u + PRG(b_u) + sum_v +-PRG(KA(s_sk_u, s_pk_v)) mod
2^64, only when the client holds at least t valid shares (counting its own) -> (3)
consistency check: sign the survivor list -> (4) unmasking: for each peer reveal the share
of b_v if v survived or of s_sk_v if v dropped, never both, after checking >= t signatures
on the same list. The threshold t > n/2 of the round's cohort is fixed before the round and
checked by every party, so a server cannot split the clients into two halves that each see
a different list.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from metafed.privacy.secagg.messages import (AdvertiseKeys, EncryptedShare, ListSignature, MaskedInput,  # noqa: F401
                                             ShareKeys, SharesForYou, SurvivorList, UnmaskRequest, UnmaskResponse)


class SecAggAbort(RuntimeError):
    """The protocol cannot continue safely (too few clients, inconsistent server lists, ...)."""


# The floors below which a secure sum hides nothing. The server learns the sum over the
# survivors, and it chooses who survives (it may drop anyone): with a threshold of 1 it can
# drop every client but its victim and unmask that client's input alone (Bonawitz et al.,
# CCS 2017, hide an input only within the sum of at least t inputs; Bell et al., CCS 2020,
# state SecAgg+'s guarantee as a sum over a large enough set of honest clients). So t >= 2,
# and with the rule t > n/2 against a server that shows clients different survivor lists,
# n >= 3. These are floors, not recommendations: a sum of two still gives each of the two the
# other's input, and a server with Sybil clients in the cohort learns the sum of the rest.
MIN_COHORT = 3
MIN_THRESHOLD = 2


@dataclass(frozen=True)
class SecAggConfig:
    """threshold t: minimum surviving clients, fixed before the round, n/2 < t <= n for a
    cohort of n; neighbours: even k for SecAgg+ (None = everyone, SecAgg)."""

    threshold: int
    neighbours: int | None = None

    def __post_init__(self):
        if type(self.threshold) is not int or self.threshold < 1:
            raise ValueError(f"secure-aggregation threshold must be a positive integer, got {self.threshold!r}")
        if self.neighbours is not None and (self.neighbours < 2 or self.neighbours % 2):
            raise ValueError(f"SecAgg+ needs an even neighbourhood size k >= 2 (k/2 on each side of the ring), "
                             f"got {self.neighbours}")

    def check_cohort(self, n: int) -> None:
        """Refuse cohorts too small to hide an input (:data:`MIN_COHORT`), thresholds that let a
        server equivocate (t <= n/2) or that no round can meet. Every client checks this on its
        own node when it is asked to join (``advertise``), whatever the server says."""
        if not n / 2 < self.threshold <= n:
            raise SecAggAbort(f"threshold {self.threshold} must satisfy n/2 < t <= n for this round's cohort of "
                              f"n={n}: at t <= n/2 a server can show two halves of the clients different lists")
        if n < MIN_COHORT or self.threshold < MIN_THRESHOLD:
            raise SecAggAbort(f"a cohort of {n} with threshold {self.threshold}: secure aggregation needs at least "
                              f"{MIN_COHORT} clients and a threshold of at least {MIN_THRESHOLD}, or the 'sum' the "
                              "server learns is one client's input")

    def sparse(self, members: int) -> bool:
        return self.neighbours is not None and self.neighbours < members - 1

    def neighbour_threshold(self, members: int) -> int:
        """Shares needed to rebuild one client's secrets: t (SecAgg), or k/2 + 1 of its k
        neighbours plus itself (SecAgg+)."""
        return self.neighbours // 2 + 1 if self.sparse(members) else self.threshold

    def neighbourhood(self, client: int, members: list[int], graph_seed: bytes) -> list[int]:
        """Clients that ``client`` shares secrets and pairwise masks with: everyone else
        (SecAgg), or its k ring neighbours in the permutation that ``graph_seed`` defines."""
        others = [c for c in members if c != client]
        if not self.sparse(len(members)):
            return others
        order = sorted(members, key=lambda c: hashlib.sha256(graph_seed + c.to_bytes(8, "big", signed=True)).digest())
        pos, half = order.index(client), self.neighbours // 2
        return sorted({order[(pos + j) % len(order)] for j in range(-half, half + 1) if j})


def share_point(client: int, cohort: list[int]) -> int:
    """Shamir x-coordinate of a client: its 1-based position in the sorted cohort (never 0,
    whatever id a message claims)."""
    return cohort.index(client) + 1


def pair_sign(u: int, v: int) -> int:
    """u adds +PRG(s_uv) if u < v, else subtracts it: the two masks cancel in the sum."""
    return 1 if u < v else -1


__all__ = ["MIN_COHORT", "MIN_THRESHOLD", "SecAggAbort", "SecAggConfig", "SurvivorList", "share_point", "pair_sign"]

"""Privacy accounting with Google's ``dp-accounting`` (RDP or PLD).

What is charged per round is what the round loop really does:

- ``poisson`` client sampling (each client joins with probability q = m/N): a
  Poisson-subsampled Gaussian, add-or-remove-one adjacency; the clipped sum has
  sensitivity C and noise std z*C.
- ``fixed`` sampling (m clients without replacement): sampled-without-replacement
  Gaussian, replace-one adjacency (RDP only). Replacing one client moves the clipped sum by
  up to 2C, so the charged noise multiplier is z/2 (conservative, never optimistic).
- ``local`` DP: each report is its own Gaussian mechanism (sensitivity 2C under
  replace-one, noise z*C) composed over every round, with no amplification by sampling
  (the worst case of a client that is sampled every round).

- Reproducible sampling (``insecure_reproducible_privacy``): whoever holds the seed knows
  the cohort, so there is no amplification by sampling: each round is charged as the plain
  Gaussian mechanism (q = 1).

What the run released is kept as a per-round ledger of noise multipliers in the
checkpoint; epsilon is the composition of that ledger, so a resumed run that changes the
noise never rewrites the epsilon of rounds already released.

Dropped or rejected replies do not change the charge: the server's noise is calibrated to
the clip norm and the fixed denominator, not to the number of replies, so fewer replies
only lower the signal; each sampled client is charged as if it had replied.
"""
from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from typing import Sequence

# dp-accounting (and the SciPy it loads) is imported where an accountant computes: a run
# without DP never pays for it

ACCOUNTANTS = ("rdp", "pld")
# dp-accounting logs through absl when an RDP order fails to converge and is (safely) skipped
logging.getLogger("absl").setLevel(logging.ERROR)


@dataclass(frozen=True)
class PrivacyAccountant:
    noise_multiplier: float
    num_clients: int
    clients_per_round: int
    delta: float
    sampling: str = "fixed"  # fixed | poisson | local
    method: str = "rdp"
    amplified: bool = True  # False when the cohort is predictable (reproducible sampling)

    def __post_init__(self):
        if self.method not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {self.method!r}; choose one of {', '.join(ACCOUNTANTS)}")
        if not 0 < self.delta < 1:
            raise ValueError(f"dp delta must be in (0, 1), got {self.delta}")
        if self.sampling == "fixed" and self.method == "pld":
            raise ValueError("the PLD accountant has no fixed-size sampling: use --dp-accountant rdp "
                             "or --client-sampling poisson")

    @staticmethod
    def require() -> None:
        """dp-accounting is the extra ``[dp]``: say so before a DP run writes anything."""
        try:
            import dp_accounting  # noqa: F401
        except ImportError:
            raise ImportError('--dp needs the dp extra (dp-accounting): pip install -c constraints.txt -e ".[dp]"') \
                from None

    def event(self, z: float):
        """(one round's DpEvent, adjacency) at noise multiplier z."""
        import dp_accounting as dpa

        if self.sampling == "local":
            return dpa.GaussianDpEvent(z / 2), dpa.NeighboringRelation.REPLACE_ONE
        m, n = min(self.clients_per_round, self.num_clients), self.num_clients
        if self.sampling == "poisson":
            if not self.amplified or m == n:
                return dpa.GaussianDpEvent(z), dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
            return dpa.PoissonSampledDpEvent(m / n, dpa.GaussianDpEvent(z)), dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
        if m == n or not self.amplified:  # everyone (or a known cohort), every round: no amplification
            return dpa.GaussianDpEvent(z / 2), dpa.NeighboringRelation.REPLACE_ONE
        return dpa.SampledWithoutReplacementDpEvent(n, m, dpa.GaussianDpEvent(z / 2)), dpa.NeighboringRelation.REPLACE_ONE

    def epsilon(self, rounds: int) -> float:
        """Epsilon at ``delta`` after ``rounds`` rounds at this accountant's noise multiplier."""
        return self.epsilon_of([self.noise_multiplier] * max(rounds, 0))

    def epsilon_of(self, ledger: Sequence[float]) -> float:
        """Epsilon at ``delta`` of the rounds in ``ledger`` (one noise multiplier per round)."""
        if len(ledger) == 0:
            return 0.0
        if min(ledger) <= 0:
            return math.inf
        from dp_accounting import pld, rdp

        relation = self.event(ledger[0])[1]
        acc = rdp.RdpAccountant(neighboring_relation=relation) if self.method == "rdp" else \
            pld.PLDAccountant(neighboring_relation=relation)
        for z, group in itertools.groupby(ledger):
            acc.compose(self.event(float(z))[0], len(list(group)))
        return float(acc.get_epsilon(self.delta))


def calibrate_noise(target_epsilon: float, rounds: int, num_clients: int, clients_per_round: int, delta: float,
                    sampling: str = "fixed", method: str = "rdp", tolerance: float = 1e-3,
                    spent: Sequence[float] = (), amplified: bool = True) -> float:
    """Smallest noise multiplier z such that the ledger ``spent`` (rounds already released)
    followed by ``rounds`` rounds at z stays within ``target_epsilon`` (bisection)."""
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    acc = PrivacyAccountant(1.0, num_clients, clients_per_round, delta, sampling, method, amplified)
    if spent and acc.epsilon_of(list(spent)) >= target_epsilon:
        raise ValueError(f"the {len(spent)} rounds already released spent epsilon {acc.epsilon_of(list(spent)):.4g}, "
                         f"at or above --target-epsilon {target_epsilon}: no further round fits the budget")

    def eps(z: float) -> float:
        return acc.epsilon_of(list(spent) + [z] * rounds)

    lo, hi = 0.0, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            already = f" after the {len(spent)} rounds already released (epsilon {acc.epsilon_of(list(spent)):.4g})" \
                if spent else ""
            raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon} in {rounds} more rounds{already}: "
                             "no further round fits the budget")
    while hi - lo > tolerance * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if eps(mid) > target_epsilon else (lo, mid)
    return hi

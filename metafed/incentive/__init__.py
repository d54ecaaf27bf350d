"""Incentives: each client's measured contribution per round (data size, leave-one-out,
Shapley), rewards split by it with free-riders flagged, and a signed, hash-chained ledger
of both (docs/incentives.md)."""
from metafed.incentive.contribution import CONTRIBUTIONS, ContributionMeter, Settlement, validation_split
from metafed.incentive.ledger import Ledger, LedgerError, balances, check_receipt, verify
from metafed.incentive.rewards import free_rider_flags, split_rewards
from metafed.incentive.shapley import exact_shapley, gtg_shapley, leave_one_out

__all__ = ["CONTRIBUTIONS", "ContributionMeter", "Settlement", "validation_split", "Ledger", "LedgerError",
           "balances", "check_receipt", "verify", "free_rider_flags", "split_rewards", "exact_shapley",
           "gtg_shapley", "leave_one_out"]

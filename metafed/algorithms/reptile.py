"""Reptile as a federated algorithm: Nichol, Achiam, Schulman, "On First-Order
Meta-Learning Algorithms", 2018, arXiv:1803.02999.

Each sampled client runs the configured local SGD (its K inner steps) from the global
initialisation; the server moves towards the mean adapted weights,
theta <- theta + eps * mean_i(theta_i - theta), with eps = ``--server-lr`` (any server
optimizer may replace the plain step). With ``--reptile-anneal`` eps decreases linearly
to 0 over the rounds, as in the paper's experiments (Section 6: "linearly annealed outer
step size"): eps_t = eps * (1 - (t - 1) / T) in round t of T. Personalization at
evaluation: fine-tuning from theta.
"""
from __future__ import annotations

from typing import ClassVar, Literal
from pydantic import Field

from metafed.aggregate.server_opt import ServerOptimizer
from metafed.algorithms.base import ServerState
from metafed.algorithms.fedavg import FedAvg
from metafed.algorithms.local_opt import LocalOptimizer, LocalSolverSection
from metafed.models import FunctionalModel


class Reptile(FedAvg):
    name = "reptile"
    paper = "Nichol et al. 2018 (arXiv:1803.02999)"

    def __init__(self, model: FunctionalModel, server_opt: ServerOptimizer, lr: float,
                 anneal_rounds: int | None = None, local_opt: LocalOptimizer | None = None):
        super().__init__(model, server_opt, lr, local_opt=local_opt)
        self.name = "reptile"
        self.anneal_rounds = anneal_rounds

    def step_scale(self, rnd: int) -> float:
        """The fraction of eps used in round ``rnd`` (1-based)."""
        if self.anneal_rounds is None:
            return 1.0
        return 1.0 - (rnd - 1) / self.anneal_rounds

    def server_update(self, state: ServerState, aggregate: dict, rnd: int) -> ServerState:
        params, opt_state = self.server_opt.step(state.params, aggregate["update"], state.opt_state,
                                                 self.step_scale(rnd))
        return ServerState(params, opt_state, state.extra)


class ReptileSection(LocalSolverSection):
    """Reptile's parameters."""

    FLAT: ClassVar[dict[str, str]] = {"anneal": "reptile_anneal"}

    name: Literal["reptile"] = "reptile"
    anneal: bool = Field(False, description="Reptile: anneal the server step eps linearly to 0 over the "
                                 "rounds (Nichol et al. 2018)")

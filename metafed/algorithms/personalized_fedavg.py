"""Personalized FedAvg: Jiang, Konecny, Rush, Kannan, "Improving Federated Learning
Personalization via Model Agnostic Meta Learning", 2019, arXiv:1909.12488.

Three stages (the paper's Section 3):

1. rounds 1..stage1_rounds: FedAvg with ``stage1_epochs`` local epochs; the server applies
   the configured server optimizer (the paper: SGD with momentum 0.9, i.e. FedAvgM).
2. the remaining rounds: Reptile. Clients run the configured local work (K local steps) and
   the server steps on the mean K-step delta with its own optimizer,
   ``--stage2-server-optimizer`` (the paper: Adam), whose state is kept apart from stage 1's.
3. at evaluation: local fine-tuning (``--personalize-steps`` SGD steps on the train split).

``protocol: paper`` sets server momentum 0.9 for stage 1 and Adam for stage 2; without it
both stages use the configured server optimizer.
"""
from __future__ import annotations

from typing import Literal, Optional
from pydantic import Field

from metafed.aggregate.server_opt import ServerOptimizer
from metafed.algorithms.base import ServerState
from metafed.algorithms.fedavg import FedAvg
from metafed.algorithms.local_opt import LocalOptimizer, LocalSolverSection
from metafed.models import FunctionalModel
from metafed.types import Params


class PersonalizedFedAvg(FedAvg):
    paper = "Jiang et al. 2019 (arXiv:1909.12488)"

    def __init__(self, model: FunctionalModel, server_opt: ServerOptimizer, stage2_opt: ServerOptimizer, lr: float,
                 stage1_rounds: int, stage1_epochs: int, local_opt: LocalOptimizer | None = None):
        super().__init__(model, server_opt, lr, local_opt=local_opt)
        self.name = "personalized-fedavg"
        self.stage2_opt = stage2_opt
        self.stage1_rounds, self.stage1_epochs = stage1_rounds, stage1_epochs

    def init(self, params: Params) -> ServerState:
        state = super().init(params)
        return ServerState(state.params, {**state.opt_state, **self.stage2_opt.init(params)}, state.extra)

    def local_work(self, rnd: int):
        return (self.stage1_epochs, None) if rnd <= self.stage1_rounds else None

    def server_update(self, state: ServerState, aggregate: dict, rnd: int) -> ServerState:
        opt = self.server_opt if rnd <= self.stage1_rounds else self.stage2_opt
        params, slots = opt.step(state.params, aggregate["update"], state.opt_state)
        others = {k: v for k, v in state.opt_state.items() if not opt.owns(k)}
        return ServerState(params, {**others, **slots}, state.extra)


class PersonalizedFedAvgSection(LocalSolverSection):
    """Personalized FedAvg's parameters."""

    name: Literal["personalized-fedavg"] = "personalized-fedavg"
    stage1_rounds: Optional[int] = Field(None, ge=0, description="Personalized FedAvg: FedAvg rounds (default rounds/2)")
    stage1_epochs: Optional[int] = Field(None, ge=1, description="Personalized FedAvg: local epochs in stage 1")
    stage2_server_optimizer: Optional[Literal["sgd", "adam", "yogi", "adagrad"]] = Field(
        None, description="Personalized FedAvg: the Reptile stage's server optimizer (default: --server-optimizer)")
    stage2_server_lr: Optional[float] = Field(None, gt=0, description="Personalized FedAvg: its learning rate "
                                              "(default: that optimizer's default)")

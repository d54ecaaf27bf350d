"""Personalized FedAvg: Jiang, Konecny, Rush, Kannan, "Improving Federated Learning
Personalization via Model Agnostic Meta Learning", 2019, arXiv:1909.12488.

Three stages: (1) FedAvg with many local epochs (rounds 1..stage1_rounds, stage1_epochs
each); (2) Reptile fine-tuning rounds: clients run the configured local work, the server
takes a step of size eps (the configured server optimizer, ``--server-lr`` = eps);
(3) local fine-tuning at evaluation (``--personalize-steps`` SGD steps on the train split).
"""
from __future__ import annotations

from metafed.aggregate.server_opt import ServerOptimizer
from metafed.algorithms.base import ServerState
from metafed.algorithms.fedavg import FedAvg
from metafed.models import FunctionalModel

_AVERAGE = ServerOptimizer("sgd", 1.0)


class PersonalizedFedAvg(FedAvg):
    paper = "Jiang et al. 2019 (arXiv:1909.12488)"

    def __init__(self, model: FunctionalModel, server_opt: ServerOptimizer, lr: float, stage1_rounds: int,
                 stage1_epochs: int):
        super().__init__(model, server_opt, lr)
        self.name = "personalized-fedavg"
        self.stage1_rounds, self.stage1_epochs = stage1_rounds, stage1_epochs

    def local_work(self, rnd: int):
        return (self.stage1_epochs, None) if rnd <= self.stage1_rounds else None

    def server_update(self, state: ServerState, aggregate: dict, rnd: int) -> ServerState:
        if rnd <= self.stage1_rounds:  # stage 1: plain FedAvg averaging, optimizer state untouched
            params, _ = _AVERAGE.step(state.params, aggregate["update"], {})
            return ServerState(params, state.opt_state, state.extra)
        return super().server_update(state, aggregate, rnd)

"""Client-side optimizers for the algorithms whose local solver is free (FedAvg, FedProx,
Reptile, Personalized FedAvg): plain SGD (the papers' choice and the default), SGD with
heavy-ball momentum, or Adam. Their state lives in the client program's carry, so it is
vmapped over clients like the parameters, and it starts from zero each round: clients
keep no optimizer state between rounds (a fresh ``torch.optim`` optimizer per round, as
FL libraries do). The update rules are ``torch.optim.SGD(momentum=m)`` (dampening 0, no
Nesterov) and ``torch.optim.Adam`` (with bias correction); tests check both against them.

The meta-learning methods (MAML, Meta-SGD, Per-FedAvg), pFedMe and Ditto keep their papers'
SGD steps: their inner updates are part of what they differentiate or analyse.
"""
from __future__ import annotations

from typing import Literal
from dataclasses import dataclass

import torch

from pydantic import Field

from metafed.types import Params
from metafed.section import Section

LOCAL_OPTIMIZERS = ("sgd", "momentum", "adam")


@dataclass(frozen=True)
class LocalOptimizer:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        if self.name not in LOCAL_OPTIMIZERS:
            raise ValueError(f"unknown local optimizer {self.name!r}; choose one of {', '.join(LOCAL_OPTIMIZERS)}")

    def init(self, params: Params) -> dict:
        if self.name == "sgd":
            return {}
        zeros = {k: torch.zeros_like(v) for k, v in params.items()}
        if self.name == "momentum":
            return {"m": zeros}
        return {"m": zeros, "v": {k: torch.zeros_like(v) for k, v in params.items()},
                "t": torch.zeros((), dtype=next(iter(params.values())).dtype)}

    def step(self, params: Params, g: Params, state: dict) -> tuple[Params, dict]:
        """One update of ``params`` with gradient ``g``; returns (params, state)."""
        if self.name == "sgd":  # exactly the operations FedAvg always ran
            return {k: v - self.lr * g[k] for k, v in params.items()}, state
        if self.name == "momentum":
            m = {k: self.momentum * state["m"][k] + g[k] for k in params}
            return {k: v - self.lr * m[k] for k, v in params.items()}, {"m": m}
        t = state["t"] + 1
        m = {k: self.beta1 * state["m"][k] + (1 - self.beta1) * g[k] for k in params}
        v = {k: self.beta2 * state["v"][k] + (1 - self.beta2) * g[k] * g[k] for k in params}
        step = self.lr / (1 - self.beta1 ** t)
        root_correction = torch.sqrt(1 - self.beta2 ** t)
        new = {k: p - step * m[k] / (v[k].sqrt() / root_correction + self.eps) for k, p in params.items()}
        return new, {"m": m, "v": v, "t": t}


class LocalSolverSection(Section):
    """The client optimizer of the algorithms whose local solver is free (FedAvg, FedProx,
    Reptile, Personalized FedAvg); the others keep their papers' SGD."""

    local_optimizer: Literal["sgd", "momentum", "adam"] = Field(
        "sgd", description="client optimizer of fedavg, fedprox, reptile and personalized-fedavg (state fresh each "
        "round; the other algorithms keep their papers' SGD)")
    local_momentum: float = Field(0.9, ge=0, lt=1, description="momentum of --local-optimizer momentum")

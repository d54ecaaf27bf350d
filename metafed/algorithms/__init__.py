"""Algorithm registry: CLI name -> (one-line description, paper, factory from a RunConfig)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from metafed.aggregate.server_opt import ServerOptimizer
from metafed.algorithms.base import FederatedAlgorithm, LocalProgram, ServerState
from metafed.algorithms.fedavg import FedAvg
from metafed.models import FunctionalModel

if TYPE_CHECKING:
    from metafed.config import RunConfig


@dataclass(frozen=True)
class AlgorithmSpec:
    summary: str
    paper: str
    build: Callable[["RunConfig", FunctionalModel, ServerOptimizer], FederatedAlgorithm]


def server_optimizer(cfg: "RunConfig", lr: float | None = None) -> ServerOptimizer:
    return ServerOptimizer(cfg.server_optimizer, lr if lr is not None else cfg.server_lr, cfg.server_momentum,
                           cfg.server_beta1, cfg.server_beta2, cfg.server_tau)


ALGORITHMS: dict[str, AlgorithmSpec] = {
    "fedavg": AlgorithmSpec(
        "local SGD, sample-weighted averaging; --server-optimizer adam|yogi, --server-momentum for FedAvgM",
        "McMahan et al., AISTATS 2017, arXiv:1602.05629",
        lambda cfg, model, opt: FedAvg(model, opt, cfg.lr, 0.0)),
    "fedprox": AlgorithmSpec(
        "FedAvg with the proximal term mu/2 ||w - w_global||^2 (--mu); keeps stragglers' partial work",
        "Li et al., MLSys 2020, arXiv:1812.06127",
        lambda cfg, model, opt: FedAvg(model, opt, cfg.lr, cfg.mu)),
}


def make_algorithm(cfg: "RunConfig", model: FunctionalModel) -> FederatedAlgorithm:
    if cfg.algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {cfg.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[cfg.algorithm].build(cfg, model, server_optimizer(cfg))


__all__ = ["ALGORITHMS", "AlgorithmSpec", "FederatedAlgorithm", "LocalProgram", "ServerState", "make_algorithm",
           "server_optimizer"]

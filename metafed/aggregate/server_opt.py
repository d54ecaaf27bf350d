"""Server optimizers: apply the aggregated client delta Delta (mean of local - global).

The pseudo-gradient is -Delta (Reddi et al., "Adaptive Federated Optimization", ICLR 2021,
arXiv:2003.00295, Algorithm 2):

- sgd:  x <- x + lr * m,  m <- momentum * m + Delta  (FedAvg at lr 1, momentum 0; FedAvgM; Reptile's eps)
- adam: m <- b1 m + (1 - b1) Delta;  v <- b2 v + (1 - b2) Delta^2;             x <- x + lr m / (sqrt(v) + tau)
- yogi: m as adam;                   v <- v - (1 - b2) Delta^2 sign(v - Delta^2); x <- x + lr m / (sqrt(v) + tau)
- adagrad: m as adam;                v <- v + Delta^2;                            x <- x + lr m / (sqrt(v) + tau)

As in the paper there is no bias correction and v starts at tau^2. Default server learning
rates follow the paper's tuned ranges (its Figure 3 and Appendix D: the best eta for the
adaptive methods lies near 1e-2 for Adam and Yogi and 1e-1 for Adagrad, with tau = 1e-3);
plain averaging is sgd at 1.0. An adaptive step moves each coordinate by about lr per
round, so 1.0 there throws the model away: lrs far above the default are warned about.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from metafed.types import Params, TensorDict

if TYPE_CHECKING:
    from metafed.config import RunConfig

log = logging.getLogger("metafed")

SERVER_OPTIMIZERS = ("sgd", "adam", "yogi", "adagrad")
DEFAULT_SERVER_LR = {"sgd": 1.0, "adam": 1e-2, "yogi": 1e-2, "adagrad": 1e-1}


def default_server_lr(name: str) -> float:
    if name not in DEFAULT_SERVER_LR:
        raise ValueError(f"unknown server optimizer {name!r}; choose one of {', '.join(SERVER_OPTIMIZERS)}")
    return DEFAULT_SERVER_LR[name]


@dataclass(frozen=True)
class ServerOptimizer:
    name: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    prefix: str = ""  # names the state of a second optimizer in the same server state

    def __post_init__(self):
        if self.name not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {self.name!r}; choose one of {', '.join(SERVER_OPTIMIZERS)}")

    def init(self, params: Params) -> TensorDict:
        m, v = f"{self.prefix}m.", f"{self.prefix}v."
        if self.name == "sgd":
            return {m + k: torch.zeros_like(p) for k, p in params.items()} if self.momentum else {}
        state = {m + k: torch.zeros_like(p) for k, p in params.items()}
        state.update({v + k: torch.full_like(p, self.tau ** 2) for k, p in params.items()})
        return state

    def owns(self, key: str) -> bool:
        """Is ``key`` a slot of this optimizer's state?"""
        return key.startswith((f"{self.prefix}m.", f"{self.prefix}v."))

    def step(self, params: Params, delta: Params, state: TensorDict, lr_scale: float = 1.0) -> tuple[Params, TensorDict]:
        """One server step; ``lr_scale`` multiplies the learning rate (a schedule, e.g.
        Reptile's annealing). Returns the new params and this optimizer's new state."""
        lr = self.lr * lr_scale
        m_, v_ = f"{self.prefix}m.", f"{self.prefix}v."
        new_params, new_state = {}, {}
        for k, x in params.items():
            d = delta[k]
            if self.name == "sgd":
                if self.momentum:
                    d = self.momentum * state[m_ + k] + d
                    new_state[m_ + k] = d
                new_params[k] = x + lr * d
                continue
            m = self.beta1 * state[m_ + k] + (1 - self.beta1) * d
            d2 = d * d
            v = state[v_ + k]
            if self.name == "adam":
                v = self.beta2 * v + (1 - self.beta2) * d2
            elif self.name == "yogi":
                v = v - (1 - self.beta2) * d2 * torch.sign(v - d2)
            else:  # adagrad
                v = v + d2
            new_state[m_ + k], new_state[v_ + k] = m, v
            new_params[k] = x + lr * m / (v.sqrt() + self.tau)
        return new_params, new_state


def server_optimizer(cfg: "RunConfig", name: str | None = None, lr: float | None = None,
                     prefix: str = "") -> ServerOptimizer:
    """The server optimizer ``name`` (default: the config's) at ``lr`` (default: the config's
    --server-lr when it is the config's optimizer, else the optimizer's default); warns when the rate is far above the
    optimizer's default (adaptive steps move every coordinate by about lr per round)."""
    name = name or cfg.server_optimizer
    if lr is None and name == cfg.server_optimizer:
        lr = cfg.server_lr
    lr = lr if lr is not None else default_server_lr(name)
    if lr > 10 * DEFAULT_SERVER_LR[name]:
        log.warning("server learning rate %g is over 10x the %s default %g: adaptive server optimizers move "
                    "every coordinate by about lr per round, so training may collapse", lr, name,
                    DEFAULT_SERVER_LR[name])
    return ServerOptimizer(name, lr, cfg.server_momentum if name == "sgd" else 0.0, cfg.server_beta1,
                           cfg.server_beta2, cfg.server_tau, prefix)

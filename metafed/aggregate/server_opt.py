"""Server optimizers: apply the aggregated client delta Delta (mean of local - global).

The pseudo-gradient is -Delta (Reddi et al., "Adaptive Federated Optimization", ICLR 2021,
arXiv:2003.00295, Algorithm 2):

- sgd:  x <- x + lr * m,  m <- momentum * m + Delta  (FedAvg at lr 1, momentum 0; FedAvgM; Reptile's eps)
- adam: m <- b1 m + (1 - b1) Delta;  v <- b2 v + (1 - b2) Delta^2;             x <- x + lr m / (sqrt(v) + tau)
- yogi: m as adam;                   v <- v - (1 - b2) Delta^2 sign(v - Delta^2); x <- x + lr m / (sqrt(v) + tau)

As in the paper there is no bias correction and v starts at tau^2.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from metafed.types import Params, TensorDict

SERVER_OPTIMIZERS = ("sgd", "adam", "yogi")


@dataclass(frozen=True)
class ServerOptimizer:
    name: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self):
        if self.name not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {self.name!r}; choose one of {', '.join(SERVER_OPTIMIZERS)}")

    def init(self, params: Params) -> TensorDict:
        if self.name == "sgd":
            return {f"m.{k}": torch.zeros_like(v) for k, v in params.items()} if self.momentum else {}
        state = {f"m.{k}": torch.zeros_like(v) for k, v in params.items()}
        state.update({f"v.{k}": torch.full_like(v, self.tau ** 2) for k, v in params.items()})
        return state

    def step(self, params: Params, delta: Params, state: TensorDict) -> tuple[Params, TensorDict]:
        new_params, new_state = {}, {}
        for k, x in params.items():
            d = delta[k]
            if self.name == "sgd":
                if self.momentum:
                    d = self.momentum * state[f"m.{k}"] + d
                    new_state[f"m.{k}"] = d
                new_params[k] = x + self.lr * d
                continue
            m = self.beta1 * state[f"m.{k}"] + (1 - self.beta1) * d
            d2 = d * d
            v = state[f"v.{k}"]
            if self.name == "adam":
                v = self.beta2 * v + (1 - self.beta2) * d2
            else:
                v = v - (1 - self.beta2) * d2 * torch.sign(v - d2)
            new_state[f"m.{k}"], new_state[f"v.{k}"] = m, v
            new_params[k] = x + self.lr * m / (v.sqrt() + self.tau)
        return new_params, new_state

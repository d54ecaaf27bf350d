"""Linear aggregators over stacked client updates [C, ...] with weights [C]."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metafed import tree


@dataclass(frozen=True)
class WeightedMean:
    """sum_c w_c u_c / sum_c w_c with w_c the client's sample count (FedAvg's rule)."""

    name: str = "mean"
    linear: bool = True

    def weights(self, updates: dict, num_samples: Tensor, client_loss: Tensor | None = None) -> Tensor:
        return num_samples.to(torch.float64) / num_samples.sum()

    def __call__(self, updates: dict, num_samples: Tensor, client_loss: Tensor | None = None) -> dict:
        w = self.weights(updates, num_samples, client_loss)
        return tree.nested_map(lambda v: torch.tensordot(w.to(v.dtype), v, dims=1), updates)

"""Linear aggregators over stacked client updates [C, ...] with weights [C], and the cap on
client-reported sample counts."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metafed import tree


class RoundSkipped(RuntimeError):
    """An aggregator cannot produce a safe update this round (too few clients for its rule,
    no valid score); the round loop logs it and leaves the model unchanged."""


def cap_sample_weights(reported: Tensor, median_multiple: float | None, absolute: float | None = None) -> Tensor:
    """Weights from client-reported sample counts [C], capped so that one client that claims
    1e9 samples cannot become the mean: w_i = min(n_i, k * median(n), absolute cap).

    The median is robust while fewer than half of a round's clients lie. ``median_multiple``
    k = None or 0 turns the relative cap off; ``absolute`` None turns the absolute one off."""
    w = reported.to(torch.float64)
    if median_multiple:
        w = w.clamp(max=median_multiple * float(w.median()))
    if absolute is not None:
        w = w.clamp(max=absolute)
    return w


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

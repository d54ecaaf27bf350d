"""Attention aggregation: client weights alpha_i = softmax(s_i / temperature).

Scores: ``loss`` uses s_i = -(client's validation loss, or its training loss when the
algorithm reports none), so clients whose model fits held-back data better weigh more;
``cosine`` uses s_i = cos(update_i, mean update), down-weighting clients that pull away
from the consensus (in the spirit of FedAtt, Ji et al. 2019, arXiv:1812.07108, which
weighs clients by their distance to the server model).
The weights depend on individual updates, so the rule is not linear in them: it cannot run
after secure-aggregation masking.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metafed import tree

ATTENTION_SCORES = ("loss", "cosine")


@dataclass(frozen=True)
class Attention:
    score: str = "loss"
    temperature: float = 1.0
    name: str = "attention"
    linear: bool = False

    def __post_init__(self):
        if self.score not in ATTENTION_SCORES:
            raise ValueError(f"unknown attention score {self.score!r}; choose one of {', '.join(ATTENTION_SCORES)}")
        if not self.temperature > 0:
            raise ValueError(f"attention temperature must be > 0, got {self.temperature}")

    def scores(self, updates: dict, client_loss: Tensor) -> Tensor:
        if self.score == "loss":
            return -client_loss.to(torch.float64)
        flat = torch.cat([v.reshape(v.shape[0], -1) for v in tree.nested_leaves(updates["update"])], dim=1)
        flat = flat.to(torch.float64)  # [C, D]
        return torch.nn.functional.cosine_similarity(flat, flat.mean(0, keepdim=True), dim=1)

    def weights(self, updates: dict, num_samples: Tensor, client_loss: Tensor) -> Tensor:
        return torch.softmax(self.scores(updates, client_loss) / self.temperature, dim=0)

    def __call__(self, updates: dict, num_samples: Tensor, client_loss: Tensor) -> dict:
        w = self.weights(updates, num_samples, client_loss)
        return tree.nested_map(lambda v: torch.tensordot(w.to(v.dtype), v, dims=1), updates)

"""Attention aggregation: client weights alpha_i = softmax(s_i / temperature).

Scores: ``loss`` uses s_i = -(client's validation loss, or its training loss when the
algorithm reports none), so clients whose model fits held-back data better weigh more;
``cosine`` uses s_i = cos(update_i, mean update), down-weighting clients that pull away
from the consensus (in the spirit of FedAtt, Ji et al. 2019, arXiv:1812.07108, which
weighs clients by their distance to the server model); ``labels`` uses
s_i = cos(p_i, p), the similarity of the client's label distribution p_i to the cohort's
pooled one p.

Which score fits which algorithm: ``loss`` rewards clients whose data is easy to fit, a
single-class client most of all (its training loss goes to 0), so it suits algorithms that
report a held-out validation loss (the meta-updater's meta-loss on its validation part) far
better than those that report a training loss. ``labels`` cannot be won by easy or
single-class clients: a client counts more the more its labels look like the federation's,
whatever the algorithm; it reveals each client's label counts to the server (sent once, at
registration in deployment), so it is refused under DP. ``cosine`` needs no report at all
and works under local DP.
The weights depend on individual updates, so the rule is not linear in them: it cannot run
after secure-aggregation masking.

Attention is NOT a Byzantine defence: clients report their own losses. A reported loss
that is not finite or is negative (cross-entropy never is) is rejected (weight 0, logged),
and accepted losses are clipped to [0, LOSS_CAP], so no report can take more than the
weight of a perfect fit; but a liar claiming loss 0 still out-weighs honest clients. Use a
robust rule (median, centered-clipping, ...) against malicious clients.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from metafed import tree
from metafed.aggregate.mean import RoundSkipped

ATTENTION_SCORES = ("loss", "cosine", "labels")
LOSS_CAP = 50.0  # losses above this carry no further information for the softmax
log = logging.getLogger("metafed")


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

    @property
    def needs_label_counts(self) -> bool:
        return self.score == "labels"

    def scores(self, updates: dict, client_loss: Tensor | None, label_counts: Tensor | None = None) -> Tensor:
        """[C] scores; NaN marks a client whose report is rejected. ``label_counts`` [C, K]:
        each client's training samples per class (score ``labels``)."""
        if self.score == "labels":
            if label_counts is None:
                raise ValueError("attention --attention-score labels needs the clients' label counts")
            counts = label_counts.to(torch.float64)
            dist = counts / counts.sum(1, keepdim=True).clamp_min(1.0)  # [C, K]
            pooled = counts.sum(0, keepdim=True)  # [1, K]
            return torch.nn.functional.cosine_similarity(dist, pooled, dim=1)  # in [0, 1]
        if self.score == "loss":
            if client_loss is None:
                raise ValueError("attention --attention-score loss needs the clients' losses (not sent under local DP)")
            loss = client_loss.to(torch.float64)
            valid = torch.isfinite(loss) & (loss >= 0)
            return torch.where(valid, -loss.clamp(0, LOSS_CAP), torch.full_like(loss, float("nan")))
        flat = torch.cat([v.reshape(v.shape[0], -1) for v in tree.nested_leaves(updates["update"])], dim=1)
        flat = flat.to(torch.float64)  # [C, D]
        return torch.nn.functional.cosine_similarity(flat, flat.mean(0, keepdim=True), dim=1)  # in [-1, 1]

    def weights(self, updates: dict, num_samples: Tensor, client_loss: Tensor | None,
                label_counts: Tensor | None = None) -> Tensor:
        s = self.scores(updates, client_loss, label_counts)
        bad = ~torch.isfinite(s)
        for i in torch.nonzero(bad).flatten().tolist():
            log.warning("attention: rejected client row %d: its score is not finite (reported loss %s)", i,
                        None if client_loss is None else float(client_loss[i]))
        if bool(bad.all()):
            raise RoundSkipped("attention: no client has a valid score")
        return torch.softmax(torch.where(bad, torch.full_like(s, -torch.inf), s) / self.temperature, dim=0)

    def __call__(self, updates: dict, num_samples: Tensor, client_loss: Tensor,
                 label_counts: Tensor | None = None) -> dict:
        w = self.weights(updates, num_samples, client_loss, label_counts)
        return tree.nested_map(lambda v: torch.tensordot(w.to(v.dtype), v, dims=1), updates)

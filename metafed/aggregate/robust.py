"""Byzantine-robust aggregators over stacked client messages flattened to [C, D].

Robust rules treat clients equally (sample counts are ignored: a Byzantine client could lie
about them) and are non-linear, so none of them can run after secure aggregation.

- median: coordinate-wise median (Yin et al., ICML 2018, arXiv:1803.01498).
- trimmed-mean: per coordinate drop the f largest and f smallest, average the rest (Yin et al. 2018).
- krum / multi-krum: Blanchard et al., NeurIPS 2017. Score = sum of squared distances to
  the n - f - 2 nearest others; Krum picks the best, Multi-Krum averages the m best. n >= 2f + 3.
- bulyan: El Mhamdi et al., ICML 2018, arXiv:1802.07927. Select n - 2f updates by repeated
  Krum, then per coordinate average the n - 4f values closest to the median. n >= 4f + 3.
- centered-clipping: Karimireddy, He, Jaggi, ICML 2021, arXiv:2012.10333.
  v <- v + mean_i clip(x_i - v, tau), a few iterations from the coordinate median.
- fltrust: Cao et al., NDSS 2021, arXiv:2012.13995. The server trains on a small clean root
  dataset; trust_i = ReLU(cos(x_i, g0)); each x_i is rescaled to ||g0||; weighted mean.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metafed import tree
from metafed.tree import flatten_messages, unflatten_message
from metafed.aggregate.mean import RoundSkipped

ROBUST_AGGREGATORS = ("median", "trimmed-mean", "krum", "multi-krum", "bulyan", "centered-clipping", "fltrust")


def coordinate_median(x: Tensor) -> Tensor:
    """Exact per-coordinate median of [C, D] (mean of the two middle values for even C)."""
    s = x.sort(dim=0).values
    c = x.shape[0]
    return s[c // 2] if c % 2 else 0.5 * (s[c // 2 - 1] + s[c // 2])


def trimmed_mean(x: Tensor, f: int) -> Tensor:
    if x.shape[0] <= 2 * f:
        raise RoundSkipped(f"trimmed mean with f={f} needs more than {2 * f} clients, got {x.shape[0]}")
    s = x.sort(dim=0).values
    return s[f: x.shape[0] - f].mean(0)


def krum_scores(x: Tensor, f: int) -> Tensor:
    """Krum score per client: sum of squared distances to its n - f - 2 nearest neighbours."""
    n = x.shape[0]
    d2 = torch.cdist(x, x).pow(2)  # [C, C]
    d2.fill_diagonal_(float("inf"))
    return d2.sort(dim=1).values[:, : n - f - 2].sum(1)


def required_clients(rule: str, f: int) -> int:
    """Fewest updates ``rule`` can combine while tolerating f Byzantine clients."""
    return {"krum": 2 * f + 3, "multi-krum": 2 * f + 3, "bulyan": 4 * f + 3, "trimmed-mean": 2 * f + 1}.get(rule, 1)


def _check(n: int, f: int, need: int, rule: str, formula: str) -> None:
    if f < 0 or n < need:
        raise RoundSkipped(f"{rule} needs n >= {formula} clients; got n={n}, f={f}")


@dataclass(frozen=True)
class RobustAggregator:
    name: str
    f: int = 0  # Byzantine clients tolerated
    multi_krum_m: int | None = None
    clip_tau: float = 1.0
    clip_iters: int = 3
    linear: bool = False
    needs_reference: bool = False

    def __post_init__(self):
        if self.name not in ROBUST_AGGREGATORS:
            raise ValueError(f"unknown aggregator {self.name!r}; choose one of {', '.join(ROBUST_AGGREGATORS)}")
        object.__setattr__(self, "needs_reference", self.name == "fltrust")

    def required_clients(self) -> int:
        return required_clients(self.name, self.f)

    def combine(self, x: Tensor, reference: Tensor | None = None) -> Tensor:
        """[C, D] -> [D]."""
        n, f = x.shape[0], self.f
        if self.name == "median":
            return coordinate_median(x)
        if self.name == "trimmed-mean":
            return trimmed_mean(x, f)
        if self.name in ("krum", "multi-krum"):
            _check(n, f, self.required_clients(), self.name, "2f + 3")
            m = 1 if self.name == "krum" else (self.multi_krum_m or n - f)
            return x[krum_scores(x, f).argsort()[:m]].mean(0)
        if self.name == "bulyan":
            _check(n, f, self.required_clients(), "bulyan", "4f + 3")
            remaining = list(range(n))
            selected = []
            while len(selected) < n - 2 * f:
                sub = x[remaining]
                best = int(krum_scores(sub, f).argmin()) if len(remaining) > f + 2 else 0
                selected.append(remaining.pop(best))
            chosen = x[selected]  # [n - 2f, D]
            beta = len(selected) - 2 * f
            med = coordinate_median(chosen)
            closest = (chosen - med).abs().argsort(dim=0)[:beta]  # [beta, D]
            return torch.gather(chosen, 0, closest).mean(0)
        if self.name == "centered-clipping":
            v = coordinate_median(x)
            for _ in range(self.clip_iters):
                diff = x - v
                scale = torch.clamp(self.clip_tau / diff.norm(dim=1, keepdim=True).clamp_min(1e-12), max=1.0)
                v = v + (diff * scale).mean(0)
            return v
        # fltrust
        if reference is None:
            raise ValueError("fltrust needs the server's reference update on its root dataset")
        ref_norm = reference.norm().clamp_min(1e-12)
        trust = torch.relu(torch.nn.functional.cosine_similarity(x, reference[None], dim=1))  # [C]
        if trust.sum() <= 0:
            return torch.zeros_like(reference)
        rescaled = x * (ref_norm / x.norm(dim=1).clamp_min(1e-12))[:, None]
        return (trust[:, None] * rescaled).sum(0) / trust.sum()

    def __call__(self, updates: dict, num_samples: Tensor, client_loss: Tensor | None = None,
                 reference: dict | None = None) -> dict:
        x, layout = flatten_messages(updates)
        ref = flatten_messages(tree.nested_map(lambda v: v[None], reference))[0][0] if reference is not None else None
        dtype = tree.nested_leaves(updates)[0].dtype
        return unflatten_message(self.combine(x, ref), layout, dtype)

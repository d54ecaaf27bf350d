"""Aggregators (stacked updates -> one update) and server optimizers."""
from metafed.aggregate.attention import ATTENTION_SCORES, Attention
from metafed.aggregate.mean import RoundSkipped, WeightedMean, cap_sample_weights
from metafed.aggregate.robust import ROBUST_AGGREGATORS, RobustAggregator
from metafed.aggregate.server_opt import SERVER_OPTIMIZERS, ServerOptimizer

AGGREGATORS = ("mean", "attention", *ROBUST_AGGREGATORS)


def make_aggregator(name: str, attention_score: str = "loss", temperature: float = 1.0, byzantine_f: int = 0,
                    clip_tau: float = 1.0):
    if name == "mean":
        return WeightedMean()
    if name == "attention":
        return Attention(attention_score, temperature)
    if name in ROBUST_AGGREGATORS:
        return RobustAggregator(name, byzantine_f, clip_tau=clip_tau)
    raise ValueError(f"unknown aggregator {name!r}; choose one of {', '.join(AGGREGATORS)}")


__all__ = ["RoundSkipped", "cap_sample_weights", "Attention", "RobustAggregator", "ROBUST_AGGREGATORS", "WeightedMean", "ServerOptimizer", "SERVER_OPTIMIZERS", "AGGREGATORS", "ATTENTION_SCORES",
           "make_aggregator"]

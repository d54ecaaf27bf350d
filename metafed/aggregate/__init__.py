"""Aggregators (stacked updates -> one update) and server optimizers."""
from metafed.aggregate.attention import ATTENTION_SCORES, Attention
from metafed.aggregate.mean import WeightedMean
from metafed.aggregate.server_opt import SERVER_OPTIMIZERS, ServerOptimizer

AGGREGATORS = ("mean", "attention")


def make_aggregator(name: str, attention_score: str = "loss", temperature: float = 1.0):
    if name == "mean":
        return WeightedMean()
    if name == "attention":
        return Attention(attention_score, temperature)
    raise ValueError(f"unknown aggregator {name!r}; choose one of {', '.join(AGGREGATORS)}")


__all__ = ["Attention", "WeightedMean", "ServerOptimizer", "SERVER_OPTIMIZERS", "AGGREGATORS", "ATTENTION_SCORES",
           "make_aggregator"]

"""Aggregators (stacked updates -> one update) and server optimizers."""
from metafed.aggregate.mean import WeightedMean
from metafed.aggregate.server_opt import SERVER_OPTIMIZERS, ServerOptimizer

__all__ = ["WeightedMean", "ServerOptimizer", "SERVER_OPTIMIZERS"]

"""Where clients live. The round loop (``federation.py``) talks to clients only through a
:class:`~metafed.pools.base.ClientPool`: the simulation pool runs them in this process over
a ``FederatedDataset``; the Flower pool (``metafed.deploy``) sends Messages to SuperNodes."""
from metafed.pools.base import ClientPool, RoundReplies, zero_rows
from metafed.pools.simulation import SimulationPool

__all__ = ["ClientPool", "RoundReplies", "SimulationPool", "zero_rows"]

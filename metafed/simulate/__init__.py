"""Everything a deployment refuses because it is simulated client behaviour: attacks and
free-riders (:mod:`~metafed.simulate.faults`). Dropouts and stragglers live in the
simulation pool, client speeds in the async clock."""
from metafed.simulate.faults import SimulatedFaults

__all__ = ["SimulatedFaults"]

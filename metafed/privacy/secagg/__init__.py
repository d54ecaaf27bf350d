"""Secure aggregation (SecAgg, SecAgg+) with dropout recovery, identity keys and a
per-round client state machine; see ``protocol``."""
from metafed.privacy.secagg.client import SecAggClient
from metafed.privacy.secagg.protocol import SecAggAbort, SecAggConfig
from metafed.privacy.secagg.server import SecAggServer
from metafed.privacy.secagg.quantize import FixedPoint, QuantizationRangeError
from metafed.privacy.secagg.simulate import STAGES, SecAggResult, identities, secure_sum, secure_sum_encoded, setup

__all__ = ["SecAggAbort", "SecAggClient", "SecAggConfig", "SecAggServer", "FixedPoint", "QuantizationRangeError",
           "STAGES", "SecAggResult", "identities", "secure_sum", "secure_sum_encoded", "setup"]

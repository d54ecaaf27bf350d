"""Secure aggregation (SecAgg, SecAgg+) with dropout recovery; see ``protocol``."""
from metafed.privacy.secagg.protocol import SecAggAbort, SecAggConfig
from metafed.privacy.secagg.quantize import FixedPoint, QuantizationRangeError
from metafed.privacy.secagg.simulate import STAGES, SecAggResult, secure_sum, secure_sum_encoded

__all__ = ["SecAggAbort", "SecAggConfig", "FixedPoint", "QuantizationRangeError", "STAGES", "SecAggResult",
           "secure_sum", "secure_sum_encoded"]

"""Type aliases shared by every layer of metafed."""
from __future__ import annotations

from torch import Tensor

# Model parameters keyed by state_dict names. Unbatched: each tensor has the module's shape.
# Stacked (vectorized backend): each tensor gains a leading client axis [C, ...].
Params = dict[str, Tensor]

# Any flat mapping name -> tensor that crosses an API boundary (broadcasts, client state,
# client outputs). Same layout rules as Params.
TensorDict = dict[str, Tensor]

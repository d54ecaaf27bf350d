"""What moves along the server's aggregation chain, and the contract of a stage."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from metafed.privacy.noise import PrivacyRandom
from metafed.privacy.upload import UploadTransform
from metafed.types import TensorDict


@dataclass
class Flow:
    """One round's replies on their way through the chain.

    ``rows`` are the accepted uploads stacked [C, ...] in the clear, or None where they stay
    on the clients until the secure sum masks them; ``weights`` [C] the capped sample weights;
    ``losses`` [C] what loss-scored rules read. A summing stage fills ``total`` (and ``count``,
    the sum of the centred clipping bits); the stage that finishes the chain fills ``result``.
    ``clip`` is the norm the clients' uploads are bounded by this round (announced by the
    stage that owns it in :meth:`ServerStage.prepare`), ``count_bit`` whether clients also
    send their clipping bit."""

    ids: list[int]
    rows: dict | None
    weights: Tensor | None
    losses: Tensor | None
    clip: float | None = None
    count_bit: bool = False
    total: dict | None = None
    count: float = 0.0
    result: dict | None = None


@dataclass
class RoundContext:
    """What a stage may ask of the round it runs in, without seeing the round driver:
    ``secure_sum(transform, weighting) -> (sum, survivors)`` runs the pool's protocol over the
    round's cohort; ``empty_message()`` is a zero-row upload (to release noise in a round
    without replies); ``root_update()`` the server's own update on its root set (FLTrust);
    ``label_counts(ids)`` the clients' label histograms; ``privacy_random(stream)`` the
    round's privacy randomness. ``metrics`` is the round's row: stages add to it."""

    rnd: int
    metrics: dict
    secure_sum: Callable[[UploadTransform, str | None], tuple[dict, list[int]]]
    empty_message: Callable[[], dict]
    root_update: Callable[[], dict]
    label_counts: Callable[[list[int]], Tensor]
    privacy_random: Callable[[int], PrivacyRandom]


class ServerStage(ABC):
    """One server stage. Class attributes say what the chain may assume of it:

    - ``slot``: the name of its own slot in ``ServerState.stages`` (None: stateless);
    - ``linear``: its output is linear in each client's upload (a sum or a fixed-weight mean);
      only linear stages may follow a secure sum, which reveals nothing but the sum;
    - ``secure``: its output is a secure sum (no single upload is visible after it);
    - ``bounds_norm``: its output is a sum of uploads clipped to ``flow.clip``;
    - ``needs_bounded``: it calibrates to a norm bound, so a ``bounds_norm`` stage must come
      before it (central DP noise).
    """

    slot: str | None = None
    linear: bool = True
    secure: bool = False
    bounds_norm: bool = False
    needs_bounded: bool = False

    def initial_slot(self) -> TensorDict:
        """The stage's state before the first round (a checkpoint restores it afterwards)."""
        return {}

    def prepare(self, flow: Flow, slot: TensorDict) -> Flow:
        """Before any stage applies: announce what the clients' own stages need from this
        stage's state (the clip norm). Default: nothing."""
        return flow

    @abstractmethod
    def apply(self, flow: Flow, ctx: RoundContext, slot: TensorDict) -> tuple[Flow, TensorDict]:
        """Transform the flow; returns it with this stage's new slot."""

    @property
    def label(self) -> str:
        return type(self).__name__

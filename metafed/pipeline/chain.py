"""The chain of server stages, checked when built, and the one function that builds it
from a config. A new DP-like feature is one stage file, its config keys and one line in
:func:`build_chain`; the round driver only calls :meth:`Chain.run`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from metafed.pipeline.flow import Flow, RoundContext, ServerStage
from metafed.pipeline.stages import CentralNoise, ClippedSum, DivideByWeight, Gate, LocalDPReport, Rule, SecureSum
from metafed.types import TensorDict

if TYPE_CHECKING:
    from metafed.config import RunConfig
    from metafed.privacy.dp import ClientDP


class ChainError(ValueError):
    """A chain whose order would break what a stage assumes (one line, naming the stages)."""


@dataclass(frozen=True)
class Chain:
    """Server stages in order. Building it refuses:

    - a non-linear stage after a secure sum (the sum is all the server may see);
    - a stage that calibrates to a norm bound (central noise) without a clipping sum before it;
    - an encoder on the clients (``client_encoder``) before a secure sum, which adds dense
      fixed-point vectors: a top-k or quantized upload is not that.
    """

    stages: tuple[ServerStage, ...]
    client_encoder: str | None = None

    def __post_init__(self):
        secure = next((s for s in self.stages if s.secure), None)
        if secure is not None and self.client_encoder is not None:
            raise ChainError(f"client encoder {self.client_encoder!r} before {secure.label}: the secure sum adds "
                             "dense fixed-point vectors, not encoded uploads")
        seen_secure, bounded = None, False
        for stage in self.stages:
            if seen_secure is not None and not stage.linear:
                raise ChainError(f"{stage.label} is not linear: it cannot run after {seen_secure.label}, which "
                                 "reveals only the sum")
            if stage.needs_bounded and not bounded:
                raise ChainError(f"{stage.label} calibrates to a norm bound: a clipping sum must come before it")
            bounded = bounded or stage.bounds_norm
            if stage.secure:
                seen_secure = stage
        slots = [s.slot for s in self.stages if s.slot is not None]
        if len(slots) != len(set(slots)):
            raise ChainError(f"two stages share a state slot: {sorted(slots)}")

    def initial_slots(self) -> dict[str, TensorDict]:
        return {s.slot: s.initial_slot() for s in self.stages if s.slot is not None}

    def run(self, flow: Flow, ctx: RoundContext, slots: dict[str, TensorDict]) -> tuple[dict, dict[str, TensorDict]]:
        """The round's aggregate and the stages' new slots. Raises RoundSkipped (and the secure
        sum's SecAggAbort) when the round cannot commit; the slots are then unchanged."""
        slots = {**self.initial_slots(), **slots}
        for stage in self.stages:
            if stage.slot is not None:
                flow = stage.prepare(flow, slots[stage.slot])
        new = dict(slots)
        for stage in self.stages:
            flow, slot = stage.apply(flow, ctx, new.get(stage.slot, {}))
            if stage.slot is not None:
                new[stage.slot] = slot
        if flow.result is None:
            raise ChainError("the chain ended without an aggregate: its last stages only summed")
        return flow.result, new


def build_chain(cfg: "RunConfig", dp: "ClientDP | None", rule: object, client_encoder: str | None = None) -> Chain:
    """The server stages a config asks for, in order:

    - central DP: gate (an empty round still releases), clipped sum (secure or in the
      clear), central noise;
    - local DP: gate, the clients' report, then the uniform mean (secure, or the rule);
    - secure aggregation: gate, secure sum with each client's own weight, division;
    - otherwise: gate, the configured rule."""
    secure = cfg.secure_aggregation
    if dp is not None and dp.mode == "central":
        summing = SecureSum() if secure else ClippedSum()
        stages = (Gate(cfg.min_clients, release_empty=True), summing, CentralNoise(dp, cfg.dp_clip))
    elif dp is not None:
        mean = (SecureSum("uniform"), DivideByWeight()) if secure else (Rule(rule, uniform=True),)
        stages = (Gate(cfg.min_clients), LocalDPReport(cfg.dp_clip), *mean)
    elif secure:
        stages = (Gate(cfg.min_clients), SecureSum(cfg.weighting), DivideByWeight())
    else:
        stages = (Gate(cfg.min_clients), Rule(rule))
    return Chain(stages, client_encoder)

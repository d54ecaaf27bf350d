"""The server stages metafed ships. Each is a small frozen dataclass; :func:`metafed.pipeline.
chain.build_chain` puts them in order from the config."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from metafed import tree
from metafed.aggregate.mean import RoundSkipped
from metafed.pipeline.flow import Flow, RoundContext, ServerStage
from metafed.privacy.dp import ClientDP, centred_count, clip_each
from metafed.privacy.upload import UploadTransform
from metafed.types import TensorDict

# the round's privacy randomness stream of the central noise (kept from the round loop it came from)
CENTRAL_NOISE_STREAM = 7


@dataclass(frozen=True)
class Gate(ServerStage):
    """A round commits only with at least ``min_clients`` valid replies (``--min-clients``).
    With ``release_empty`` (central DP) a round with no reply at all still goes on: the
    noise of a sampled round is released whatever happened (Poisson sampling may be empty)."""

    min_clients: int = 1
    release_empty: bool = False

    def apply(self, flow: Flow, ctx: RoundContext, slot: TensorDict) -> tuple[Flow, TensorDict]:
        n = len(flow.ids)
        if n < self.min_clients and (n or not self.release_empty):
            raise RoundSkipped(f"{n} valid replies, fewer than --min-clients {self.min_clients}")
        return flow, slot


@dataclass(frozen=True)
class Rule(ServerStage):
    """The configured aggregation rule over the uploads in the clear: the weighted mean,
    attention, or a robust rule (:mod:`metafed.aggregate`). ``uniform`` weighs every client
    alike (local DP: clients send no sample counts the server could trust). FLTrust's rule
    gets the server's root update, the label-scored attention the clients' label counts."""

    rule: object = None
    uniform: bool = False

    @property
    def linear(self) -> bool:  # the weighted mean is; attention and the robust rules are not
        return type(self.rule).__name__ == "WeightedMean"

    @property
    def label(self) -> str:
        return f"Rule({type(self.rule).__name__})"

    def apply(self, flow: Flow, ctx: RoundContext, slot: TensorDict) -> tuple[Flow, TensorDict]:
        weights = torch.ones(len(flow.ids), dtype=torch.float64) if self.uniform else flow.weights
        if getattr(self.rule, "needs_reference", False):
            result = self.rule(flow.rows, weights, flow.losses, reference=ctx.root_update())
        elif getattr(self.rule, "needs_label_counts", False):
            result = self.rule(flow.rows, weights, flow.losses, ctx.label_counts(flow.ids))
        elif self.uniform:
            result = self.rule(flow.rows, weights, None)
        else:
            result = self.rule(flow.rows, weights, flow.losses)
        return replace(flow, result=result), slot


@dataclass(frozen=True)
class SecureSum(ServerStage):
    """Sum the uploads through the secure-aggregation protocol: each client finishes its upload
    (clipped to ``flow.clip`` and with its clipping bit when a later stage announced them, and
    sending ``w * upload`` and ``w`` with its own weight under ``weighting``), masks it, and the
    server learns the sum over the survivors only. The cohort and threshold are fixed before
    any reply arrives (the pool's protocol)."""

    weighting: str | None = None
    secure = True

    @property
    def bounds_norm(self) -> bool:  # clients clip to the announced norm before masking
        return True

    def apply(self, flow: Flow, ctx: RoundContext, slot: TensorDict) -> tuple[Flow, TensorDict]:
        if not flow.ids:  # a round without replies (central DP still releases its noise): a zero sum
            total = tree.nested_map(lambda v: v.sum(0), ctx.empty_message())
            return replace(flow, total=total, count=0.0), slot
        transform = UploadTransform(clip=flow.clip, count_bit=flow.count_bit)
        total, survivors = ctx.secure_sum(transform, self.weighting)
        ctx.metrics["clients_used"] = len(survivors)
        count = 0.0
        if flow.count_bit:
            total, count = total["message"], float(total["count"])
        return replace(flow, total=total, count=count), slot


@dataclass(frozen=True)
class DivideByWeight(ServerStage):
    """The secure weighted mean: the sum of ``w_i * upload_i`` divided by the sum of ``w_i``
    (numerator and denominator both came out of the secure sum)."""

    def apply(self, flow: Flow, ctx: RoundContext, slot: TensorDict) -> tuple[Flow, TensorDict]:
        weight = flow.total["weight"]
        result = tree.nested_map(lambda v: (v / weight).to(torch.float32), flow.total["message"])
        return replace(flow, result=result), slot


@dataclass(frozen=True)
class ClippedSum(ServerStage):
    """Clip each upload to ``flow.clip`` and sum, in the clear (central DP with a trusted
    server). A round without replies sums a zero-row upload, so the noise is still released."""

    bounds_norm = True

    def apply(self, flow: Flow, ctx: RoundContext, slot: TensorDict) -> tuple[Flow, TensorDict]:
        rows = flow.rows if flow.ids else ctx.empty_message()
        if flow.ids:
            clipped, norms = clip_each(rows, flow.clip)
        else:
            clipped, norms = rows, torch.zeros(0, dtype=torch.float64)
        total = tree.nested_map(lambda v: v.sum(0), clipped)
        return replace(flow, total=total, count=centred_count(norms, flow.clip)), slot


@dataclass(frozen=True)
class CentralNoise(ServerStage):
    """Central DP's release (McMahan et al. 2018; Andrew et al. 2021 for the adaptive clip):
    add N(0, (z C)^2) to the sum of clipped uploads, divide by the expected cohort m, and
    adapt C from the noisy clipping count. The clip norm C is this stage's state."""

    dp: ClientDP = None
    clip: float = 1.0
    slot = "central-dp"
    needs_bounded = True

    def initial_slot(self) -> TensorDict:
        return {"clip": torch.tensor(self.clip, dtype=torch.float64)}

    def prepare(self, flow: Flow, slot: TensorDict) -> Flow:
        return replace(flow, clip=float(slot["clip"]), count_bit=self.dp.adaptive)

    def apply(self, flow: Flow, ctx: RoundContext, slot: TensorDict) -> tuple[Flow, TensorDict]:
        result, next_clip, metrics = self.dp.release(flow.total, flow.count, flow.clip,
                                                     ctx.privacy_random(CENTRAL_NOISE_STREAM))
        ctx.metrics.update(metrics)
        return replace(flow, result=result), {**slot, "clip": torch.tensor(next_clip, dtype=torch.float64)}


@dataclass(frozen=True)
class LocalDPReport(ServerStage):
    """Local DP: each client clipped its upload to ``clip`` and noised it with its own
    randomness before sending (the client stage); the server only reports the clip."""

    clip: float = 1.0

    def apply(self, flow: Flow, ctx: RoundContext, slot: TensorDict) -> tuple[Flow, TensorDict]:
        ctx.metrics["dp_clip"] = self.clip
        return flow, slot

"""The privacy section of the run configuration: DP and secure aggregation."""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Optional

from pydantic import Field

from metafed.section import Section


class DPSection(Section):
    """Client-level differential privacy (:mod:`metafed.privacy.dp`)."""

    TITLE: ClassVar[str] = "Privacy"
    FLAT: ClassVar[dict[str, str]] = {"mode": "dp", "clip": "dp_clip", "noise_multiplier": "dp_noise_multiplier", "delta": "dp_delta", "accountant": "dp_accountant", "adaptive_clip": "dp_adaptive_clip", "target_quantile": "dp_target_quantile", "clip_lr": "dp_clip_lr", "count_noise": "dp_count_noise"}

    mode: Optional[Literal["central", "local"]] = Field(None,
        description="client-level differential privacy: central (server adds noise) or local (each client)")
    clip: float = Field(1.0, gt=0, description="DP: L2 clip norm of each client update")
    noise_multiplier: Optional[float] = Field(None, ge=0, description="DP: noise std / clip norm")
    target_epsilon: Optional[float] = Field(None, gt=0, description="calibrate the noise multiplier to this")
    delta: float = Field(1e-5, gt=0, lt=1, description="DP: delta of the (epsilon, delta) guarantee")
    accountant: Literal["rdp", "pld"] = Field("rdp", description="DP accountant: rdp or pld (dp-accounting)")
    adaptive_clip: bool = Field(False,
        description="DP: adapt the clip norm to a quantile of update norms (Andrew et al. 2021)")
    target_quantile: float = Field(0.5, gt=0, lt=1, description="adaptive clipping: target quantile of norms")
    clip_lr: float = Field(0.2, gt=0, description="adaptive clipping: learning rate of the clip norm")
    count_noise: Optional[float] = Field(None, gt=0, description="sigma_b of adaptive clipping (default m/20)")
    insecure_reproducible_privacy: bool = Field(False, description="TESTS ONLY: seeded DP noise and sampling; "
                                                "anyone with the seed can undo the noise, the guarantee does not hold")


class SecAggSection(Section):
    """Secure aggregation (:mod:`metafed.privacy.secagg`)."""

    TITLE: ClassVar[str] = "Privacy"
    FLAT: ClassVar[dict[str, str]] = {"enabled": "secure_aggregation", "threshold": "secagg_threshold", "neighbours": "secagg_neighbours", "range": "secagg_range", "bits": "secagg_bits"}

    enabled: bool = Field(False,
        description="pairwise-masked secure aggregation: the server sees only the sum")
    threshold: Optional[int] = Field(None, ge=1, description="minimum survivors (default: majority)")
    neighbours: Optional[int] = Field(None, ge=2, description="SecAgg+ neighbourhood size k")
    range: float = Field(1e4, gt=0, description="fixed-point range [-R, R] of n_i * update")
    bits: int = Field(40, ge=8, le=52, description="secure aggregation: fixed-point fraction bits")


class PrivacySection(Section):
    """Client-level differential privacy and secure aggregation."""

    TITLE: ClassVar[str] = "Privacy"

    dp: DPSection = Field(default_factory=DPSection, description="client-level differential privacy")
    secagg: SecAggSection = Field(default_factory=SecAggSection, description="secure aggregation")

"""The simulate section of the run configuration: what a deployment refuses."""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Optional

from pydantic import Field

from metafed.section import Section


class SimulateSection(Section):
    """Everything a deployment refuses: simulated attacks, free-riders, dropouts, stragglers, client speeds and SecAgg dropouts (in deployment these are real)."""

    TITLE: ClassVar[str] = "Simulated behaviour"

    attack: Optional[Literal["label-flip", "sign-flip", "gaussian", "alie", "ipm", "backdoor"]] = Field(None,
        description="simulated malicious-client attack")
    malicious_fraction: float = Field(0.0, ge=0, lt=1, description="fraction of clients that attack")
    attack_scale: Optional[float] = Field(None, gt=0, description="strength of the attack (default per attack)")
    backdoor_target: int = Field(0, ge=0, description="backdoor: the label triggered inputs are pushed to")
    free_riders: float = Field(0.0, ge=0, lt=1, description="simulated fraction of clients that free-ride")
    free_ride: Literal["zero", "noise", "replay", "copy"] = Field("zero",
        description="how simulated free-riders free-ride: send zeros, Gaussian noise of an honest update's norm, the "
                    "previous global update, or a copy of another client's update")
    dropout: float = Field(0.0, ge=0, lt=1, description="fraction of sampled clients that never reply")
    stragglers: float = Field(0.0, ge=0, le=1,
        description="fraction of sampled clients that do a random part of their local work")
    straggler_policy: Optional[Literal["drop", "keep"]] = Field(None,
        description="drop or keep stragglers' partial work (default: the algorithm's; keep for fedprox and "
                    "pfedme)")
    client_speed: str = Field("lognormal:0.5", description="async: per-client time per local step: constant or "
                              "lognormal:SIGMA")
    slow_clients: float = Field(0.0, ge=0, le=1, description="async: fraction of clients 10x slower")
    secagg_dropout: float = Field(0.0, ge=0, lt=1, description="fraction dropping after key sharing")

"""The training section of the run configuration: rounds, cohorts, local work."""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Optional

from pydantic import Field

from metafed.section import Section


class TrainingSection(Section):
    """Rounds, cohorts and each client's local work (:mod:`metafed.client.task`)."""

    TITLE: ClassVar[str] = "Training"

    rounds: int = Field(30, ge=1, description="communication rounds")
    clients_per_round: int = Field(10, ge=1,
        description="clients sampled each round (expected count under poisson sampling)")
    local_epochs: int = Field(2, ge=1, description="passes over the local data per round")
    local_steps: Optional[int] = Field(None, ge=1, description="overrides local_epochs when set")
    batch_size: int = Field(10, ge=1, description="local minibatch size")
    lr: float = Field(0.1, gt=0, description="client learning rate (beta of the meta-learning methods)")
    protocol: Literal["equal-budget", "paper"] = Field(
        "equal-budget", description="equal-budget: every method adapts with --personalize-steps at evaluation; "
        "paper: each algorithm's own paper's training recipe and evaluation (see metafed.protocols)")
    client_sampling: Literal["fixed", "poisson"] = Field("fixed",
        description="fixed: exactly clients-per-round; poisson: each client independently (for DP accounting)")
    min_clients: int = Field(1, ge=1, description="a round commits only with at least this many valid replies; "
                                                  "otherwise it is skipped and the model is unchanged")

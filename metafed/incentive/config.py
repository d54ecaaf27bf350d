"""The incentives section of the run configuration."""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal, Optional

from pydantic import Field

from metafed.section import Section


class IncentivesSection(Section):
    """Contributions, rewards and the signed ledger (:mod:`metafed.incentive`)."""

    TITLE: ClassVar[str] = "Incentives"

    contribution: Optional[Literal["size", "loo", "shapley", "shapley-exact"]] = Field(None,
        description="measure each client's contribution every round, pay rewards by it and keep a signed ledger "
                    "(RUN_DIR/ledger.jsonl): size (sample share), loo (leave-one-out), shapley (GTG-Shapley), "
                    "shapley-exact (<= 14 clients per round)")
    contribution_utility: Literal["accuracy", "loss"] = Field("accuracy",
        description="what a coalition's model is worth: its accuracy on the server's validation split, or minus "
                    "its mean loss there (smoother: fewer ties between coalitions)")
    validation_size: int = Field(500, ge=10, description="samples in the server's validation split that "
                                 "contributions are measured on")
    shapley_permutations: Optional[int] = Field(None, ge=1,
        description="GTG-Shapley: most permutations per round (default max(50, 10 x clients))")
    reward_budget: float = Field(100.0, ge=0, description="reward paid out each round, split by contribution")
    reward_memory: float = Field(0.8, ge=0, lt=1,
        description="rewards follow each client's reputation, a moving average of its contributions: r <- m r + "
                    "(1 - m) contribution per round taken part in (0: this round's contribution alone)")
    reward_floor: float = Field(0.0, ge=0, le=1,
        description="share of the budget split equally among the clients not flagged as free-riders")
    ledger_key: Optional[Path] = Field(None, description="the server's Ed25519 ledger key (PEM; created if absent) "
                                       "(default: RUN_DIR/ledger_key.pem)")

"""The execution section of the run configuration: backends, devices, outputs."""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal, Optional

from pydantic import Field

from metafed.section import Section


class ExecutionSection(Section):
    """Where and how the run executes; none of it changes the numbers."""

    TITLE: ClassVar[str] = "Execution"

    backend: Literal["loop", "vectorized", "ray"] = Field("vectorized",
        description="loop (one client at a time), vectorized (torch.func over clients) or ray (parts of "
        "each cohort on Ray workers, each vectorized; extra metafed[ray])")
    device: Literal["auto", "cpu", "cuda"] = Field("auto",
        description="where clients' local work runs: cuda when visible (auto), cpu, or cuda (an error without a "
                    "GPU); seeded results agree across devices within float tolerance")
    chunk_size: int = Field(128, ge=1, description="vectorized and ray: clients per chunk")
    client_memory_mb: Optional[float] = Field(None, gt=0,
        description="memory for per-client states (personal models, residuals; MB); past it the least recently "
                    "used spill to RUN_DIR/clients/ (a temporary folder without --out) (default: no cap)")
    compile: bool = Field(False, description="vectorized and ray: torch.compile the step")
    ray_address: Optional[str] = Field(None, description="ray: join the cluster at this address (ray start "
                                       "--head prints it; default: start Ray on this machine)")
    ray_workers: Optional[int] = Field(None, ge=1, description="ray: parts each cohort is cut into, one Ray "
                                       "task each (default: the cluster's CPUs)")
    seed: int = Field(0, description="seed of everything reproducible (never of DP noise)")
    out: Optional[Path] = Field(None, description="run folder to write")
    checkpoint_every: int = Field(1, ge=1, description="checkpoint every N rounds (and at the last)")
    progress: bool = Field(True, description="progress bar on a terminal")
    loggers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="experiment trackers fed with each round's metrics, e.g. "
        "tensorboard,mlflow (extras of the same names; see metafed.loggers)")

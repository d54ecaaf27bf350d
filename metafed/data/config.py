"""The data section of the run configuration: the dataset and how it is federated."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal, Optional

from pydantic import Field

from metafed.section import Section


class DataSection(Section):
    """What to train on and how it is federated (:mod:`metafed.data`)."""

    TITLE: ClassVar[str] = "Data"

    dataset: Literal["digits", "mnist", "femnist", "shakespeare", "synthetic", "w1"] = Field("digits",
        description="the federation to train on (list: `metafed datasets`)")
    data_dir: Optional[Path] = Field(None,
        description="folder holding mnist/, femnist/, shakespeare/ (default: $METAFED_DATA)")
    model: Optional[Literal["logistic", "mlp", "cnn", "small-cnn", "lstm"]] = Field(None,
        description="the network (default per dataset: mlp for digits and mnist, cnn for femnist, lstm for "
                    "shakespeare, logistic for synthetic)")
    hidden: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [200],
        description="hidden layer widths of mlp, e.g. 200 or 200,100")
    num_clients: int = Field(20, ge=1,
        description="clients to create (digits, mnist, synthetic; LEAF datasets bring their own users)")
    partition: Literal["iid", "dirichlet", "shards", "quantity"] = Field("dirichlet",
        description="how digits / mnist are split across clients")
    dirichlet_alpha: float = Field(0.5, gt=0,
        description="label skew of the dirichlet partition (smaller: more skewed)")
    shards_per_client: int = Field(2, ge=1, description="label shards per client in the shards partition")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="each client's held-out test share")
    heldout_fraction: float = Field(0.0, ge=0, lt=1,
        description="fraction of clients that never train (new-client evaluation)")
    max_clients: Optional[int] = Field(None, ge=1, description="use only the first N LEAF users")
    synthetic_alpha: float = Field(1.0, ge=0,
        description="Synthetic(alpha, beta): model heterogeneity across clients")
    synthetic_beta: float = Field(1.0, ge=0,
        description="Synthetic(alpha, beta): feature heterogeneity across clients")
    synthetic_iid: bool = Field(False, description="synthetic: one shared model and feature distribution")
    size_multiplier: int = Field(1, ge=1, description="synthetic: multiply every client size (pFedMe uses 5)")
    standardize: bool = Field(False, description="per-feature standardisation of digits / mnist / femnist inputs, "
                              "as the pFedMe and LEAF pipelines do (their learning rates assume it)")

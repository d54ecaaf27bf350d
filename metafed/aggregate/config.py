"""The aggregation section of the run configuration: the rule and the server optimizer."""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Optional

from pydantic import Field

from metafed.section import Section


class AggregationSection(Section):
    """How the server combines uploads and steps its model (:mod:`metafed.aggregate`, :mod:`metafed.pipeline`)."""

    TITLE: ClassVar[str] = "Aggregation"

    weighting: Literal["samples", "uniform"] = Field("samples", description="average client updates by their "
                                                     "sample counts (FedAvg) or uniformly (Per-FedAvg)")
    aggregator: Literal["mean", "attention", "median", "trimmed-mean", "krum", "multi-krum", "bulyan",
                        "centered-clipping", "fltrust"] = Field(
        "mean", description="how client updates are combined: mean, attention, or a robust rule")
    byzantine_f: Optional[int] = Field(None, ge=0, description="f for robust rules (default: expected attackers)")
    clip_tau: float = Field(0.1, gt=0, description="centered clipping radius")
    fltrust_root_size: int = Field(100, ge=1, description="FLTrust: server's clean root samples")
    attention_score: Literal["loss", "cosine", "labels"] = Field("loss",
        description="attention: loss (held-out validation loss), cosine (agreement with the mean), labels "
                    "(label-distribution similarity)")
    attention_temperature: float = Field(1.0, gt=0, description="attention: softmax temperature")
    max_sample_weight: Optional[float] = Field(None, gt=0, description="absolute cap on client-reported sample counts")
    sample_weight_cap: Optional[float] = Field(10.0, ge=1, description="cap each reported sample count at this "
                                               "multiple of the round's median count (None: no relative cap)")
    server_optimizer: Literal["sgd", "adam", "yogi", "adagrad"] = Field("sgd",
        description="the optimizer the server applies the aggregated update with (FedOpt)")
    server_lr: Optional[float] = Field(None, gt=0, description="server step (default per optimizer: sgd 1.0, "
                                       "adam 0.01, yogi 0.01, adagrad 0.1)")
    server_momentum: float = Field(0.0, ge=0, lt=1, description="momentum of the sgd server optimizer (FedAvgM)")
    server_beta1: float = Field(0.9, ge=0, lt=1, description="adam / yogi first-moment decay")
    server_beta2: float = Field(0.99, ge=0, lt=1, description="adam / yogi second-moment decay")
    server_tau: float = Field(1e-3, gt=0, description="adaptivity tau of adam / yogi / adagrad (Reddi et al. 2021)")

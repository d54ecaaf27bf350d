"""Heterogeneous client models: ``--client-models mlp:0.5,small-cnn:0.5`` gives half the
clients an MLP and half a small CNN. Clients of one group share an architecture, so each
group still trains vectorized (one ``vmap`` per group); only what the distillation
algorithms exchange (logits on shared inputs) crosses groups."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
from pydantic import Field

from metafed.models import MODEL_NAMES, FunctionalModel, build_model
from metafed.section import Section

GROUP_STREAM = 26  # default_rng([seed, 26]): which client gets which architecture


@dataclass(frozen=True)
class ModelGroup:
    """One architecture and the clients that run it."""

    name: str  # the reference model's name, e.g. "small-cnn"
    model: FunctionalModel
    members: tuple[int, ...]  # training client ids, ascending


def parse_client_models(spec: str) -> list[tuple[str, float]]:
    """``"mlp:0.5,cnn:0.5"`` -> [("mlp", 0.5), ("cnn", 0.5)]; a bare ``"mlp"`` is all clients.
    Raises ValueError naming the problem (unknown model, bad share, shares not summing to 1)."""
    out = []
    for part in spec.split(","):
        name, _, share = part.strip().partition(":")
        if name not in MODEL_NAMES:
            raise ValueError(f"--client-models: unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")
        try:
            value = float(share) if share else 1.0
        except ValueError:
            raise ValueError(f"--client-models: share {share!r} of {name!r} is not a number") from None
        if not 0 < value <= 1:
            raise ValueError(f"--client-models: share {value:g} of {name!r} must be in (0, 1]")
        if any(name == seen for seen, _ in out):
            raise ValueError(f"--client-models: {name!r} is listed twice")
        out.append((name, value))
    total = sum(v for _, v in out)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"--client-models: the shares sum to {total:g}, not 1")
    return out


def assign_groups(num_clients: int, shares: list[float], seed: int, *stream: int) -> np.ndarray:
    """[num_clients] group index of each client: a seeded permutation cut by the shares
    (largest-remainder rounding, so the group sizes sum to ``num_clients``);
    ``default_rng([seed, 26, *stream])`` (training clients: no extra stream)."""
    exact = np.array(shares) * num_clients
    sizes = np.floor(exact).astype(int)
    for g in np.argsort(-(exact - sizes), kind="stable")[: num_clients - sizes.sum()]:
        sizes[g] += 1
    order = np.random.default_rng([seed, GROUP_STREAM, *stream]).permutation(num_clients)
    group = np.empty(num_clients, dtype=np.int64)
    start = 0
    for g, size in enumerate(sizes):
        group[order[start: start + size]] = g
        start += size
    return group


def build_groups(spec: str, num_clients: int, input_shape: tuple[int, ...], num_classes: int, seed: int,
                 hidden: tuple[int, ...], loss, score) -> list[ModelGroup]:
    """The groups a ``--client-models`` spec describes, each model with deterministic weights."""
    pairs = parse_client_models(spec)
    group = assign_groups(num_clients, [s for _, s in pairs], seed)
    groups = []
    for g, (name, _) in enumerate(pairs):
        module = build_model(name, input_shape, num_classes, seed, hidden)
        members = tuple(int(c) for c in np.flatnonzero(group == g))
        groups.append(ModelGroup(name, FunctionalModel(module, loss, score), members))
    return groups


class ClientModelsSection(Section):
    """The parameters every distillation algorithm shares: the client groups' architectures."""

    client_models: Optional[str] = Field(None,
        description="heterogeneous clients: reference models and their shares, e.g. mlp:0.5,small-cnn:0.5 "
                    "(default: every client runs --model)")


class PublicInputsSection(ClientModelsSection):
    """FedMD's and FedDF's parameters for the public inputs they share logits on."""

    public_data: Literal["pool", "mnist"] = Field("pool",
        description="unlabelled public inputs: pool (samples of this dataset no client holds: carved before "
                    "partitioning, or held-out clients' inputs) or mnist (MNIST images from DATA_DIR)")
    public_size: int = Field(1000, ge=10, description="public inputs the server and clients share")

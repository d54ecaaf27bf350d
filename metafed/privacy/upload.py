"""The per-client stage of the aggregation pipeline: what a client does to its message
before it leaves the client, wherever the client runs (the simulation pool applies it
in-process on the client's behalf, the Flower ClientApp on the node).

- Local DP: clip the whole message to norm C and add N(0, (z C)^2) per coordinate, drawn
  with the client's own privacy randomness (never the server's).
- Central DP under secure aggregation: clip to C on the client (the server never sees the
  unclipped message), and, with adaptive clipping, append the centred bit
  1[||Delta|| <= C] - 1/2 so that the count is summed inside the secure sum too (the server
  learns only its noisy total, Andrew et al. 2021).
- Secure weighted mean: send w * message and w, so the secure sum carries numerator and
  denominator (Bonawitz et al. 2017 sum; the mean is their ratio).

A transform is plain data (:meth:`UploadTransform.to_config`), so it crosses the wire in a
Flower ConfigRecord and is validated on arrival like any other message."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from metafed import tree
from metafed.privacy.dp import add_noise, clip_each
from metafed.privacy.noise import PrivacyRandom


@dataclass(frozen=True)
class UploadTransform:
    clip: float | None = None  # L2 clip norm C of the whole message
    noise_std: float = 0.0  # local DP: per-coordinate Gaussian std (z * C), drawn on the client
    weight: float | None = None  # secure mean: send {"message": w * message, "weight": w}
    count_bit: bool = False  # adaptive clipping: send {"count": 1[norm <= C] - 1/2} beside the message

    def __post_init__(self):
        for name in ("clip", "weight"):
            value = getattr(self, name)
            if value is not None and (type(value) not in (int, float) or not math.isfinite(value) or value <= 0):
                raise ValueError(f"upload transform: {name} must be a positive finite number, got {value!r}")
        if type(self.noise_std) not in (int, float) or not math.isfinite(self.noise_std) or self.noise_std < 0:
            raise ValueError(f"upload transform: noise_std must be a finite number >= 0, got {self.noise_std!r}")
        if self.noise_std > 0 and self.clip is None:
            raise ValueError("upload transform: local noise needs a clip norm (its sensitivity)")
        if self.count_bit and self.clip is None:
            raise ValueError("upload transform: the clipping count needs a clip norm")
        if type(self.count_bit) is not bool:
            raise ValueError("upload transform: count_bit must be a boolean")

    @property
    def identity(self) -> bool:
        return self == UploadTransform()

    def to_config(self) -> dict:
        """Wire form: a flat dict of numbers (None as -1, which no valid field takes)."""
        return {k: (-1.0 if v is None else float(v) if k != "count_bit" else bool(v)) for k, v in asdict(self).items()}

    @classmethod
    def from_config(cls, values: dict) -> "UploadTransform":
        """Inverse of :meth:`to_config`; raises ValueError on anything else."""
        try:
            clip, weight = float(values["clip"]), float(values["weight"])
            return cls(None if clip == -1.0 else clip, float(values["noise_std"]), None if weight == -1.0 else weight,
                       values["count_bit"] if isinstance(values["count_bit"], bool) else None)
        except (KeyError, TypeError) as e:
            raise ValueError(f"upload transform: malformed ({type(e).__name__}: {e})") from None


def finish_upload(row: dict, transform: UploadTransform, rand: PrivacyRandom | None = None) -> dict:
    """One client's message (nested dict of tensors, no client axis) after ``transform``.

    Returns the message itself when the transform has no weight and no count bit, else
    ``{"message": ..., "weight": w}`` / ``{"message": ..., "count": b - 1/2}``. Numbers are
    those the server-side stacked versions give (clip norms per row, noise in float64)."""
    message = row
    if transform.clip is not None:
        stacked, norms = clip_each(tree.nested_map(lambda v: v.unsqueeze(0), row), transform.clip)
        message = tree.nested_index(stacked, 0)
    if transform.noise_std > 0:
        if rand is None:
            raise ValueError("local DP noise needs the client's privacy randomness")
        message = add_noise(message, transform.noise_std, rand)
    if transform.weight is None and not transform.count_bit:
        return message
    out = {"message": message}
    if transform.weight is not None:
        w = torch.tensor(float(transform.weight), dtype=torch.float64)
        out = {"message": tree.nested_map(lambda v: v.double() * w, message), "weight": w}
    if transform.count_bit:
        out["count"] = (norms[0] <= transform.clip).double() - 0.5
    return out


def client_privacy_random(insecure_reproducible_seed: int | None, rnd: int, client: int) -> PrivacyRandom:
    """A client's privacy randomness for round ``rnd``: fresh OS randomness, or the seeded
    stream ``(seed, rnd, 7, client)`` behind ``insecure_reproducible_privacy``."""
    if insecure_reproducible_seed is None:
        return PrivacyRandom.secure_fresh()
    return PrivacyRandom.insecure_reproducible(insecure_reproducible_seed, rnd, 7, client)


WEIGHTINGS = ("samples", "uniform")


def own_weight(num_samples: float, weighting: str, absolute_cap: float | None) -> float:
    """The weight a client gives its own message under secure aggregation: its sample count
    (capped only by the run's absolute cap) or 1. The client chooses it, not the server: a
    server that set weights could give one client weight 1 and the others ~0 and read that
    client's update out of the "aggregate". (The median-relative cap of the plain path needs
    every client's count, so it does not apply here; the fixed-point range bounds what a
    client that lies about its count can add.)"""
    if weighting == "uniform":
        return 1.0
    if weighting != "samples":
        raise ValueError(f"unknown weighting {weighting!r}; choose {' or '.join(WEIGHTINGS)}")
    return float(min(num_samples, absolute_cap)) if absolute_cap is not None else float(num_samples)

"""Where client work computes: ``--device auto|cpu|cuda``.

The device boundary is the backend: a backend moves the broadcast, the clients' data, their
batch indices and their state onto its device, runs every step there, and hands its
outputs back on the CPU. Everything before (sampling, batch schedules: NumPy streams, so
the same on every device) and after (validation, aggregation, privacy, checkpoints) stays
on the CPU, so a run's seeded trajectory is the same program on every device; CUDA kernels
sum in another order, so results agree within float tolerance, not bit for bit.
"""
from __future__ import annotations

import torch

from metafed import tree

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``auto``: CUDA when a CUDA device is visible, else the CPU. ``cuda`` without one is an
    error naming the fix."""
    if isinstance(name, torch.device):
        return name
    name = name or "cpu"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is visible here (torch.cuda.is_available() is False; a "
                         "CPU-only torch build, or no driver): use --device cpu or --device auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: choose one of {', '.join(DEVICES)}") from None


def to_device(nested, device: torch.device):
    """A nested dict of tensors (or one tensor) on ``device``; a no-op where it already is."""
    if isinstance(nested, dict):
        return tree.nested_map(lambda v: v.to(device), nested)
    return nested.to(device)


def to_cpu(nested):
    return to_device(nested, torch.device("cpu"))

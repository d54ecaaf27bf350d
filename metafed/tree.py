"""Dict-of-tensor math. Every function is pure: it returns new dicts and never mutates."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from metafed.types import TensorDict


def add(a: TensorDict, b: TensorDict, alpha: float = 1.0) -> TensorDict:
    """a + alpha * b."""
    return {k: a[k] + alpha * b[k] for k in a}


def sub(a: TensorDict, b: TensorDict) -> TensorDict:
    return {k: a[k] - b[k] for k in a}


def clone(a: TensorDict) -> TensorDict:
    return {k: v.detach().clone() for k, v in a.items()}


def dot(a: TensorDict, b: TensorDict) -> Tensor:
    """Sum over leaves of elementwise products (a scalar)."""
    return sum((a[k] * b[k]).sum() for k in a)


def sq_norm(a: TensorDict) -> Tensor:
    """Squared L2 norm of the concatenation of all leaves."""
    return sum((v * v).sum() for v in a.values())


def all_finite(tree: TensorDict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in tree.values())


# ---------------------------------------------------------------- nested trees (dicts of dicts)
def nested_map(fn: Callable[..., Tensor], tree, *rest):
    """tree_map over arbitrarily nested dicts whose leaves are tensors."""
    if isinstance(tree, dict):
        return {k: nested_map(fn, v, *(r[k] for r in rest)) for k, v in tree.items()}
    return fn(tree, *rest)


def nested_stack(trees: Sequence) -> dict:
    """List of C nested dicts -> one nested dict with leaves stacked on a new axis [C, ...]."""
    return nested_map(lambda *leaves: torch.stack(leaves), trees[0], *trees[1:])


def nested_cat(trees: Sequence) -> dict:
    return nested_map(lambda *leaves: torch.cat(leaves), trees[0], *trees[1:])


def nested_index(tree, idx):
    return nested_map(lambda v: v[idx], tree)


def nested_leaves(tree) -> list[Tensor]:
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in nested_leaves(v)]
    return [tree]


def nested_bytes(tree) -> int:
    return sum(v.numel() * v.element_size() for v in nested_leaves(tree))


def nested_flatten(tree: dict, prefix: str = "", sep: str = "/") -> dict[str, Tensor]:
    """{"a": {"b": t}} -> {"a/b": t}; keys must not contain ``sep``."""
    flat: dict[str, Tensor] = {}
    for k, v in tree.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict):
            flat.update(nested_flatten(v, key, sep))
        else:
            flat[key] = v
    return flat


def nested_unflatten(flat: dict[str, Tensor], sep: str = "/") -> dict:
    """Inverse of :func:`nested_flatten`."""
    out: dict = {}
    for key, v in flat.items():
        *heads, last = key.split(sep)
        node = out
        for h in heads:
            node = node.setdefault(h, {})
        node[last] = v
    return out


def flatten_messages(stacked: dict) -> tuple[Tensor, list[tuple[str, torch.Size]]]:
    """Nested dict of [C, ...] -> ([C, D] float64 matrix, layout to undo it)."""
    flat = nested_flatten(stacked)
    layout = [(k, flat[k].shape[1:]) for k in sorted(flat)]
    c = next(iter(flat.values())).shape[0]
    return torch.cat([flat[k].reshape(c, -1).double() for k, _ in layout], dim=1), layout


def unflatten_message(matrix: Tensor, layout, dtype=torch.float32) -> dict:
    """Inverse of :func:`flatten_messages` for [D] (one message) or [C, D] (stacked)."""
    out, pos = {}, 0
    lead = matrix.shape[:-1]
    for key, shape in layout:
        size = int(torch.Size(shape).numel())
        out[key] = matrix[..., pos: pos + size].reshape((*lead, *shape)).to(dtype)
        pos += size
    return nested_unflatten(out)


def unflatten_like(vector: Tensor, layout, reference: dict) -> dict:
    """[D] -> one message with ``reference``'s per-leaf dtypes (decoded in float64 first)."""
    out = unflatten_message(vector.double(), layout, torch.float64)
    return nested_map(lambda v, ref: v.to(ref.dtype), out, reference)

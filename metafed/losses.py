"""What a model is trained and scored for: a per-sample loss and a per-sample score.

Both are functions of ``(outputs, targets)`` that return one value per sample, shape [B]:
the loss is what local training minimises (averaged over a batch's real samples), the
score is what evaluation reports as ``*_accuracy`` (its mean over a client's test samples,
so a score is in [0, 1]). The defaults are classification's: cross-entropy and top-1.
Bring your own with ``metafed.run(cfg, model=..., data=..., loss=..., score=...)``; for
regression, ``loss=mse`` and ``score=within(tolerance)`` (the share of predictions within
``tolerance`` of the target), as in ``examples/regression.py``.

The functions run inside ``torch.func`` transforms (``grad``, ``vmap`` over clients), so
they must be pure tensor code: no ``.item()``, no data-dependent Python branches.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

SampleFn = Callable[[Tensor, Tensor], Tensor]  # (outputs [B, ...], targets [B, ...]) -> [B]


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Classification loss: outputs are logits [B, K], targets class ids [B] (int64)."""
    return F.cross_entropy(outputs, targets, reduction="none")


def top1(outputs: Tensor, targets: Tensor) -> Tensor:
    """1.0 where the largest logit is the target class."""
    return (outputs.argmax(-1) == targets).to(outputs.dtype)


def _as_targets(outputs: Tensor, targets: Tensor) -> Tensor:
    # a regression head outputs [B, 1] for targets [B]: compare element by element
    return outputs.reshape(targets.shape) if outputs.numel() == targets.numel() else outputs


def mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """Regression loss: the mean squared error of each sample over its target's elements."""
    diff = _as_targets(outputs, targets) - targets
    return diff.pow(2).reshape(diff.shape[0], -1).mean(1)


def within(tolerance: float) -> SampleFn:
    """Regression score: 1.0 where every element of the prediction is within ``tolerance``
    of the target (so ``*_accuracy`` is the share of predictions that close)."""
    if not tolerance > 0:
        raise ValueError(f"within(tolerance): tolerance must be > 0, got {tolerance}")

    def score(outputs: Tensor, targets: Tensor) -> Tensor:
        close = (_as_targets(outputs, targets) - targets).abs() <= tolerance
        return close.reshape(close.shape[0], -1).all(1).to(targets.dtype if targets.is_floating_point()
                                                          else outputs.dtype)

    return score


def check_sample_fns(loss: SampleFn, score: SampleFn, outputs: Tensor, targets: Tensor) -> None:
    """Run both on a real batch once, up front, and name what is wrong: inside the
    vectorized engine a bad shape would fail deep in torch.func or broadcast silently."""
    n = targets.shape[0]
    for name, fn in (("loss", loss), ("score", score)):
        try:
            values = fn(outputs, targets)
        except Exception as e:  # noqa: BLE001 - the user's function: report it by name
            raise ValueError(f"{name}(outputs, targets) failed on a batch (outputs {tuple(outputs.shape)}, "
                             f"targets {tuple(targets.shape)} {targets.dtype}): {type(e).__name__}: {e}") from None
        if not isinstance(values, Tensor) or values.shape != (n,):
            shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise ValueError(f"{name}(outputs, targets) must return one value per sample, shape ({n},), got {shape}")
        if not torch.isfinite(values).all():
            raise ValueError(f"{name}(outputs, targets) returned NaN or Inf on a batch of the training data")
        if name == "score" and ((values < 0) | (values > 1)).any():
            raise ValueError("score(outputs, targets) must be in [0, 1] per sample (it is reported as accuracy)")


__all__ = ["cross_entropy", "top1", "mse", "within", "check_sample_fns", "SampleFn"]

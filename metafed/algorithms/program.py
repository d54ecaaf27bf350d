"""What a client runs: the :class:`LocalProgram` protocol (``init / step / final``, pure and
vmappable), the step declarations a backend may run faster (:class:`SgdPart`,
:class:`FirstOrderMetaStep`, :class:`MoreauStep`) and the loss / gradient / SGD helpers
programs are written with. Below :mod:`metafed.algorithms.base`: programs import this,
never the algorithm base class."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from metafed.models import FunctionalModel
from metafed.types import Params


class LocalProgram(Protocol):
    """What one client runs. Every method must be pure and vmappable."""

    batches_per_step: int

    def init(self, shared: dict, client: dict) -> dict: ...

    def step(self, shared: dict, carry: dict, batch: dict) -> tuple[dict, Tensor]:
        """One local step; returns the new carry and a scalar training loss for logging."""
        ...

    def final(self, shared: dict, carry: dict, client: dict) -> dict:
        """Training programs return ``{"update": Params, "state": TensorDict}``; personalization
        programs return ``{"params": Params}``."""
        ...


@dataclass(frozen=True)
class SgdPart:
    """A program may declare that its step is nothing but plain SGD on parts of its carry, each
    on the step's batch and independent of the others (``sgd_parts``). Each part is
    ``carry[key] <- carry[key] - lr (grad(mean masked loss) + pull (carry[key] - shared["params"]))``
    and the first part's loss is the step's reported loss. The backends may then run it with a
    fused or native kernel instead of ``step`` (metafed.backends.fused_mlp, .native)."""

    key: str
    lr: float
    pull: float = 0.0


@dataclass(frozen=True)
class FirstOrderMetaStep:
    """A program may declare its step as a first-order meta step (``first_order_meta``) on a
    support batch (slot 0) and a query batch (slot 1) of mean masked losses:
    ``temp = params; inner_steps times: temp <- temp - inner_lr grad(loss(temp; support));
    params <- params - outer_lr grad(loss(temp; query))``, reporting the query loss at temp.
    FOMAML and Per-FedAvg (FO) are such steps; the vectorized backend's native kernel may run
    them instead of ``step``."""

    inner_lr: float
    inner_steps: int
    outer_lr: float


@dataclass(frozen=True)
class MoreauStep:
    """A program may declare its step as pFedMe's (``moreau_step``; Dinh et al. 2020): the
    personal model ``carry["personal"]`` (theta) takes ``inner_steps`` gradient steps at
    ``personal_lr`` on loss(theta) + lam/2 ||theta - w||^2 with w = ``carry["params"]``, then
    w <- w - lr lam (w - theta); the reported loss is loss(theta) after the solve, and
    ``carry["inner_increase"]`` becomes 1 once a solve raises its own objective. With ``lr``
    None it is the personalization solve: ``carry["params"]`` is theta, anchored at
    ``shared["params"]``, and reports loss(theta). The native kernel may run such steps."""

    personal_lr: float
    lam: float
    inner_steps: int
    lr: float | None = None


def batch_loss(model: FunctionalModel, params: Params, batch: dict, j: int, mask: Tensor | None = None) -> Tensor:
    """Mean loss of ``params`` on minibatch ``j`` of a step's batch (optionally re-masked)."""
    return model.loss(params, batch["x"][j], batch["y"][j], batch["mask"][j] if mask is None else mask)


def grad_and_loss(model: FunctionalModel, params: Params, batch: dict, j: int = 0,
                  mask: Tensor | None = None) -> tuple[Params, Tensor]:
    """(gradient, value) of the mean loss on minibatch ``j``; pure and vmappable."""
    from metafed.algorithms.gradients import grad

    return grad(lambda p: (batch_loss(model, p, batch, j, mask),) * 2, has_aux=True)(params)


def sgd(params: Params, grads: Params, lr: float | Params) -> Params:
    """params - lr * grads; ``lr`` may be a scalar or per-parameter tensors (Meta-SGD)."""
    if isinstance(lr, dict):
        return {k: v - lr[k] * grads[k] for k, v in params.items()}
    return {k: v - lr * grads[k] for k, v in params.items()}

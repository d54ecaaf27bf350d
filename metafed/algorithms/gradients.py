"""Gradients for local programs: ``torch.func.grad``, or plain reverse-mode autograd where
that is the same derivative and cheaper.

Programs are pure functions of (params, batch) so that the vectorized backend can ``vmap``
them; ``torch.func.grad`` gives the gradient there. The loop backend runs one client at a
time with no transform around the step, where functorch's per-call machinery is most of a
small model's step (W1's MLP: ~0.40 ms with ``torch.func.grad`` against ~0.12 ms with
``torch.autograd.grad``). Inside :func:`eager_gradients` (the loop backend),
:func:`grad` therefore differentiates with ``torch.autograd.grad`` on detached leaf copies of
the params *when no transform is active* (``peek_interpreter_stack`` is empty) and the
params are not part of an outer autograd graph; anywhere else (under ``vmap``, inside an
outer ``grad`` as MAML's second-order inner steps are) it is ``torch.func.grad``. Both give
the same numbers up to float summation order (tested: loop == vectorized to 1e-5).
"""
from __future__ import annotations

import torch

from metafed.models.functional import _EAGER, eager_gradients  # noqa: F401 - re-exported for backends


def eager_allowed(tensors) -> bool:
    """True inside :func:`eager_gradients`, outside any functorch transform, with no tensor
    that an outer autograd graph is tracking."""
    if torch.compiler.is_compiling() or not _EAGER.get() or torch._C._functorch.peek_interpreter_stack() is not None:
        return False  # (is_compiling first: torch.compile folds it, and never traces the rest)
    return not any(t.requires_grad for t in tensors)


def grad(fn, has_aux: bool = False):
    """Drop-in for ``torch.func.grad(fn, has_aux)`` over a dict of params (see module doc)."""
    def run(params: dict):
        if not eager_allowed(params.values()):
            return torch.func.grad(fn, has_aux=has_aux)(params)
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad():
            out = fn(leaves)
            value, aux = out if has_aux else (out, None)
            grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
        grads = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}
        if not has_aux:
            return grads
        if isinstance(aux, torch.Tensor):  # the common case: the data loss
            return grads, aux.detach()
        return grads, torch.utils._pytree.tree_map(lambda a: a.detach() if isinstance(a, torch.Tensor) else a, aux)

    return run


def sgd_step(params: dict, grads: dict, lr: float) -> dict:
    """params - lr * grads, as params + (-lr) grads in one pass: on the eager path one fused
    multi-tensor op (``_foreach_add``, what ``torch.optim.SGD`` uses), else per tensor
    (vmappable); both round the same way."""
    if not eager_allowed(params.values()):  # one fused pass per tensor (v + (-lr) g), vmappable
        return {k: torch.add(v, grads[k], alpha=-lr) for k, v in params.items()}
    keys = list(params)
    return dict(zip(keys, torch._foreach_add([params[k] for k in keys], [grads[k] for k in keys], alpha=-lr)))

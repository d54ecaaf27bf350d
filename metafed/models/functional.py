"""A functional view of any ``nn.Module``: parameters in, outputs out, no hidden state.

Built on :func:`torch.func.functional_call`, so the same module runs unbatched (loop
backend) or under :func:`torch.vmap` over a leading client axis (vectorized backend).
"""
from __future__ import annotations

import contextvars
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metafed.losses import SampleFn, cross_entropy, top1
from metafed.types import Params


# set by the loop backend (one client at a time, no transform around a step): cheaper eager
# paths in FunctionalModel.apply and metafed.algorithms.gradients.grad
_EAGER = contextvars.ContextVar("metafed_eager_gradients", default=False)


@contextmanager
def eager_gradients():
    """Let :func:`metafed.algorithms.gradients.grad` and :meth:`FunctionalModel.apply` take
    their eager paths (the same numbers, less per-call overhead)."""
    token = _EAGER.set(True)
    try:
        yield
    finally:
        _EAGER.reset(token)


def refuse_stateful_layers(module: nn.Module) -> None:
    """Refuse, up front and by name, layers whose forward pass is not a pure function of
    (params, x): BatchNorm updates running statistics in place (and normalises with the
    batch, which mixes clients' padding in), Dropout draws random masks, which vmap over
    clients cannot give each client its own generator for. Both would otherwise fail deep
    inside torch.func, or silently differ between the two backends."""
    for name, layer in module.named_modules():
        where = f"layer {name!r} ({type(layer).__name__})" if name else type(layer).__name__
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"{where}: BatchNorm keeps running statistics, which metafed's functional clients "
                             "cannot update; use nn.GroupNorm (or nn.LayerNorm), which normalise per sample")
        if isinstance(layer, nn.modules.dropout._DropoutNd) and layer.p > 0:
            raise ValueError(f"{where}: Dropout with p={layer.p} draws random masks, which clients vectorized "
                             "with torch.vmap cannot draw independently; remove it or set p=0 (regularise "
                             "with the algorithm instead, e.g. FedProx's mu or Ditto's lambda)")


class FunctionalModel:
    """Wraps a module; ``apply(params, x)`` and ``loss(params, x, y, mask)`` are pure.

    ``sample_loss`` and ``sample_score`` map (outputs, targets) to one value per sample
    (:mod:`metafed.losses`; default cross-entropy and top-1 accuracy). Buffers (e.g.
    running statistics) are held constant: the reference models have none, and federated
    algorithms in metafed communicate parameters only.
    """

    def __init__(self, module: nn.Module, sample_loss: SampleFn = cross_entropy, sample_score: SampleFn = top1):
        refuse_stateful_layers(module)
        self.module = module
        self.buffers = {k: v.detach() for k, v in module.named_buffers()}
        self.sample_loss = sample_loss
        self.sample_score = sample_score
        self._slots = None  # (param name, owning module, attribute) for the eager call

    def init_params(self) -> Params:
        return {k: v.detach().clone() for k, v in self.module.named_parameters()}

    def apply(self, params: Params, x: Tensor) -> Tensor:
        if not torch.compiler.is_compiling() and _EAGER.get():  # the loop backend: the same substitution as functional_call, minus its bookkeeping
            return self._swapped_call(params, x)
        return functional_call(self.module, (params, self.buffers), (x,))

    def _swapped_call(self, params: Params, x: Tensor) -> Tensor:
        """Run the module with ``params`` put in its parameter slots, then put its own back
        (what ``functional_call`` does; ~0.1 ms less per call on W1's MLP)."""
        slots = self._slots
        if slots is None:
            owners = dict(self.module.named_modules())
            slots = self._slots = [(name, owners[name.rpartition(".")[0]], name.rpartition(".")[2])
                                   for name, _ in self.module.named_parameters()]
        saved = [owner._parameters[attr] for _, owner, attr in slots]
        try:
            for name, owner, attr in slots:
                owner._parameters[attr] = params[name]
            return self.module(x)
        finally:
            for (_, owner, attr), original in zip(slots, saved):
                owner._parameters[attr] = original

    def loss(self, params: Params, x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
        """Mean per-sample loss over the real samples of a padded batch.

        Args:
            x: inputs [B, ...]; y: targets [B, ...]; mask: 1.0 for real samples, 0.0 for padding [B].
        Returns a scalar; an all-padding batch gives exactly 0 (and a zero gradient).
        """
        per_sample = self.sample_loss(self.apply(params, x), y)  # [B]
        return (per_sample * mask).sum() / mask.sum().clamp_min(1.0)

    def correct_and_loss(self, params: Params, x: Tensor, y: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(summed score, i.e. correct predictions, and summed loss) over real samples; both scalars."""
        outputs = self.apply(params, x)
        correct = self.sample_score(outputs, y).to(mask.dtype) * mask
        return correct.sum(), (self.sample_loss(outputs, y) * mask).sum()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def check_params(self, params: Params) -> None:
        """Raise ValueError naming the first key/shape/dtype that does not match the model."""
        ref = dict(self.module.named_parameters())
        if set(params) != set(ref):
            missing, extra = sorted(set(ref) - set(params)), sorted(set(params) - set(ref))
            raise ValueError(f"parameter names do not match the model: missing {missing}, unexpected {extra}")
        for k, v in params.items():
            if v.shape != ref[k].shape or v.dtype != ref[k].dtype:
                raise ValueError(f"parameter {k!r}: expected {tuple(ref[k].shape)} {ref[k].dtype}, "
                                 f"got {tuple(v.shape)} {v.dtype}")
        if not all(torch.isfinite(v).all() for v in params.values()):
            raise ValueError("parameters contain NaN or Inf")

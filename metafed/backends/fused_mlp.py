"""A hand-fused local step for the commonest vectorized workload: SGD with an optional
proximal pull (FedAvg, FedProx, evaluation's fine-tuning: one SGD part, ``sgd_parts``) on a
reference MLP or logistic regression, or a user's nn.Sequential ReLU MLP, with cross-entropy.

The generic path runs ``vmap(grad(loss))`` and then the update; for W1's small matrices
(batch 10, 60-200-10) most of its time goes to per-op dispatch of the transforms, the
gradient tensors and the separate update pass. Here the C clients of a chunk step together
with batched matmuls written out by hand, and each weight update is fused into the matmul
that computes its gradient (``W.baddbmm_(dZ^T, H, alpha=-lr)``: W - lr * dZ^T H in one
pass, in place on the backend's own copy of the carry, no gradient tensor). Same maths as
the generic path (masked mean cross-entropy, ReLU, SGD), so results agree to float rounding (tested against it to 1e-5); padded steps
(all-zero mask) change nothing, exactly as there.

Shapes: x [C, B, D], y [C, B], mask [C, B]; a layer's weight [C, out, in], bias [C, out].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metafed.algorithms.base import FirstOrderMetaStep, MoreauStep, SgdPart
from metafed.losses import cross_entropy
from metafed.models.reference import MLP, LogisticRegression


@dataclass(frozen=True)
class SgdMlpPlan:
    """What a qualifying program trains: the (weight, bias) parameter names per layer, input
    to output (ReLU between layers), and its SGD parts, each stepped on the same batches
    independently of the others (the first part's loss is the step's reported loss).
    ``flat_input_only``: the module does not flatten its input (an ``nn.Sequential`` without
    a leading ``nn.Flatten``), so the plan holds only for [n, D] client data."""

    layers: tuple[tuple[str, str], ...]
    parts: tuple[SgdPart, ...]  # the program's sgd_parts (empty for a meta or Moreau step)
    flat_input_only: bool = False
    meta: FirstOrderMetaStep | None = None  # a first-order meta step instead of SGD parts (native only)
    moreau: MoreauStep | None = None  # pFedMe's step instead of SGD parts (native only)

    @property
    def batches_per_step(self) -> int:
        return 2 if self.meta is not None else 1


def mlp_layers(module: nn.Module) -> tuple[tuple[tuple[str, str], ...], bool] | None:
    """The (weight, bias) names of a ReLU MLP's linear layers, input to output, and whether
    the module flattens its input itself; None for any other module. Recognised: the
    reference ``MLP`` and ``LogisticRegression``, and a user's ``nn.Sequential`` of an
    optional leading ``nn.Flatten()``, then ``nn.Linear`` (with bias), ``nn.ReLU``, ...,
    ``nn.Linear``: exactly the computation the fused step and the native kernel perform."""
    if type(module) is MLP:
        hidden = tuple((f"hidden.{i}.weight", f"hidden.{i}.bias") for i in range(len(module.hidden)))
        return hidden + (("out.weight", "out.bias"),), True
    if type(module) is LogisticRegression:
        return (("linear.weight", "linear.bias"),), True
    if type(module) is not nn.Sequential:
        return None
    children = list(module.named_children())
    first = children[0][1] if children else None
    flattens = type(first) is nn.Flatten and (first.start_dim, first.end_dim) == (1, -1)
    body = children[1:] if flattens else children
    if len(body) % 2 == 0:  # Linear (ReLU Linear)*: an odd count, at least one layer
        return None
    for i, (_, m) in enumerate(body):
        if (i % 2 == 0 and (type(m) is not nn.Linear or m.bias is None)) or (i % 2 == 1 and type(m) is not nn.ReLU):
            return None
    return tuple((f"{name}.weight", f"{name}.bias") for name, _ in body[0::2]), flattens


def sgd_mlp_plan(program) -> SgdMlpPlan | None:
    """The plan of ``program``, or None when it does not qualify for the fused paths (neither
    SGD parts nor a first-order meta step nor pFedMe's: another optimizer or second-order terms; or
    another model or loss)."""
    model = getattr(program, "model", None)
    parts, meta = getattr(program, "sgd_parts", None), getattr(program, "first_order_meta", None)
    moreau = getattr(program, "moreau_step", None)
    if parts is None and meta is None and moreau is None:
        return None
    if (program.batches_per_step != (1 if meta is None else 2) or model is None
            or model.sample_loss is not cross_entropy or model.buffers):
        return None
    found = mlp_layers(model.module)
    if found is None:
        return None
    layers, flattens = found
    if {n for n, _ in model.module.named_parameters()} != {k for pair in layers for k in pair}:
        return None
    return SgdMlpPlan(layers, parts if meta is None and moreau is None else (), flat_input_only=not flattens,
                      meta=meta, moreau=moreau)


def fused_sgd_step(program):
    """The fused step for ``program`` ((params, x, y, mask, anchor) -> (params, loss [C])),
    or None when it does not qualify (:func:`sgd_mlp_plan`). With pull mu > 0 each step also
    pulls towards ``anchor`` (FedProx's global params): params - lr (g + mu (params - anchor))."""
    plan = sgd_mlp_plan(program)
    if plan is None or len(plan.parts) != 1 or plan.parts[0].key != "params" or plan.flat_input_only:
        # several parts (Ditto), or a module that may not flatten its input: the native
        # kernel runs these (it sees the data's shape), this step does not
        return None
    layers, lr, pull = plan.layers, plan.parts[0].lr, plan.parts[0].pull

    def step(params: dict, x: Tensor, y: Tensor, mask: Tensor, anchor: dict | None = None) -> tuple[dict, Tensor]:
        h = x.reshape(x.shape[0], x.shape[1], -1)  # [C, B, D]
        inputs, pre = [], []
        for i, (w, b) in enumerate(layers):
            inputs.append(h)
            z = torch.baddbmm(params[b].unsqueeze(1), h, params[w].transpose(1, 2))  # [C, B, out]
            pre.append(z)
            h = torch.relu(z) if i < len(layers) - 1 else z
        logp = torch.log_softmax(h, dim=-1)  # [C, B, K]
        n = mask.sum(1).clamp_min(1.0)  # [C] real samples
        nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)  # [C, B]
        loss = (nll * mask).sum(1) / n
        # d(mean masked CE)/d logits = (softmax - onehot) * mask / n
        dz = logp.exp()
        dz.scatter_add_(-1, y.unsqueeze(-1), -torch.ones_like(y, dtype=dz.dtype).unsqueeze(-1))
        dz.mul_((mask / n.unsqueeze(1)).unsqueeze(-1))
        new = {}
        for i in range(len(layers) - 1, -1, -1):
            w, b = layers[i]
            if i > 0:  # through the old weights, before they are updated
                # ReLU's backward in one pass: dh where the pre-activation is > 0, else 0
                dh = torch.ops.aten.threshold_backward(torch.bmm(dz, params[w]), pre[i - 1], 0.0)  # [C, B, in]
            # in place: the carry is the backend's own copy (one pass instead of copy + update)
            if pull:  # the proximal part of the step: (1 - lr mu) params + lr mu anchor
                for key in (w, b):
                    params[key].mul_(1.0 - lr * pull).add_(anchor[key], alpha=lr * pull)
            new[w] = params[w].baddbmm_(dz.transpose(1, 2), inputs[i], alpha=-lr)
            new[b] = params[b].add_(dz.sum(1), alpha=-lr)
            if i > 0:
                dz = dh
        return new, loss

    return step

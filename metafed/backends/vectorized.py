"""The vectorized backend: all clients of a chunk step together on stacked parameters.

Each chunk runs ``vmap(program.step)`` once per local step over a leading client axis C;
there is no per-client Python work inside the step loop. Clients are sorted by their
number of steps and cut into chunks (at most ``chunk_size`` clients and a memory budget),
so a chunk pads little and the working set stays in cache: measured on W1 (see
docs/benchmarks.md). Padding steps are neutralised with ``where(active, new, old)``, so a
client's result equals the loop backend's up to float summation order.

Programs that declare their step (SGD parts, a first-order meta step or pFedMe's Moreau
step; ``sgd_mlp_plan``) on a ReLU MLP skip the step loop on the CPU: the native kernel
(metafed.backends.native) trains each client of the chunk in cache, all its steps at once,
with the same maths.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from metafed import tree
from metafed.algorithms.base import LocalProgram
from metafed.backends.base import ClientTask, step_batch
from metafed.backends.device import resolve_device, to_device
from metafed.backends import native
from metafed.backends.fused_mlp import SgdMlpPlan, fused_sgd_step, sgd_mlp_plan


def _masked_step(program: LocalProgram):
    """The compiled path's fixed-shape step: padded steps run and are undone by ``where``
    (under torch.compile the mask fuses into the update)."""

    def step(shared, carry, batch, active):
        new_carry, loss = program.step(shared, carry, batch)
        kept = tree.nested_map(lambda new, old: torch.where(active, new, old), new_carry, carry)
        return kept, torch.where(active, loss, torch.zeros_like(loss))

    return step


def _unrolled(step, unroll: int):
    """``unroll`` consecutive masked steps as one function: under torch.compile they become
    one graph, so per-step Python and dispatch overhead is paid once per ``unroll`` steps."""

    def steps(shared, carry, batches, active):
        total = None
        for u in range(unroll):
            carry, loss = step(shared, carry, {k: v[u] for k, v in batches.items()}, active[u])
            total = loss if total is None else total + loss
        return carry, total

    return steps


def _fused_steps(fused):
    """The backend's step signature over a hand-fused batched step (metafed.backends.fused_mlp):
    carry {"params"}, batches [U, C, 1, B, ...] for U unrolled steps. A chunk's clients are
    sorted by step count, so the clients still active at a step are a prefix of the chunk:
    only that prefix is computed (views, updated in place), and padded steps cost nothing."""

    def steps(shared, carry, batches, active, n_active):
        params = carry["params"]
        total = torch.zeros(active.shape[1], device=active.device)
        for u, n in enumerate(n_active):  # [U] active clients per step (a prefix)
            if n == 0:
                continue
            part = {k: v[:n] for k, v in params.items()}
            _, loss = fused(part, batches["x"][u, :n, 0], batches["y"][u, :n, 0], batches["mask"][u, :n, 0],
                            shared.get("params"))
            total[:n] += loss
        return {"params": params}, total

    return steps


def _prefix_steps(vstep):
    """Eager steps of any program over the clients still active: a chunk's clients are
    sorted by step count, so they are a prefix of it. Padded steps cost nothing and need no
    masking; inactive clients' carry is kept as it is. (Under torch.compile the masked,
    fixed-shape step is used instead: a prefix per step would recompile.)"""

    def steps(shared, carry, batches, active, n_active):
        total = torch.zeros(active.shape[1], device=active.device)
        c = active.shape[1]
        for u, n in enumerate(n_active):  # [U] active clients per step
            if n == 0:
                continue
            part = carry if n == c else tree.nested_map(lambda v: v[:n], carry)
            new, loss = vstep(shared, part, {k: v[u, :n] for k, v in batches.items()})
            carry = new if n == c else tree.nested_map(lambda full, p: torch.cat([p, full[n:]]), carry, new)
            total[:n] += loss.detach()
        return carry, total

    return steps


def _pad_stack(tensors: list[Tensor]) -> Tensor:
    """Stack [n_c, ...] tensors to [C, n_max, ...], zero-padded."""
    n_max = max(t.shape[0] for t in tensors)
    out = tensors[0].new_zeros((len(tensors), n_max, *tensors[0].shape[1:]))
    for c, t in enumerate(tensors):
        out[c, : t.shape[0]] = t
    return out


class VectorizedBackend:
    name = "vectorized"

    def __init__(self, chunk_size: int = 128, compile: bool = False, memory_budget_bytes: float = 2e9,
                 unroll: int | None = None, device: torch.device | str = "cpu", native_kernel: bool = True):
        self.device = resolve_device(device)  # where the steps run; outputs come back on the CPU
        self.native_kernel = native_kernel  # False: plain-SGD MLPs take the torch fused step (tests compare)
        self.chunk_size = chunk_size
        self.compile = compile
        # steps fused per compiled call; eager runs gain nothing from unrolling
        self.unroll = unroll if unroll is not None else (8 if compile else 1)
        self.memory_budget_bytes = memory_budget_bytes
        self._compiled: dict = {}

    def _chunk_limit(self, shared: dict) -> int:
        # stacked params, grads, carry copies and temporaries: ~8 copies of the broadcast per client
        per_client = 8 * tree.nested_bytes(shared)
        return max(1, min(self.chunk_size, int(self.memory_budget_bytes // max(per_client, 1))))

    def _step_fn(self, program: LocalProgram):
        # Programs are frozen dataclasses, equal when their hyperparameters are: the round
        # loop builds a new one each round and must hit the same compiled step.
        # plain-SGD MLP: a hand-fused batched step, faster than compiling the generic one (W1:
        # 0.51 vs 0.74 s at C = 1000), so it is used with --compile too
        if program not in self._compiled and (fused := fused_sgd_step(program)) is not None:
            self._compiled[program] = _fused_steps(fused)
        if program not in self._compiled and not self.compile:  # eager: step only the active prefix
            self._compiled[program] = _prefix_steps(torch.vmap(program.step, in_dims=(None, 0, 0)))
        if program not in self._compiled:
            fn = _unrolled(torch.vmap(_masked_step(program), in_dims=(None, 0, 0, 0)), self.unroll)
            if self.compile:
                # static shapes: measured faster than dynamic-shape kernels (W1 C=1000: 2.1 vs 2.6 s);
                # each new chunk size compiles once, so allow more than dynamo's default 8 variants
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
                fn = torch.compile(fn, dynamic=False)
            # the masked step needs no host-side counts (a list would become a guarded constant)
            self._compiled[program] = lambda shared, carry, batches, active, n_active, fn=fn: fn(
                shared, carry, batches, active)
        return self._compiled[program]

    def _native_plan(self, program: LocalProgram, shared: dict) -> SgdMlpPlan | None:
        """The program's plan when the native kernel can run it: CPU, float32, kernel built."""
        if not self.native_kernel or self.device.type != "cpu" or (plan := sgd_mlp_plan(program)) is None:
            return None
        params = shared.get("params", {})
        names = [k for pair in plan.layers for k in pair]
        if not all(params.get(k) is not None and params[k].dtype == torch.float32 for k in names):
            return None
        return plan if native.library() is not None else None

    def run(self, program: LocalProgram, shared: dict, tasks: list[ClientTask]):
        order = sorted(range(len(tasks)), key=lambda i: -tasks[i].active_steps)
        # near-equal chunks (1000 clients, limit 128 -> 8 x 125): fewer distinct shapes to compile
        n_chunks = -(-len(tasks) // self._chunk_limit(shared))
        limit = -(-len(tasks) // n_chunks)
        shared = to_device(shared, self.device)
        plan = self._native_plan(program, shared)
        step_fn = None if plan else self._step_fn(program)
        init_fn = torch.vmap(program.init, in_dims=(None, 0))
        final_fn = torch.vmap(program.final, in_dims=(None, 0, 0))
        outputs = losses = None
        for start in range(0, len(order), limit):
            rows = torch.as_tensor(order[start: start + limit], dtype=torch.int64)
            chunk = [tasks[i] for i in order[start: start + limit]]
            if plan is not None and all(t.x.dtype == torch.float32 and t.schedule.shape[1] == plan.batches_per_step
                                        and (t.x.dim() == 2 or not plan.flat_input_only) for t in chunk):
                out, loss = self._run_chunk_native(chunk, shared, plan, init_fn, final_fn)
            else:
                out, loss = self._run_chunk(chunk, shared, step_fn or self._step_fn(program), init_fn, final_fn)
            if outputs is None:  # written in task order as chunks finish: no concatenation, no reordering copy
                outputs = tree.nested_map(lambda v: v.new_empty((len(tasks), *v.shape[1:])), out)
                losses = loss.new_empty(len(tasks))
            tree.nested_map(lambda dst, src: dst.index_copy_(0, rows, src), outputs, out)
            losses.index_copy_(0, rows, loss)
        return outputs, losses

    def _run_chunk_native(self, chunk: list[ClientTask], shared, plan: SgdMlpPlan, init_fn, final_fn):
        """The chunk through the native kernel: each client's active steps in cache, in place
        on the chunk's own copy of the carry."""
        steps = max(t.active_steps for t in chunk)
        k, batch = chunk[0].schedule.shape[1:]
        idx = np.full((len(chunk), steps, k, batch), -1, dtype=np.int64)  # [C, S, k, B]: k = 2 for a meta step
        for c, t in enumerate(chunk):
            idx[c, : t.active_steps] = t.schedule[: t.active_steps]
        x = _pad_stack([t.x for t in chunk])
        x = x.reshape(x.shape[0], x.shape[1], -1)  # [C, n_max, D]
        y = _pad_stack([t.y for t in chunk])  # [C, n_max]
        inputs = tree.nested_stack([t.inputs for t in chunk])
        carry = tree.nested_map(lambda v: v.clone(memory_format=torch.contiguous_format), init_fn(shared, inputs))
        anchor = [(shared["params"][w], shared["params"][b]) for w, b in plan.layers]
        active = torch.tensor([t.active_steps for t in chunk], dtype=torch.int64)
        idx_t, y = torch.from_numpy(idx), y.long()
        if plan.meta is not None:  # FOMAML, Per-FedAvg FO: support and query batches per step
            params = carry["params"]
            total = native.train_mlp_sgd([(params[w], params[b]) for w, b in plan.layers], x, y, idx_t, active,
                                         plan.meta.inner_lr, meta=(plan.meta.inner_steps, plan.meta.outer_lr))
        elif plan.moreau is not None:  # pFedMe: the Moreau solve on theta, then w moves towards it
            m, idx_t = plan.moreau, idx_t[:, :, 0]
            w = [(carry["params"][a], carry["params"][b]) for a, b in plan.layers]
            if m.lr is None:  # personalization: carry["params"] is theta, anchored at the global model
                total = native.solve_mlp_moreau(w, x, y, idx_t, active, m.personal_lr, m.lam, m.inner_steps, anchor)
            else:
                theta = [(carry["personal"][a], carry["personal"][b]) for a, b in plan.layers]
                total, rose = native.train_mlp_moreau(w, theta, x, y, idx_t, active, m.personal_lr, m.lam,
                                                      m.inner_steps, m.lr)
                carry["inner_increase"] = torch.maximum(carry["inner_increase"], rose)
        else:
            idx_t = idx_t[:, :, 0]  # [C, S, B]
            losses = [native.train_mlp_sgd([(carry[part.key][w], carry[part.key][b]) for w, b in plan.layers], x,
                                           y, idx_t, active, part.lr, part.pull, anchor if part.pull else None)
                      for part in plan.parts]  # independent given the batches (Ditto: global, then personal)
            total = losses[0]
        out = tree.nested_map(lambda v: v.detach().cpu(), final_fn(shared, carry, inputs))
        return out, total / active.clamp_min(1).to(total.dtype)

    def _run_chunk(self, chunk: list[ClientTask], shared, step_fn, init_fn, final_fn):
        # pad the step count to a multiple of the unroll factor with inactive steps
        steps = -(-max(t.active_steps for t in chunk) // self.unroll) * self.unroll
        k, b = chunk[0].schedule.shape[1:]
        idx = np.full((len(chunk), steps, k, b), -1, dtype=np.int64)  # [C, S, k, B]
        for c, t in enumerate(chunk):
            idx[c, : t.active_steps] = t.schedule[: t.active_steps]
        # step-major layout [S, C, ...]: each step's slice is contiguous, so a compiled step
        # sees identical strides in every chunk (no recompiles)
        # a fresh copy with canonical strides: a permuted view (or NumPy's arbitrary strides on
        # size-1 dims) would change the layout with S and C and make the compiled step recompile
        dev = self.device
        idx_t = torch.from_numpy(idx).permute(1, 0, 2, 3).clone(memory_format=torch.contiguous_format).to(dev)
        # idx_t: [S, C, k, B]; active: [S, C]
        active_host = torch.arange(steps)[:, None] < torch.tensor([t.active_steps for t in chunk])[None, :]
        n_active = active_host.sum(1).tolist()  # [S] counted on the host: no device sync per step
        active = active_host.to(dev)
        x = _pad_stack([t.x for t in chunk]).to(dev)  # [C, n_max, ...]
        y = _pad_stack([t.y for t in chunk]).to(dev)
        rows = torch.arange(len(chunk), device=dev).view(1, -1, 1, 1)
        safe = idx_t.clamp_min(0)
        # advanced indexing may lay the result out client-major; force step-major strides so that
        # every compiled call sees the same layout whatever the chunk's step count
        xb, yb = x[rows, safe].contiguous(), y[rows, safe].contiguous()  # [S, C, k, B, ...]
        mb = (idx_t >= 0).to(torch.float32)
        inputs = to_device(tree.nested_stack([t.inputs for t in chunk]), dev)
        # materialise broadcast (stride-0, expanded) leaves so every step sees one memory layout;
        # states a program makes on the CPU (scalars, counters) join the device
        # (a copy the chunk owns: the fused step updates it in place, and a one-client chunk's
        # "expanded" broadcast would otherwise still share the broadcast's memory)
        carry = tree.nested_map(lambda v: v.to(dev).clone(memory_format=torch.contiguous_format),
                                init_fn(shared, inputs))
        total = torch.zeros(len(chunk), device=dev)
        for s in range(0, steps, self.unroll):
            window = slice(s, s + self.unroll)
            batch = {"x": xb[window], "y": yb[window], "mask": mb[window]}
            carry, loss = step_fn(shared, carry, batch, active[window], n_active[window])
            total = total + loss.detach()
        out = tree.nested_map(lambda v: v.detach().cpu(), final_fn(shared, carry, inputs))
        counts = torch.tensor([max(t.active_steps, 1) for t in chunk], dtype=total.dtype)
        return out, total.cpu() / counts


__all__ = ["VectorizedBackend", "step_batch"]

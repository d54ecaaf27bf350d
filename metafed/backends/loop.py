"""The reference backend: one client at a time, one step at a time, only real steps."""
from __future__ import annotations

import torch

from metafed import tree
from metafed.algorithms.base import LocalProgram
from metafed.algorithms.gradients import eager_gradients
from metafed.backends.base import ClientTask, step_batch
from metafed.backends.device import resolve_device, to_cpu, to_device


GATHER_STEPS = 256  # steps whose batches are gathered together (bounds the copy for long local work)


class LoopBackend:
    """``device``: where the steps run (:mod:`metafed.backends.device`); outputs come back on the CPU."""

    name = "loop"

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = resolve_device(device)

    def run(self, program: LocalProgram, shared: dict, tasks: list[ClientTask]):
        with eager_gradients():  # one client, no transform around a step: plain autograd is cheaper
            return self._run(program, shared, tasks)

    def _run(self, program: LocalProgram, shared: dict, tasks: list[ClientTask]):
        dev = self.device
        shared = to_device(shared, dev)
        outputs, losses = [], []
        for task in tasks:
            schedule = torch.from_numpy(task.schedule[: task.active_steps]).to(dev)
            x, y, inputs = task.x.to(dev), task.y.to(dev), to_device(task.inputs, dev)
            carry = to_device(program.init(shared, inputs), dev)  # states made on the CPU join the device
            total = torch.zeros((), device=dev)
            for start in range(0, task.active_steps, GATHER_STEPS):
                # a window of steps' batches gathered at once ([S, k, B, ...]): one indexing op, not S
                batches = step_batch(x, y, schedule[start: start + GATHER_STEPS])
                for s in range(batches["mask"].shape[0]):
                    carry, loss = program.step(shared, carry, {k: v[s] for k, v in batches.items()})
                    total = total + loss.detach()
            outputs.append(tree.nested_map(torch.Tensor.detach, to_cpu(program.final(shared, carry, inputs))))
            losses.append((total / max(task.active_steps, 1)).cpu())
        return tree.nested_stack(outputs), torch.stack(losses)

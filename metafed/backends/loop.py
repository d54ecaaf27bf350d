"""The reference backend: one client at a time, one step at a time, only real steps."""
from __future__ import annotations

import torch

from metafed import tree
from metafed.algorithms.base import LocalProgram
from metafed.backends.base import ClientTask, step_batch


class LoopBackend:
    name = "loop"

    def run(self, program: LocalProgram, shared: dict, tasks: list[ClientTask]):
        outputs, losses = [], []
        for task in tasks:
            schedule = torch.from_numpy(task.schedule)
            carry = program.init(shared, task.inputs)
            total = torch.zeros(())
            for s in range(task.active_steps):
                carry, loss = program.step(shared, carry, step_batch(task.x, task.y, schedule[s]))
                total = total + loss.detach()
            outputs.append(tree.nested_map(torch.Tensor.detach, program.final(shared, carry, task.inputs)))
            losses.append(total / max(task.active_steps, 1))
        return tree.nested_stack(outputs), torch.stack(losses)

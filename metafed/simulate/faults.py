"""Simulated faulty clients: malicious clients that replace what they send (update attacks;
data attacks poison their data before training, :func:`metafed.attacks.poison_dataset`) and
free-riders that send something they did not train. Both are client behaviour: they wrap the
replies the simulation pool returns, before the server validates anything, so the server's
validation and aggregation see exactly what such clients would send."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from metafed import tree
from metafed.attacks import DEFAULT_SCALE, corrupt_updates
from metafed.client.reply import upload_of
from metafed.pools.base import RoundReplies
from metafed.tree import flatten_messages, unflatten_message

# the seeded streams of the attacks' and the free-riders' randomness
ATTACK_STREAM, FREE_RIDE_STREAM = 10, 24


def round_generator(seed: int, rnd: int, stream: int) -> torch.Generator:
    """A torch generator seeded from ``default_rng([seed, stream, rnd])``."""
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, stream, rnd]).integers(2 ** 62)))


@dataclass
class SimulatedFaults:
    """``attack`` (with ``scale``, default per attack) by the ``malicious`` clients, and
    ``free_ride`` (zero | noise | replay | copy) by the ``free_riders``."""

    seed: int
    attack: str | None = None
    scale: float | None = None
    malicious: set[int] = field(default_factory=set)
    free_ride: str = "zero"
    free_riders: set[int] = field(default_factory=set)

    def apply(self, replies: RoundReplies, rnd: int, previous_step: torch.Tensor | None) -> RoundReplies:
        """The replies as the faulty clients among them send them. ``previous_step`` [D] is
        the last round's global update, what a replaying free-rider sends (None: zeros)."""
        outputs = self._attack(replies.outputs, replies.ids, rnd)
        outputs = self._free_ride(outputs, replies.ids, rnd, previous_step)
        return replies if outputs is replies.outputs else replace(replies, outputs=outputs)

    def _attack(self, outputs: dict, ids: list[int], rnd: int) -> dict:
        if not self.attack or not self.malicious:
            return outputs
        bad = torch.tensor([cid in self.malicious for cid in ids])
        scale = self.scale or DEFAULT_SCALE[self.attack]
        corrupted = corrupt_updates(self.attack, upload_of(outputs), bad, scale,
                                    round_generator(self.seed, rnd, ATTACK_STREAM))
        return {**outputs, **corrupted}

    def _free_ride(self, outputs: dict, ids: list[int], rnd: int, previous_step: torch.Tensor | None) -> dict:
        riders = [i for i, c in enumerate(ids) if c in self.free_riders]
        if not riders:
            return outputs
        sent = upload_of(outputs)
        x, layout = flatten_messages(sent)  # [C, D] float64
        honest = [i for i in range(len(ids)) if i not in riders]
        how, gen = self.free_ride, round_generator(self.seed, rnd, FREE_RIDE_STREAM)
        for i in riders:
            if how == "zero" or (how in ("copy", "noise") and not honest):
                x[i] = 0.0
            elif how == "noise":
                scale = float(x[honest].norm(dim=1).median()) / x.shape[1] ** 0.5
                x[i] = torch.randn(x.shape[1], generator=gen, dtype=x.dtype) * scale
            elif how == "replay":
                x[i] = previous_step if previous_step is not None else 0.0
            else:  # copy an honest client of this round
                x[i] = x[honest[int(torch.randint(len(honest), (1,), generator=gen))]]
        return {**outputs, **unflatten_message(x, layout, tree.nested_leaves(sent)[0].dtype)}

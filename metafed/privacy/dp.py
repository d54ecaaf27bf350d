"""Client-level differential privacy for federated averaging.

- Central DP (DP-FedAvg): McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private
  Recurrent Language Models", ICLR 2018, arXiv:1710.06963. Each client's whole message is
  clipped to L2 norm C; the server sums, adds N(0, (z C)^2) per coordinate and divides by
  the *expected* number of clients m (a fixed denominator: the sensitivity stays C/m).
- Adaptive clipping: Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning
  with Adaptive Clipping", NeurIPS 2021, arXiv:1905.03871. Clients also report
  b_i = 1[||Delta_i|| <= C]; the server forms the noisy fraction
  b = (sum (b_i - 1/2) + N(0, sigma_b^2)) / m + 1/2 and updates
  C <- C * exp(-eta_C (b - gamma)). Centring each b_i at 1/2 (as TF Privacy's quantile
  estimator does) makes the count's sensitivity 1/2, so its noise multiplier is 2 sigma_b
  and the update noise z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) makes the pair of releases
  exactly as private as one Gaussian mechanism with multiplier z. (Without the centring
  the count's sensitivity is 1 and that split under-charges epsilon.)
- Local DP: each client clips and adds N(0, (z C)^2) to its own message before sending.

All functions take stacked messages (nested dicts of [C, ...] tensors) and a
:class:`~metafed.privacy.noise.PrivacyRandom`: secure OS randomness by default, a seeded
stream only behind ``insecure_reproducible_privacy``. Noise is drawn in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from metafed import tree
from metafed.privacy.noise import PrivacyRandom


def client_norms(stacked: dict) -> Tensor:
    """L2 norm of each client's whole message (all leaves together): [C]."""
    leaves = tree.nested_leaves(stacked)
    c = leaves[0].shape[0]
    return torch.sqrt(sum(v.reshape(c, -1).double().pow(2).sum(1) for v in leaves))


def clip_each(stacked: dict, clip: float) -> tuple[dict, Tensor]:
    """Scale each client's message to norm <= clip; returns (clipped, norms before clipping)."""
    norms = client_norms(stacked)
    factor = torch.clamp(clip / norms.clamp_min(1e-12), max=1.0)  # [C]

    def scale(v: Tensor) -> Tensor:
        return v * factor.to(v.dtype).view(-1, *([1] * (v.dim() - 1)))

    return tree.nested_map(scale, stacked), norms


def gaussian_like(tree_: dict, std: float, rand: PrivacyRandom) -> dict:
    """float64 N(0, std^2) noise shaped like ``tree_``, drawn in sorted-key order so the draws
    do not depend on dict order (which a checkpoint round trip may change)."""
    flat = tree.nested_flatten(tree_)
    return tree.nested_unflatten({k: rand.normal_tensor(flat[k].shape, std) for k in sorted(flat)})


def add_noise(tree_: dict, std: float, rand: PrivacyRandom) -> dict:
    """tree_ + N(0, std^2), added in float64 and cast back to each leaf's dtype."""
    return tree.nested_map(lambda v, e: (v.double() + e).to(v.dtype), tree_, gaussian_like(tree_, std, rand))


def centred_count(norms: Tensor, clip: float) -> float:
    """sum_i (1[||Delta_i|| <= C] - 1/2): the adaptive-clipping statistic before noise.
    Adding or removing one client moves it by exactly 1/2."""
    return float((norms <= clip).double().sum() - 0.5 * norms.numel())


def update_noise_multiplier(z: float, count_std: float) -> float:
    """z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) (Andrew et al. 2021, section 3.1)."""
    rest = z ** -2 - (2 * count_std) ** -2
    if rest <= 0:
        raise ValueError(f"adaptive clipping needs the count noise std ({count_std}) > z/2 ({z / 2}): "
                         "raise --dp-count-noise or the noise multiplier")
    return rest ** -0.5


@dataclass(frozen=True)
class ClientDP:
    """The DP part of one round; ``clip`` is the current clip norm (adaptive runs change it)."""

    mode: str  # central | local
    noise_multiplier: float
    expected_clients: float
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_std: float | None = None  # sigma_b; default m / 20 as Andrew et al. recommend

    def __post_init__(self):
        if self.mode not in ("central", "local"):
            raise ValueError(f"unknown dp mode {self.mode!r}; choose central or local")
        if self.noise_multiplier < 0:
            raise ValueError("dp noise multiplier must be >= 0")

    @property
    def sigma_b(self) -> float:
        return self.count_std if self.count_std is not None else self.expected_clients / 20

    @property
    def update_z(self) -> float:
        if self.adaptive and self.mode == "central" and self.noise_multiplier > 0:
            return update_noise_multiplier(self.noise_multiplier, self.sigma_b)
        return self.noise_multiplier

    def privatize(self, stacked: dict, clip: float, client_rand: list[PrivacyRandom]) -> dict:
        """Local DP: what each client sends, clipped and noised on the client with the
        client's own randomness (``client_rand[i]`` for row i)."""
        clipped, _ = clip_each(stacked, clip)
        rows = [add_noise(tree.nested_index(clipped, i), self.noise_multiplier * clip, r)
                for i, r in enumerate(client_rand)]
        return tree.nested_stack(rows)

    def aggregate(self, stacked: dict, clip: float, rand: PrivacyRandom) -> tuple[dict, float, dict]:
        """Central DP at a trusted server: clip each row, sum, then :meth:`release`.
        A round with no replies passes zero-row messages: it still releases the noise."""
        if _rows(stacked):
            clipped, norms = clip_each(stacked, clip)
        else:
            clipped, norms = stacked, torch.zeros(0, dtype=torch.float64)
        total = tree.nested_map(lambda v: v.sum(0), clipped)
        return self.release(total, centred_count(norms, clip), clip, rand)

    def release(self, total: dict, count: float, clip: float, rand: PrivacyRandom) -> tuple[dict, float, dict]:
        """From the sum of clipped messages (and, for adaptive clipping, the sum of centred
        bits, see :func:`centred_count`), however they were summed (in the clear, or by
        secure aggregation of messages clipped on the clients): add noise, divide by the
        expected cohort m, adapt the clip. Returns (noisy mean message, next clip, metrics)."""
        total = add_noise(total, self.update_z * clip, rand)
        mean = tree.nested_map(lambda v: v / self.expected_clients, total)
        next_clip = clip
        metrics = {"dp_clip": clip}
        if self.adaptive:
            noisy = count + float(rand.normal(1)[0]) * self.sigma_b
            fraction = noisy / self.expected_clients + 0.5  # noisy fraction of clients at or below the clip
            next_clip = clip * math.exp(-self.clip_lr * (fraction - self.target_quantile))
            metrics["dp_unclipped_fraction_noisy"] = fraction
        return mean, next_clip, metrics


def _rows(stacked: dict) -> int:
    return tree.nested_leaves(stacked)[0].shape[0]

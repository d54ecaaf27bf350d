"""Attack simulations: malicious clients that poison their data or their updates.

Data attacks change what a malicious client trains on (fixed at dataset build time);
update attacks replace what it sends after local training. Attackers are omniscient where
the attack needs it (ALIE and IPM read this round's honest updates), the usual worst case.

- label-flip: train on y -> K - 1 - y (Biggio et al. 2012; Fang et al. 2020).
- sign-flip: send -scale * update.
- gaussian: send N(0, scale^2) noise.
- alie: "A Little Is Enough", Baruch et al., NeurIPS 2019, arXiv:1902.06156: send
  mean - z * std of the honest updates (per coordinate), z = Phi^-1((n - s) / n), s = floor(n/2 + 1) - f.
- ipm: inner-product manipulation, Xie et al., UAI 2020, arXiv:1903.03936: send -scale * honest mean.
- backdoor: model replacement, Bagdasaryan et al., AISTATS 2020, arXiv:1807.00459: train on
  clean data plus triggered copies labelled ``target``, then boost the update by n / (#attackers).
"""
from __future__ import annotations

from dataclasses import replace
from statistics import NormalDist

import numpy as np
import torch
from torch import Tensor

from metafed import tree
from metafed.tree import flatten_messages, unflatten_message
from metafed.data.federated import ClientData, FederatedDataset

ATTACKS = ("label-flip", "sign-flip", "gaussian", "alie", "ipm", "backdoor")
DATA_ATTACKS = ("label-flip", "backdoor")
DEFAULT_SCALE = {"sign-flip": 4.0, "gaussian": 1.0, "ipm": 0.5, "alie": 1.0, "backdoor": 1.0, "label-flip": 1.0}


def choose_malicious(num_clients: int, fraction: float, seed: int) -> set[int]:
    n_bad = int(round(fraction * num_clients))
    return set(np.random.default_rng([seed, 9]).choice(num_clients, n_bad, replace=False).tolist())


def choose_free_riders(num_clients: int, fraction: float, seed: int) -> set[int]:
    """The simulated free-riders (``--free-riders``): stream ``default_rng([seed, 23])``."""
    n = int(round(fraction * num_clients))
    return set(np.random.default_rng([seed, 23]).choice(num_clients, n, replace=False).tolist()) if n else set()


def add_trigger(x: Tensor, input_shape: tuple[int, ...]) -> Tensor:
    """Stamp the backdoor trigger: a bright square in the bottom-right corner of square
    images, otherwise the last 8 features set to the data maximum."""
    x = x.clone().float()
    d = int(np.prod(input_shape))
    side = int(round(d ** 0.5))
    hi = float(x.max()) if x.numel() else 1.0
    flat = x.reshape(len(x), -1)
    if side * side == d and side >= 8:
        img = flat.view(len(x), side, side)
        k = max(2, side // 7)
        img[:, side - k - 1: side - 1, side - k - 1: side - 1] = hi
    else:
        flat[:, -8:] = hi
    return flat.reshape(x.shape)


def poison_dataset(ds: FederatedDataset, malicious: set[int], attack: str, target: int = 0) -> FederatedDataset:
    if attack not in DATA_ATTACKS:
        return ds
    clients = list(ds.clients)
    for cid in malicious:
        c = clients[cid]
        if attack == "label-flip":
            clients[cid] = replace(c, train_y=ds.num_classes - 1 - c.train_y)
        else:  # backdoor: clean data plus a triggered copy relabelled to the target class
            x = torch.cat([c.train_x, add_trigger(c.train_x, ds.input_shape).to(c.train_x.dtype)])
            y = torch.cat([c.train_y, torch.full_like(c.train_y, target)])
            clients[cid] = replace(c, train_x=x, train_y=y)
    return replace(ds, clients=clients)


def alie_z(n: int, f: int) -> float:
    s = n // 2 + 1 - f
    return NormalDist().inv_cdf(min(max((n - s) / n, 1e-6), 1 - 1e-6))


def corrupt_updates(attack: str, messages: dict, bad: Tensor, scale: float, generator: torch.Generator) -> dict:
    """Replace the rows of malicious clients (``bad`` [C] bool) in stacked messages."""
    if attack == "label-flip" or not bool(bad.any()):
        return messages
    x, layout = flatten_messages(messages)  # [C, D]
    honest = x[~bad] if bool((~bad).any()) else x
    if attack == "sign-flip":
        x[bad] = -scale * x[bad]
    elif attack == "gaussian":
        x[bad] = torch.randn(int(bad.sum()), x.shape[1], generator=generator, dtype=x.dtype) * scale
    elif attack == "alie":
        z = alie_z(x.shape[0], int(bad.sum())) * scale
        x[bad] = honest.mean(0) - z * honest.std(0, unbiased=False)
    elif attack == "ipm":
        x[bad] = -scale * honest.mean(0)
    elif attack == "backdoor":
        x[bad] = x[bad] * (x.shape[0] / int(bad.sum()))
    else:
        raise ValueError(f"unknown attack {attack!r}; choose one of {', '.join(ATTACKS)}")
    return unflatten_message(x, layout, tree.nested_leaves(messages)[0].dtype)


def backdoor_accuracy(model, params, clients: list[ClientData], input_shape, target: int) -> float:
    """Fraction of triggered test samples of other classes that the model labels ``target``."""
    xs = [add_trigger(c.test_x[c.test_y != target], input_shape) for c in clients]
    x = torch.cat(xs)
    if len(x) == 0:
        return float("nan")
    with torch.no_grad():
        pred = model.apply(params, x).argmax(-1)
    return float((pred == target).double().mean())

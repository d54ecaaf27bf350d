"""The public (unlabeled) inputs the distillation algorithms share logits on.

``--public-data pool`` (default): ``--public-size`` samples of the same dataset that no
client holds. For digits and mnist they are drawn from the pooled data *before* it is
partitioned (``default_rng([seed, 25])``), so no client's train or test split contains
them; for femnist, shakespeare and synthetic they are the training inputs of held-out
clients (``--heldout-fraction``), who never train. ``--public-data mnist``: MNIST training
images from ``DATA_DIR/mnist`` for a federation on another 28x28 dataset (FedMD's own
setting: MNIST public, FEMNIST private). Labels are dropped: every algorithm here uses the
inputs only (FedMD's labelled transfer-learning warm-up is not run; see its docstring).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from metafed.data.loaders import load_mnist, standardize_features

PUBLIC_STREAM = 25


def carve_public(x: np.ndarray, y: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, Tensor]:
    """Take ``size`` random samples out of pooled data before partitioning: (x, y, public x)."""
    if size >= len(y):
        raise ValueError(f"--public-size {size} leaves no data for the clients ({len(y)} samples)")
    pick = np.random.default_rng([seed, PUBLIC_STREAM]).permutation(len(y))
    public, rest = pick[:size], np.sort(pick[size:])
    return x[rest], y[rest], torch.from_numpy(x[public])


def heldout_public(heldout: list, size: int, seed: int) -> Tensor:
    """Public inputs from held-out clients' training inputs (clients that never train)."""
    if not heldout:
        raise ValueError("the distillation algorithms need public inputs: for femnist, shakespeare and synthetic "
                         "they come from held-out clients, so set --heldout-fraction > 0 (or --public-data mnist)")
    x = torch.cat([c.train_x for c in heldout])
    if size > len(x):
        raise ValueError(f"--public-size {size} exceeds the {len(x)} training inputs of the held-out clients "
                         "(raise --heldout-fraction or lower --public-size)")
    pick = torch.from_numpy(np.random.default_rng([seed, PUBLIC_STREAM]).permutation(len(x))[:size])
    return x[pick]


def mnist_public(data_dir, size: int, seed: int, input_shape: tuple[int, ...], standardize: bool) -> Tensor:
    """``size`` MNIST training images as public inputs for a federation with 784 features."""
    if tuple(input_shape) != (784,):
        raise ValueError(f"--public-data mnist gives 28x28 images (784 features); this dataset's inputs are "
                         f"{tuple(input_shape)}")
    x, _ = load_mnist(data_dir / "mnist")
    if standardize:
        x = standardize_features(x)
    pick = np.random.default_rng([seed, PUBLIC_STREAM]).permutation(len(x))[:size]
    return torch.from_numpy(x[np.sort(pick)])

"""The native local-SGD kernel against the torch fused step, beyond W1's shapes.

64 clients, 30 local steps each, one hidden layer, 10 classes, FedAvg's plain SGD: the time
of one call of each path on the same weights and batches (gathering the batches for the
torch path is not timed). Both use all of torch's threads.

    python benchmarks/native_kernel.py            # D-H-K and batch size per line
"""
from __future__ import annotations

import json
import time

import numpy as np
import torch

from metafed.algorithms.fedavg import ProximalSGD
from metafed.backends import native
from metafed.backends.fused_mlp import fused_sgd_step
from metafed.models import MLP, FunctionalModel

SHAPES = [(60, 200, 10), (784, 200, 10), (784, 1000, 10), (784, 200, 64), (3072, 512, 32)]  # D, H, batch
CLIENTS, SAMPLES, STEPS, CLASSES = 64, 300, 30, 10


def measure(d: int, h: int, batch: int) -> dict:
    g = torch.Generator().manual_seed(0)
    w = [(torch.randn(CLIENTS, h, d, generator=g) * 0.05, torch.zeros(CLIENTS, h)),
         (torch.randn(CLIENTS, CLASSES, h, generator=g) * 0.05, torch.zeros(CLIENTS, CLASSES))]
    x = torch.randn(CLIENTS, SAMPLES, d, generator=g)
    y = torch.randint(0, CLASSES, (CLIENTS, SAMPLES), generator=g)
    rng = np.random.default_rng(0)
    idx = torch.from_numpy(np.stack([[rng.permutation(SAMPLES)[:batch] for _ in range(STEPS)] for _ in range(CLIENTS)]))
    steps = torch.full((CLIENTS,), STEPS, dtype=torch.int64)
    layers = [(a.clone(), b.clone()) for a, b in w]
    native.train_mlp_sgd(layers, x, y, idx, steps, 0.01)  # warm-up (and the build, the first time)
    layers = [(a.clone(), b.clone()) for a, b in w]
    t0 = time.perf_counter()
    native.train_mlp_sgd(layers, x, y, idx, steps, 0.01)
    t_native = time.perf_counter() - t0
    step = fused_sgd_step(ProximalSGD(FunctionalModel(MLP(d, (h,), CLASSES)), 0.01))
    rows = torch.arange(CLIENTS)[:, None, None]
    xs, ys, mask = x[rows, idx], y[rows, idx], torch.ones(CLIENTS, batch)  # [C, S, B, D], [C, S, B]
    times = []
    for _ in range(2):  # the first pass warms up
        params = dict(zip(["hidden.0.weight", "hidden.0.bias", "out.weight", "out.bias"],
                          [t.clone() for pair in w for t in pair]))
        t0 = time.perf_counter()
        for s in range(STEPS):
            step(params, xs[:, s], ys[:, s], mask)
        times.append(time.perf_counter() - t0)
    return {"shape": f"{d}-{h}-{CLASSES}", "batch": batch, "native_ms": round(t_native * 1e3, 1),
            "torch_fused_ms": round(times[-1] * 1e3, 1), "speedup": round(times[-1] / t_native, 2),
            "threads": torch.get_num_threads()}


if __name__ == "__main__":
    for shape in SHAPES:
        print(json.dumps(measure(*shape)), flush=True)

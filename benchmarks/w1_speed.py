"""Workload W1 speed: seconds per FedAvg round, loop vs vectorized, and peak memory.

W1 (shared/peers/README.md): Synthetic(1,1)-style data, N clients with LogNormal(ln 100, 0.5)
samples clipped to [50, 200], MLP 60-200-10, 5 local epochs of SGD (lr 0.01, batch 10),
sample-weighted FedAvg, C clients per round. Client data, sampling and batch order are
the peers' (same seeds), so metafed trains exactly the trajectory the peers train.

    python benchmarks/w1_speed.py --n 1000 --c 100 --backend vectorized --rounds 5 [--compile]

Prints one JSON line: median s/round over the timed rounds (after one warm-up round),
achieved GFLOP/s, peak RSS.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np
import torch

from metafed.aggregate import ServerOptimizer, WeightedMean
from metafed.algorithms.fedavg import FedAvg
from metafed.backends import make_backend
from metafed.config import RunConfig
from metafed.data.federated import FederatedDataset
from metafed.data.lazy import W1_CLASSES, W1_DIM, w1_clients
from metafed.federation import Federation
from metafed.models import MLP, FunctionalModel

N_PARAMS = 60 * 200 + 200 + 200 * 10 + 10


def w1_dataset(n_clients: int, seed: int = 0) -> FederatedDataset:
    """The peers' W1 clients (shared/peers/common.py; metafed's ``w1`` dataset), all built up
    front so that generating them is not timed."""
    return FederatedDataset("w1", list(w1_clients(n_clients, seed, test_fraction=0.0, cache=0)), (W1_DIM,), W1_CLASSES)


def build(n: int, c: int, backend: str, chunk: int, compile: bool, seed: int = 0) -> Federation:
    cfg = RunConfig(dataset="synthetic", num_clients=n, clients_per_round=c, local_epochs=5, batch_size=10,
                    lr=0.01, backend=backend, chunk_size=chunk, compile=compile, seed=seed, progress=False)
    torch.manual_seed(seed)  # the peers' init: torch.manual_seed(0); MLP()
    model = FunctionalModel(MLP(60, (200,), 10))
    alg = FedAvg(model, ServerOptimizer(), lr=0.01)
    return Federation(cfg, w1_dataset(n, seed), alg, make_backend(backend, chunk, compile), WeightedMean(),
                      alg.init(model.init_params()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--c", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds after 1 warm-up round")
    ap.add_argument("--backend", default="vectorized")
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--unroll", type=int, default=None, help="vectorized+compile: steps per compiled call")
    ap.add_argument("--no-native", action="store_true", help="vectorized: the torch fused step, not the native kernel")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    fed = build(a.n, a.c, a.backend, a.chunk, a.compile)
    if a.backend == "vectorized":
        from metafed.backends import VectorizedBackend

        fed.backend = fed.pool.backend = VectorizedBackend(a.chunk, a.compile, unroll=a.unroll,
                                                           native_kernel=not a.no_native)
        fed.evaluator.backend = fed.backend
    sizes = fed.dataset.train_sizes()
    times, samples, warmup = [], [], 0.0
    for rnd in range(a.rounds + 1):
        t0 = time.perf_counter()
        fed.run_round(rnd)
        dt = time.perf_counter() - t0
        if rnd == 0:
            warmup = dt  # with --compile: tracing and compiling every chunk shape of the round
        if rnd > 0:
            from metafed.data.schedule import sample_clients

            times.append(dt)
            samples.append(int(sizes[sample_clients(a.n, a.c, rnd, 0)].sum()))
    med = float(np.median(times))
    flops = float(np.mean(samples)) * 6.0 * N_PARAMS * 5
    program, broadcast = fed.algorithm.client_program(1), fed.algorithm.broadcast(fed.state, 1)
    native = a.backend == "vectorized" and fed.backend._native_plan(program, broadcast) is not None
    impl = (f"metafed-{a.backend}" + ("+native" if native else "")
            + (f"+compile-unroll{fed.backend.unroll}" if a.compile else "")
            + (f"-chunk{a.chunk}" if a.backend == "vectorized" else ""))
    print(json.dumps({"impl": impl, "N": a.n, "C": a.c, "rounds": len(times), "sec_per_round_median": round(med, 4),
                      "sec_per_round_all": [round(t, 4) for t in times], "warmup_round_s": round(warmup, 2),
                      "gflops": round(flops / med / 1e9, 2),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "torch_threads": torch.get_num_threads()}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()

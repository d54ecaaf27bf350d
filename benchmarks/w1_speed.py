"""Workload W1 speed through the product: seconds per FedAvg round of ``metafed run`` on the
``w1`` dataset, and peak memory.

W1 (shared/peers/README.md): Synthetic(1,1)-style data, N clients with LogNormal(ln 100, 0.5)
samples clipped to [50, 200], MLP 60-200-10, 5 local epochs of SGD (lr 0.01, batch 10),
sample-weighted FedAvg, C clients per round. metafed's ``w1`` dataset holds exactly the
peers' client data (tested in tests/test_scale.py) and the runs sample clients and order
batches with the peers' seeds.

The run is built as ``metafed run`` builds it (:func:`metafed.config.build_config`, then
:func:`metafed.run.run`) with these flags::

    metafed run --dataset w1 --num-clients N --clients-per-round C --local-epochs 5 \
        --batch-size 10 --lr 0.01 --model mlp --hidden 200 --backend B --rounds R+2 ...

One difference, the same the peers make: every client's data is generated before the clock
starts (``load_dataset`` of the same config, all clients touched once, then ``run(cfg,
data=...)``), so generating W1's synthetic data is not timed. Round 1 is the warm-up
(compiling, with ``--compile``); the last round also evaluates and is not timed; the rounds
between are, from the run's own ``wall_time_s``.

    python benchmarks/w1_speed.py --n 1000 --c 100 --backend vectorized --rounds 5 [--compile] [--no-native]

Prints one JSON line: median s/round over the timed rounds, achieved GFLOP/s, peak RSS,
the resolved config's dataset and backend.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys

import numpy as np
import torch

N_PARAMS = 60 * 200 + 200 + 200 * 10 + 10


def w1_config(n: int, c: int, backend: str, chunk: int, compile: bool, rounds: int, seed: int = 0):
    """The W1 run, as `metafed run` flags would give it (evaluation only after the last round)."""
    from metafed.config import build_config

    return build_config(dataset="w1", num_clients=n, clients_per_round=c, local_epochs=5, batch_size=10, lr=0.01,
                        model="mlp", hidden=[200], backend=backend, chunk_size=chunk, compile=compile, seed=seed,
                        rounds=rounds, eval_every=rounds, eval_clients=10, eval_train_loss=False, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--c", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds, after 1 warm-up round")
    ap.add_argument("--backend", default="vectorized")
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-native", action="store_true", help="vectorized: the torch fused step, not the native kernel")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.no_native:
        os.environ["METAFED_NATIVE"] = "0"  # the product's own switch (metafed.backends.native)
    from metafed.data import load_dataset
    from metafed.data.schedule import sample_clients
    from metafed.run import run

    cfg = w1_config(a.n, a.c, a.backend, a.chunk, a.compile, a.rounds + 2)
    data = load_dataset(cfg)
    for k in range(data.num_clients):  # generate every client's data before the clock starts, as the peers do
        data.clients[k]
    result = run(cfg, data=data)
    wall = [row["wall_time_s"] for row in result.rows]  # cumulative, per round
    times = [wall[r] - wall[r - 1] for r in range(1, a.rounds + 1)]  # rounds 2 .. R+1
    sizes = data.train_sizes()
    samples = [int(sizes[sample_clients(a.n, a.c, r, cfg.seed)].sum()) for r in range(2, a.rounds + 2)]
    med = float(np.median(times))
    flops = float(np.mean(samples)) * 6.0 * N_PARAMS * 5
    fed = result.federation
    program, broadcast = fed.algorithm.client_program(1), fed.algorithm.broadcast(fed.state, 1)
    native = a.backend == "vectorized" and fed.backend._native_plan(program, broadcast) is not None
    impl = (f"metafed-run-{a.backend}" + ("+native" if native else "") + ("+compile" if a.compile else "")
            + (f"-chunk{a.chunk}" if a.backend == "vectorized" else ""))
    print(json.dumps({"impl": impl, "N": a.n, "C": a.c, "rounds": len(times), "sec_per_round_median": round(med, 4),
                      "sec_per_round_all": [round(t, 4) for t in times], "warmup_round_s": round(wall[0], 2),
                      "gflops": round(flops / med / 1e9, 2),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "torch_threads": torch.get_num_threads(), "config": {"dataset": cfg.dataset,
                      "backend": cfg.backend, "compile": cfg.compile, "rounds": cfg.rounds}}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
